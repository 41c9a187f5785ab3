"""Where the users of username/password logins come from: the ``users`` key.

``users`` names a user store, and :func:`open_user_store` is the one place that picks it:

- a path: an htpasswd file with bcrypt hashes (``socksd.auth.userpass.HtpasswdStore``);
- ``pam:SERVICE``: the system's PAM stack of that service, ``/etc/pam.d/SERVICE``
  (``socksd.auth.pam.PamStore``);
- ``ldap://HOST/BASE?ATTR?SCOPE?FILTER`` or ``ldaps://...``: an LDAP directory, with the
  ``[ldap]`` table (``socksd.auth.ldap.LdapStore``).

A store answers one question, off the event loop: is this password right for this user
(:meth:`UserStore.check`, blocking). The answer is a :class:`CheckResult`, the same for every store:
right (with the user's directory groups, for ``@ldap:NAME`` in rules), wrong, or unknown because
the store is unavailable (a directory down or too slow, a PAM module that cannot reach its
server): the login path refuses an unavailable login without counting it as a failed login, so
an outage does not block every client's address. Everything around it is the authenticator's
(``socksd.auth.userpass.UserPassAuthenticator``) and the same for every store: the thread pool and
its bound, the timeout, the checks shared by identical logins in flight, and the cache of verified
logins; the login path (``socksd.server.handshake.login``) adds the checkpoint and the throttle.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from socksd.auth.ldapconfig import LdapSettings
from socksd.rules.match import NO_GROUPS  # a user in no directory group (htpasswd, PAM)

DIRECTORY_PREFIXES = ("pam:", "ldap://", "ldaps://")
"""``users`` values that name a directory of users rather than an htpasswd file."""


class UserStoreError(ValueError):
    """A user store cannot be opened; the message says why (the caller names the key, unless
    ``keyed``: the message names it, as ``ldap.bind_password_file: ...``)."""

    def __init__(self, message: str, *, keyed: bool = False) -> None:
        super().__init__(message)
        self.keyed = keyed


@dataclass(frozen=True, slots=True)
class CheckResult:
    """What a check says of a login; true only for a right password."""

    ok: bool
    groups: frozenset[str] = NO_GROUPS
    """The user's directory groups (``ldap:NAME``) when ``ok``."""
    unavailable: str | None = None
    """Why the store could not say (not ok, and not a wrong password: not counted as a failed
    login)."""

    def __bool__(self) -> bool:
        return self.ok


RIGHT = CheckResult(True)
"""A right password, no directory groups."""
WRONG = CheckResult(False)
"""A wrong password or an unknown user (counted as a failed login)."""


def unavailable(reason: str) -> CheckResult:
    """The store could not answer: ``reason`` says why (logged)."""
    return CheckResult(False, unavailable=reason)


def unusable_login(username: bytes, password: bytes, max_name: int, max_password: int) -> bool:
    """True for a login a directory cannot take whole, refused without a check: an empty name or
    password (an empty one would be an unauthenticated LDAP bind), a NUL byte (C strings would
    cut it), longer than the limits, not UTF-8."""
    for field, limit in ((username, max_name), (password, max_password)):
        if not field or len(field) > limit or b"\0" in field:
            return True
        try:
            field.decode("utf-8")
        except UnicodeDecodeError:
            return True
    return False


class UserStore(Protocol):
    """What the authenticator needs from a user store."""

    kind: str
    """The kind of store (``htpasswd``, ``pam``, ``ldap``): an authenticator keeps its thread
    pool across reloads that keep the kind and ``threads``, and is replaced when either
    changes."""
    threads: int
    """How many checks may run at once (the size of the authenticator's pool; LDAP's
    ``pool_size``)."""
    timeout: float | None
    """Seconds a check may take before the login fails (None: no limit)."""
    cache_ttl: float
    """Seconds a verified login is trusted without a new check (``math.inf``: while its token is
    unchanged)."""

    def describe(self) -> str:
        """The store for ``check-config`` and the reload log line: ``3 users in PATH``."""
        ...

    def refuse(self, username: bytes, password: bytes) -> bool:
        """True for a login that fails at once, without a check (NUL bytes, too long, ...)."""
        ...

    def token(self, name: str | None) -> bytes | None:
        """What a verified login of ``name`` is cached against (an htpasswd entry's hash); None:
        no such user (a check still runs, so time does not tell which names exist)."""
        ...

    def check(
        self, name: str | None, token: bytes | None, password: bytes, client: str | None
    ) -> CheckResult:
        """Whether ``password`` is right for ``name`` (None: not UTF-8), asked from ``client``
        (the client's address, for PAM_RHOST; None: not known); blocks (a worker thread runs
        it); an exception is answered as the store unavailable (by the authenticator)."""
        ...

    def close(self) -> None:
        """Let go of what the store holds open (a directory's pooled connections); called when
        the store is replaced."""
        ...


def is_directory(spec: str) -> bool:
    """True if the ``users`` value ``spec`` names a directory (``pam:SERVICE``,
    ``ldap[s]://...``), not a file."""
    return spec.lower().startswith(DIRECTORY_PREFIXES)


def open_user_store(
    spec: Path | str, *, cache_ttl: float, timeout: float, ldap: LdapSettings | None = None
) -> UserStore:
    """The store ``users = spec`` names; UserStoreError says why it cannot be used.

    ``cache_ttl`` is ``users_cache_ttl`` (directories only: an htpasswd login stays cached while
    the user's hash is unchanged); ``timeout`` bounds each check of a directory (PAM; LDAP
    takes ``[ldap] timeout``); ``ldap`` is the ``[ldap]`` table
    (None: the defaults).
    """
    if isinstance(spec, str) and spec.startswith("pam:"):
        from socksd.auth.pam import PamStore

        return PamStore(spec.removeprefix("pam:"), cache_ttl=cache_ttl, timeout=timeout)
    if isinstance(spec, str) and is_directory(spec):
        from socksd.auth.ldapconfig import LdapConfigError, parse_ldap_url

        try:
            from socksd.auth.ldap import LdapStore
        except ImportError as e:
            raise UserStoreError(
                f"an LDAP directory needs the Python package ldap3 ({e}); install it with "
                "pip install 'socksd[ldap]'"
            ) from None
        try:
            return LdapStore(parse_ldap_url(spec), ldap or LdapSettings(), cache_ttl=cache_ttl)
        except LdapConfigError as e:
            raise UserStoreError(str(e), keyed=True) from None
    from socksd.auth.htpasswd import UserFile, UserFileError
    from socksd.auth.userpass import HtpasswdStore

    try:
        return HtpasswdStore(UserFile.load(spec), source=str(spec))
    except UserFileError as e:
        raise UserStoreError(str(e)) from None
    except OSError as e:
        raise UserStoreError(f"cannot read {spec}: {e.strerror or e}") from None
