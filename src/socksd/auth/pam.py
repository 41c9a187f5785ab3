# Users from PAM (``users = "pam:SERVICE"``): each login is checked by the system's PAM stack of
# SERVICE (/etc/pam.d/SERVICE) through libpam, called with ctypes (no compiler, no package).
#
# Why not python-pam: its conversation answers only the first password prompt of a call and
# answers every other prompt with success and no text (socksd must fail a stack that asks for
# anything but the password), it calls pam_setcred (socksd logs nobody into the host), keeps the
# last result on a shared object (one per thread would be needed), and it does not stop libpam's
# own sleep after a failure. Calling the four functions needed directly is shorter than working
# around those.
#
# One check: pam_start(SERVICE, user) -> set PAM_FAIL_DELAY and PAM_RHOST (the client's
# address, which pam_access, pam_faillock and the logs use) -> pam_authenticate ->
# pam_acct_mgmt (an expired or locked account is refused, as login(1) would refuse it) ->
# pam_end. Flags PAM_SILENT | PAM_DISALLOW_NULL_AUTHTOK. No pam_setcred, no session: the proxy
# does not log the user into this host.
#
# The conversation (``answer``) gives the password to each password prompt
# (PAM_PROMPT_ECHO_OFF) and nothing else: a prompt for anything else (PAM_PROMPT_ECHO_ON, a user
# name or a one-time code; a binary prompt; a style it does not know) ends it with
# PAM_CONV_ERR, so the login fails. Error and information messages are logged at debug level and
# answered with no text. Responses are allocated with calloc, since libpam frees them.
#
# libpam makes a failed pam_authenticate sleep (pam_unix asks for 2 s) unless the application
# sets a PAM_FAIL_DELAY function; socksd sets one that does nothing: the login throttle
# (``socksd.limits``) delays failures without holding a thread.
#
# A user name or password with a NUL byte, not UTF-8, empty, or longer than PAM's own limit
# (PAM_MAX_RESP_SIZE) fails at once (``PamStore.refuse``): C strings would cut it, and PAM
# modules read text.
#
# Calls block (files, a helper process, the network) and run on the authenticator's thread pool
# (``socksd.auth.userpass``), which bounds them, times them out, shares identical logins in
# flight and caches verified logins for ``users_cache_ttl``: PAM cannot say that a password
# changed, so a cached login is trusted for that long after its check.
#
# A result that says the stack could not decide rather than that the login is wrong
# (PAM_AUTHINFO_UNAVAIL: a module's server is unreachable; PAM_SYSTEM_ERR, PAM_SERVICE_ERR,
# PAM_BUF_ERR, PAM_ABORT, a module that cannot be loaded) is answered as "the store is
# unavailable", as a check the timeout ends is: the login is refused, logged, and not counted as a
# failed login (``socksd.server.handshake.login``).

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from socksd.auth.stores import (
    RIGHT,
    WRONG,
    CheckResult,
    UserStoreError,
    unavailable,
    unusable_login,
)

log = logging.getLogger("socksd.auth")

PAM_DIR = Path("/etc/pam.d")
"""Where PAM reads the stack of a service: a file named after the service."""

_SERVICE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

# Linux-PAM's values (security/_pam_types.h)
PAM_SUCCESS = 0
PAM_OPEN_ERR = 1
PAM_SYMBOL_ERR = 2
PAM_SERVICE_ERR = 3
PAM_SYSTEM_ERR = 4
PAM_BUF_ERR = 5
PAM_AUTH_ERR = 7
PAM_AUTHINFO_UNAVAIL = 9
PAM_USER_UNKNOWN = 10
PAM_ABORT = 26
PAM_RHOST = 4
PAM_CONV_ERR = 19
PAM_PROMPT_ECHO_OFF = 1
PAM_PROMPT_ECHO_ON = 2
PAM_ERROR_MSG = 3
PAM_TEXT_INFO = 4
PAM_FAIL_DELAY = 10
PAM_SILENT = 0x8000
PAM_DISALLOW_NULL_AUTHTOK = 0x0001
PAM_MAX_NUM_MSG = 32
PAM_MAX_RESP_SIZE = 512
MAX_NAME_BYTES = 255
"""RFC 1929's limit, for the HTTP Basic logins too."""

_FAILURES = {PAM_AUTH_ERR, PAM_USER_UNKNOWN}
"""Results that only mean a wrong login (others are logged: a broken stack, a server down)."""
_UNAVAILABLE = {
    PAM_OPEN_ERR,
    PAM_SYMBOL_ERR,
    PAM_SERVICE_ERR,
    PAM_SYSTEM_ERR,
    PAM_BUF_ERR,
    PAM_AUTHINFO_UNAVAIL,
    PAM_ABORT,
}
"""Results that say the stack could not decide (a server down, a broken module): the store is
unavailable, not the password wrong."""


def service_error(service: str) -> str | None:
    """Why ``service`` cannot be a PAM service name (a file name in /etc/pam.d); None if it
    can."""
    if not _SERVICE_RE.fullmatch(service):
        return (
            f"pam:{service}: a PAM service name is letters, digits, '.', '_' and '-' "
            f"(the name of a file in {PAM_DIR})"
        )
    return None


def answer(prompts: Sequence[tuple[int, bytes]], password: bytes) -> list[bytes | None] | None:
    """The responses to one call of the conversation: ``password`` to each password prompt
    (PAM_PROMPT_ECHO_OFF), no text to error and information messages; None (the conversation
    fails) when anything else is asked."""
    responses: list[bytes | None] = []
    for style, _ in prompts:
        if style == PAM_PROMPT_ECHO_OFF:
            responses.append(password)
        elif style in (PAM_ERROR_MSG, PAM_TEXT_INFO):
            responses.append(None)
        else:
            return None
    return responses


class _Message(ctypes.Structure):
    _fields_ = (("msg_style", ctypes.c_int), ("msg", ctypes.c_char_p))


class _Response(ctypes.Structure):
    _fields_ = (("resp", ctypes.c_void_p), ("resp_retcode", ctypes.c_int))


_ConvFunc = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_int,
    ctypes.POINTER(ctypes.POINTER(_Message)),
    ctypes.POINTER(ctypes.POINTER(_Response)),
    ctypes.c_void_p,
)
_DelayFunc = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p)


class _Conv(ctypes.Structure):
    _fields_ = (("conv", _ConvFunc), ("appdata_ptr", ctypes.c_void_p))


def _no_delay(_status: int, _usec: int, _appdata: int | None) -> None:
    """libpam's failure delay, replaced by nothing (the throttle delays failures)."""


_NO_DELAY = _DelayFunc(_no_delay)


class _Libpam:
    """The functions of libpam and libc a check uses, with their C signatures."""

    def __init__(self, pam: ctypes.CDLL, libc: ctypes.CDLL) -> None:
        handle = ctypes.c_void_p
        self.start = pam.pam_start
        self.start.argtypes = (
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.POINTER(_Conv),
            ctypes.POINTER(handle),
        )
        self.start.restype = ctypes.c_int
        self.set_item = pam.pam_set_item
        self.set_item.argtypes = (handle, ctypes.c_int, ctypes.c_void_p)
        self.set_item.restype = ctypes.c_int
        self.authenticate = pam.pam_authenticate
        self.acct_mgmt = pam.pam_acct_mgmt
        for step in (self.authenticate, self.acct_mgmt):
            step.argtypes = (handle, ctypes.c_int)
            step.restype = ctypes.c_int
        self.end = pam.pam_end
        self.end.argtypes = (handle, ctypes.c_int)
        self.end.restype = ctypes.c_int
        self.strerror = pam.pam_strerror
        self.strerror.argtypes = (handle, ctypes.c_int)
        self.strerror.restype = ctypes.c_char_p
        self.calloc = libc.calloc
        self.calloc.argtypes = (ctypes.c_size_t, ctypes.c_size_t)
        self.calloc.restype = ctypes.c_void_p
        self.free = libc.free
        self.free.argtypes = (ctypes.c_void_p,)
        self.free.restype = None

    def error(self, handle: ctypes.c_void_p, status: int) -> str:
        """PAM's text for ``status``."""
        text = self.strerror(handle, status)
        return text.decode("utf-8", "replace") if text else f"PAM error {status}"


@functools.cache
def libpam() -> _Libpam:
    """libpam, loaded once; UserStoreError when the system has none."""
    name = ctypes.util.find_library("pam") or "libpam.so.0"
    try:
        return _Libpam(ctypes.CDLL(name), ctypes.CDLL(None))
    except (OSError, AttributeError) as e:
        raise UserStoreError(
            f"pam: cannot load libpam ({e}); install the system's PAM library (libpam0g)"
        ) from None


def conversation(lib: _Libpam, password: bytes) -> Any:
    """The C conversation function of one check (keep it referenced until pam_end)."""

    def converse(count: int, messages: Any, responses: Any, appdata: int | None) -> int:
        try:
            return _converse(lib, password, count, messages, responses)
        except Exception:  # ctypes would print it and answer 0, PAM_SUCCESS, with no responses
            log.exception("PAM conversation failed")
            return PAM_CONV_ERR

    return _ConvFunc(converse)


def _converse(lib: _Libpam, password: bytes, count: int, messages: Any, responses: Any) -> int:
    """One call of the conversation, in C types: ``answer``'s responses in memory libpam frees."""
    if not 0 < count <= PAM_MAX_NUM_MSG:
        return PAM_CONV_ERR
    prompts = []
    for i in range(count):
        message = messages[i].contents
        text = message.msg or b""
        prompts.append((message.msg_style, text))
        if message.msg_style in (PAM_ERROR_MSG, PAM_TEXT_INFO):
            log.debug("PAM says: %s", text.decode("utf-8", "replace"))
    answers = answer(prompts, password)
    if answers is None:
        return PAM_CONV_ERR
    array = lib.calloc(count, ctypes.sizeof(_Response))
    if not array:
        return PAM_BUF_ERR
    reply = ctypes.cast(array, ctypes.POINTER(_Response))
    for i, text in enumerate(answers):
        if text is None:
            continue
        copy = lib.calloc(len(text) + 1, 1)  # NUL-terminated
        if not copy:
            for j in range(i):
                lib.free(reply[j].resp)
            lib.free(array)
            return PAM_BUF_ERR
        ctypes.memmove(copy, text, len(text))
        reply[i].resp = copy
    responses[0] = reply
    return PAM_SUCCESS


def authenticate(
    lib: _Libpam, service: str, user: str, password: bytes, rhost: str | None = None
) -> tuple[int, str]:
    """Check ``user``/``password`` with PAM ``service`` (blocks), from ``rhost`` (PAM_RHOST,
    when known): PAM's result (PAM_SUCCESS: the login is good) and, for any other, the step that
    gave it and PAM's text."""
    converse = conversation(lib, password)
    conv = _Conv(converse, None)
    handle = ctypes.c_void_p()
    status = lib.start(service.encode(), user.encode(), ctypes.byref(conv), ctypes.byref(handle))
    if status != PAM_SUCCESS:
        return status, f"pam_start: {lib.error(handle, status)}"
    try:
        lib.set_item(handle, PAM_FAIL_DELAY, ctypes.cast(_NO_DELAY, ctypes.c_void_p))
        if rhost is not None:
            host = ctypes.create_string_buffer(rhost.encode())  # PAM copies it
            lib.set_item(handle, PAM_RHOST, ctypes.cast(host, ctypes.c_void_p))
        flags = PAM_SILENT | PAM_DISALLOW_NULL_AUTHTOK
        step = "pam_authenticate"
        status = lib.authenticate(handle, flags)
        if status == PAM_SUCCESS:
            step = "pam_acct_mgmt"
            status = lib.acct_mgmt(handle, flags)
        return status, "" if status == PAM_SUCCESS else f"{step}: {lib.error(handle, status)}"
    finally:
        lib.end(handle, status)


class PamStore:
    """Logins checked by the PAM stack of ``service`` (the file /etc/pam.d/``service``)."""

    kind = "pam"
    threads = 4

    def __init__(
        self, service: str, *, cache_ttl: float, timeout: float, pam_dir: Path = PAM_DIR
    ) -> None:
        """UserStoreError when the service has no file in ``pam_dir`` or libpam is missing."""
        error = service_error(service)
        if error is not None:
            raise UserStoreError(error)
        self.path = pam_dir / service
        if not self.path.is_file():
            raise UserStoreError(
                f"pam:{service}: no PAM service file {self.path} (PAM would fall back to "
                f"{pam_dir / 'other'}); create it, see the README"
            )
        self.service = service
        self.cache_ttl = cache_ttl
        self.timeout: float | None = timeout
        self._token = b"pam:" + service.encode()
        self._lib = libpam()

    def describe(self) -> str:
        """``PAM service NAME (/etc/pam.d/NAME)``."""
        return f"PAM service {self.service} ({self.path})"

    def refuse(self, username: bytes, password: bytes) -> bool:
        """A name or password PAM cannot take whole: a NUL byte, not UTF-8, empty, too long."""
        return unusable_login(username, password, MAX_NAME_BYTES, PAM_MAX_RESP_SIZE - 1)

    def token(self, name: str | None) -> bytes:
        """The service: a reload that keeps it keeps the cached logins."""
        return self._token

    def check(
        self, name: str | None, token: bytes | None, password: bytes, client: str | None
    ) -> CheckResult:
        """Run the PAM stack for ``name``/``password``, from ``client`` (PAM_RHOST)."""
        if name is None:
            return WRONG
        # a ctypes failure raises: the authenticator logs it and answers unavailable
        status, reason = authenticate(self._lib, self.service, name, password, client)
        if status == PAM_SUCCESS:
            return RIGHT
        if status in _UNAVAILABLE:  # a server down, a broken stack: logged by the login path
            return unavailable(reason)
        if status in _FAILURES:
            log.debug("PAM service %s, user %r: %s", self.service, name, reason)
        else:  # an expired or locked account, a prompt socksd does not answer...
            log.warning("PAM service %s, user %r: %s", self.service, name, reason)
        return WRONG

    def close(self) -> None:
        """Nothing held open."""
