"""Wire constants of SOCKS5 (RFC 1928), username/password (RFC 1929) and GSSAPI (RFC 1961)."""

from enum import IntEnum

SOCKS_VERSION = 0x05
USERPASS_VERSION = 0x01
GSSAPI_VERSION = 0x01


class AuthMethod(IntEnum):
    """METHOD values of the method-selection exchange."""

    NO_AUTH = 0x00
    GSSAPI = 0x01
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE = 0xFF


class Command(IntEnum):
    """CMD values of a request."""

    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03


class AddressType(IntEnum):
    """ATYP values of requests, replies and UDP headers."""

    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04


class ReplyCode(IntEnum):
    """REP values of a reply."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class UserPassStatus(IntEnum):
    """STATUS of the RFC 1929 reply: 0 is success, anything else failure."""

    SUCCESS = 0x00
    FAILURE = 0x01


class GssapiMessageType(IntEnum):
    """MTYP values of RFC 1961 messages."""

    AUTHENTICATION = 0x01
    PROTECTION = 0x02
    ENCAPSULATION = 0x03
    ABORT = 0xFF


class ProtectionLevel(IntEnum):
    """RFC 1961 s. 4.2 security context protection levels (the octet of the MTYP=2 exchange)."""

    INTEGRITY = 0x01  # every message gss_wrap'ed with conf_req_flag FALSE
    CONFIDENTIALITY = 0x02  # every message gss_wrap'ed with conf_req_flag TRUE
    SELECTIVE = 0x03  # conf_req_flag chosen per message by each sender
