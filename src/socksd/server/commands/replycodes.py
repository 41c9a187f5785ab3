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

Out of file descriptors (EMFILE, ENFILE: no socket for the target, BIND's listener, a UDP
association's sockets, a name lookup's file or socket) is 0x01 whatever wraps it;
:func:`answer_failure` also logs it, bounded.
"""

from __future__ import annotations

import errno
import socket
from typing import TYPE_CHECKING

from socksd.fdlimit import is_shortage, out_of_files
from socksd.protocol import ReplyCode
from socksd.resolver import ResolutionError

if TYPE_CHECKING:
    from socksd.server.commands.base import CommandSession

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
    if is_shortage(exc):  # ours, whatever it is wrapped in (a lookup that could not open a file)
        return ReplyCode.GENERAL_FAILURE
    if isinstance(exc, ResolutionError | socket.gaierror):
        return ReplyCode.HOST_UNREACHABLE
    if isinstance(exc, TimeoutError):
        return ReplyCode.TTL_EXPIRED
    if isinstance(exc, OSError) and exc.errno is not None:
        return _ERRNO_REPLIES.get(exc.errno, ReplyCode.GENERAL_FAILURE)
    return ReplyCode.GENERAL_FAILURE


def answer_failure(session: CommandSession, command: str, exc: BaseException, error: str) -> None:
    """Answer ``command``'s failure ``exc`` with its reply code and close (``error``: the access
    log's); out of file descriptors is logged as well, one line a minute at most."""
    if is_shortage(exc):
        out_of_files(command, exc, "requests are answered 0x01 (general failure)")
    session.fail(reply_for_error(exc), error)
