"""The sans-I/O SOCKS5 core: wire constants, the address type, messages and state machines.

Nothing here touches a socket or an event loop; ``socksd.server`` and ``socksd.client`` wrap it.
"""

from socksd.protocol.address import Address, format_hostport, is_valid_hostname, parse_address
from socksd.protocol.connection import (
    CONNECTION_CLOSED,
    NEED_DATA,
    ClientConnection,
    Event,
    ServerConnection,
    State,
)
from socksd.protocol.constants import (
    SOCKS_VERSION,
    AddressType,
    AuthMethod,
    Command,
    GssapiMessageType,
    ProtectionLevel,
    ReplyCode,
    UserPassStatus,
)
from socksd.protocol.errors import (
    GssapiError,
    GssapiOutOfSequence,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
from socksd.protocol.gssapi import (
    GssapiClientNegotiation,
    GssapiEncapsulation,
    GssapiServerNegotiation,
    LevelAgreed,
    MechanismStep,
)
from socksd.protocol.messages import (
    MAX_HANDSHAKE_MESSAGE,
    Greeting,
    GssapiMessage,
    Message,
    MethodSelection,
    Reply,
    Request,
    UdpDatagram,
    UserPassReply,
    UserPassRequest,
)
from socksd.protocol.udp import (
    MAX_UDP_PAYLOAD_IPV4,
    MAX_UDP_PAYLOAD_IPV6,
    UDP_HEADER_IPV4,
    UDP_HEADER_IPV6,
    BindPeerFilter,
    UdpClientFilter,
    udp_header_length,
    udp_reply_header,
)

__all__ = [
    "CONNECTION_CLOSED",
    "MAX_HANDSHAKE_MESSAGE",
    "MAX_UDP_PAYLOAD_IPV4",
    "MAX_UDP_PAYLOAD_IPV6",
    "NEED_DATA",
    "SOCKS_VERSION",
    "UDP_HEADER_IPV4",
    "UDP_HEADER_IPV6",
    "Address",
    "AddressType",
    "AuthMethod",
    "BindPeerFilter",
    "ClientConnection",
    "Command",
    "Event",
    "Greeting",
    "GssapiClientNegotiation",
    "GssapiEncapsulation",
    "GssapiError",
    "GssapiMessage",
    "GssapiMessageType",
    "GssapiOutOfSequence",
    "GssapiServerNegotiation",
    "LevelAgreed",
    "LocalProtocolError",
    "MechanismStep",
    "Message",
    "MethodSelection",
    "ProtectionLevel",
    "ProtocolError",
    "RemoteProtocolError",
    "Reply",
    "ReplyCode",
    "Request",
    "ServerConnection",
    "State",
    "UdpClientFilter",
    "UdpDatagram",
    "UserPassReply",
    "UserPassRequest",
    "UserPassStatus",
    "format_hostport",
    "is_valid_hostname",
    "parse_address",
    "udp_header_length",
    "udp_reply_header",
]
