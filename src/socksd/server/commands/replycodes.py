"""One table from the outcome of an outgoing connection attempt to the SOCKS reply code.

| outcome                                            | REP  |
|----------------------------------------------------|------|
| connection refused (ECONNREFUSED)                  | 0x05 |
| network unreachable or down (ENETUNREACH, ENETDOWN)| 0x03 |
| host unreachable or down (EHOSTUNREACH, EHOSTDOWN) | 0x04 |
| name does not resolve (or resolver timeout)        | 0x04 |
| connect timeout (ours, or the kernel's ETIMEDOUT)  | 0x06 |
| blocked by the local firewall (EACCES, EPERM)      | 0x02 |
| anything else                                      | 0x01 |
"""

from __future__ import annotations

import errno
import socket

from socksd.protocol import ReplyCode
from socksd.resolver import ResolutionError

_ERRNO_REPLIES: dict[int, ReplyCode] = {
    errno.ECONNREFUSED: ReplyCode.CONNECTION_REFUSED,
    errno.ENETUNREACH: ReplyCode.NETWORK_UNREACHABLE,
    errno.ENETDOWN: ReplyCode.NETWORK_UNREACHABLE,
    errno.EHOSTUNREACH: ReplyCode.HOST_UNREACHABLE,
    errno.EHOSTDOWN: ReplyCode.HOST_UNREACHABLE,
    errno.ETIMEDOUT: ReplyCode.TTL_EXPIRED,
    errno.EACCES: ReplyCode.NOT_ALLOWED,
    errno.EPERM: ReplyCode.NOT_ALLOWED,
}


def reply_for_error(exc: BaseException) -> ReplyCode:
    """The reply code for an exception raised while resolving or connecting."""
    if isinstance(exc, ResolutionError | socket.gaierror):
        return ReplyCode.HOST_UNREACHABLE
    if isinstance(exc, TimeoutError):
        return ReplyCode.TTL_EXPIRED
    if isinstance(exc, OSError) and exc.errno is not None:
        return _ERRNO_REPLIES.get(exc.errno, ReplyCode.GENERAL_FAILURE)
    return ReplyCode.GENERAL_FAILURE
