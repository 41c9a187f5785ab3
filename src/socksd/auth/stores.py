"""Where the users of username/password logins come from: the ``users`` key.

``users`` names a user store, and :func:`open_user_store` is the one place that picks it:

- a path: an htpasswd file with bcrypt hashes (``socksd.auth.userpass.HtpasswdStore``);
- ``pam:SERVICE``: the system's PAM stack of that service, ``/etc/pam.d/SERVICE``
  (``socksd.auth.pam.PamStore``).

A store answers one question, off the event loop: is this password right for this user
(:meth:`UserStore.check`, blocking). Everything around it is the authenticator's
(``socksd.auth.userpass.UserPassAuthenticator``) and the same for every store: the thread pool and
its bound, the timeout, the checks shared by identical logins in flight, and the cache of verified
logins; the login path (``socksd.server.handshake.login``) adds the checkpoint and the throttle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

DIRECTORY_PREFIXES = ("pam:",)
"""``users`` values that name a directory of users rather than an htpasswd file."""


class UserStoreError(ValueError):
    """A user store cannot be opened; the message says why (the caller names the key)."""


class UserStore(Protocol):
    """What the authenticator needs from a user store."""

    kind: str
    """The kind of store (``htpasswd``, ``pam``): an authenticator keeps its thread pool across
    reloads that keep the kind, and is replaced when it changes."""
    threads: int
    """How many checks may run at once (the size of the authenticator's pool)."""
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

    def check(self, name: str | None, token: bytes | None, password: bytes) -> bool:
        """True if ``password`` is right for ``name`` (None: not UTF-8); blocks (a worker
        thread runs it) and never raises."""
        ...


def is_directory(spec: str) -> bool:
    """True if the ``users`` value ``spec`` names a directory (``pam:SERVICE``), not a file."""
    return spec.startswith(DIRECTORY_PREFIXES)


def open_user_store(spec: Path | str, *, cache_ttl: float, timeout: float) -> UserStore:
    """The store ``users = spec`` names; UserStoreError says why it cannot be used.

    ``cache_ttl`` is ``users_cache_ttl`` (directories only: an htpasswd login stays cached while
    the user's hash is unchanged); ``timeout`` bounds each check of a directory.
    """
    if isinstance(spec, str) and spec.startswith("pam:"):
        from socksd.auth.pam import PamStore

        return PamStore(spec.removeprefix("pam:"), cache_ttl=cache_ttl, timeout=timeout)
    from socksd.auth.htpasswd import UserFile, UserFileError
    from socksd.auth.userpass import HtpasswdStore

    try:
        return HtpasswdStore(UserFile.load(spec), source=str(spec))
    except UserFileError as e:
        raise UserStoreError(str(e)) from None
    except OSError as e:
        raise UserStoreError(f"cannot read {spec}: {e.strerror or e}") from None
