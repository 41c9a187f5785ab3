# Users from an LDAP directory (``users = "ldap://..."``), with ldap3.
#
# A login is checked the way every LDAP-backed service does: a search for the user's entry
# (``(&(ATTR=NAME)FILTER)`` under the URL's base, NAME escaped with ldap3's
# ``escape_filter_chars``, so ``*`` or ``)`` in a name match nothing else), then a simple bind as
# the DN found, with the password given. No entry, two entries, or a bind the directory refuses
# (invalidCredentials and the like) is a failed login. So is an entry whose ATTR does not hold the
# name exactly as given: directories compare names ignoring case and surrounding spaces, and
# ``ALICE`` or `` alice`` must not log in as alice under a name the rules do not know. An empty
# password is refused before any request (``LdapStore.refuse``): for LDAP a simple bind with a DN
# and no password is an "unauthenticated bind" that many servers answer with success.
#
# The searches run over pooled connections, bound once as ``[ldap] bind_dn`` (or anonymous): a
# LIFO of idle connections, at most one per thread, so a steady stream of logins costs one search
# and one short bind connection each. A pooled connection the directory has closed meanwhile
# (idle timeout, restart) fails its next search; that search is retried once on a new one. The
# bind as the user is its own connection, closed at once: a pooled connection never carries a
# user's identity.
#
# ``LdapStore`` is a user store (``socksd.auth.stores``) like the htpasswd file and PAM: ldap3's
# synchronous strategy runs on the authenticator's thread pool (``[ldap] pool_size`` threads;
# ``socksd.auth.userpass.UserPassAuthenticator`` bounds what is queued, times the check out, shares
# identical logins in flight and caches verified logins, with their groups, for
# ``users_cache_ttl``): each check is a few blocking round trips, and ldap3's asynchronous
# strategies are callback/polling wrappers over threads of their own, not asyncio, so they would
# add threads without removing any. Each connect and each operation is bounded by ``[ldap]
# timeout``, and so is the whole check as the session sees it.
#
# Groups: the values of the user entry's ``group_attr`` (``memberOf`` by default, read by the
# same search) and, when ``group_base`` is set, the groups under it listing the user
# (``member``/``uniqueMember`` = the DN, or ``memberUid`` = the login name). Each group is known
# by the value of the first RDN of its DN (``cn=proxy-users,ou=groups,...`` is ``proxy-users``),
# lower-cased, and offered to the rules as ``ldap:NAME`` (``users = ["@ldap:proxy-users"]``).
# A group search that fails refuses the login: groups not known in full could leave out one that
# a deny rule names.
#
# A directory that cannot be reached, refuses the search bind, or does not answer in time is
# answered "unavailable" (``socksd.auth.stores.unavailable``): the login is refused with a clear
# log line, and is not counted as a wrong password. So is any unexpected error of ldap3.

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import queue
import ssl
from collections.abc import Iterable
from typing import Any, Literal

from ldap3 import (
    ANONYMOUS,
    AUTO_BIND_NONE,
    BASE,
    LEVEL,
    NONE,
    SIMPLE,
    SUBTREE,
    SYNC,
    Connection,
    Server,
    Tls,
)
from ldap3.core.exceptions import LDAPException
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import parse_dn

from socksd.auth.ldapconfig import LdapSettings, LdapUrl, check_ldap
from socksd.auth.stores import WRONG, CheckResult, unavailable, unusable_login
from socksd.rules.match import NO_GROUPS

log = logging.getLogger("socksd.auth.ldap")

GROUP_PREFIX = "ldap:"
"""Directory groups reach the rules as ``ldap:NAME`` (written ``@ldap:NAME`` in ``users``)."""

MAX_GROUPS = 1000
"""The most groups a group search returns for one user."""

MAX_NAME_BYTES = 255
MAX_PASSWORD_BYTES = 255
"""RFC 1929 fields are at most 255 bytes (for the HTTP Basic logins too)."""


class UserStoreUnavailable(Exception):
    """The directory cannot answer now (down, too slow, refusing the search bind); the message
    says why. Raised inside a check, answered as ``unavailable``."""


Scope = Literal["BASE", "LEVEL", "SUBTREE"]
_SCOPES: dict[str, Scope] = {"sub": SUBTREE, "one": LEVEL, "base": BASE}

# Bind results that mean "these credentials do not log in" rather than "the directory failed":
# invalidCredentials, inappropriateAuthentication, insufficientAccessRights,
# unwillingToPerform (a locked or expired account), invalidDNSyntax.
_REFUSED = {48, 49, 50, 53, 34}


def user_filter(url: LdapUrl, name: str) -> str:
    """The search filter for login ``name``: ``(ATTR=NAME)``, and the URL's filter if any."""
    match = f"({url.attr}={escape_filter_chars(name)})"
    return f"(&{match}{url.filter})" if url.filter else match


def group_filter(dn: str, name: str) -> str:
    """The filter of the groups listing a user by DN (groupOfNames, groupOfUniqueNames) or by
    login name (posixGroup)."""
    dn_value = escape_filter_chars(dn)
    return f"(|(member={dn_value})(uniqueMember={dn_value})(memberUid={escape_filter_chars(name)}))"


def group_name(dn: str) -> str | None:
    """``ldap:NAME`` for a group's DN (the value of its first RDN, lower-cased)."""
    try:
        rdns = parse_dn(dn)
    except LDAPException:
        return None
    if not rdns or not rdns[0][1]:
        return None
    return GROUP_PREFIX + str(rdns[0][1]).lower()


class LdapStore:
    """Users of an LDAP directory: ``users = "ldap[s]://..."`` with its ``[ldap]`` table.

    Nothing is connected before the first check; the search bind's password is read when the
    store is made (``derive``: at start-up and on each reload)."""

    kind = "ldap"

    def __init__(self, url: LdapUrl, settings: LdapSettings, *, cache_ttl: float) -> None:
        """LdapConfigError when the URL and ``[ldap]`` do not fit or the password cannot be
        read."""
        check_ldap(url, settings)
        self.url = url
        self.settings = settings
        self.cache_ttl = cache_ttl
        self.threads = settings.pool_size
        self.timeout: float | None = settings.timeout
        self._bind_password = settings.bind_password()
        # A reload that keeps the directory (URL, settings, search password) keeps the logins
        # verified against it; any change starts afresh.
        identity = repr((str(url), settings, self._bind_password)).encode()
        self._token = b"ldap:" + hashlib.sha256(identity).digest()
        self.closed = False
        tls = None
        if url.tls or settings.starttls:
            tls = Tls(
                validate=ssl.CERT_REQUIRED,
                ca_certs_file=str(settings.ca_file) if settings.ca_file is not None else None,
            )
        self._server = Server(
            url.host,
            port=url.port,
            use_ssl=url.tls,
            tls=tls,
            get_info=NONE,
            connect_timeout=settings.timeout,
        )
        self._idle: queue.LifoQueue[Connection] = queue.LifoQueue(maxsize=settings.pool_size)
        self._attributes = [url.attr] + ([settings.group_attr] if settings.group_attr else [])

    def describe(self) -> str:
        """One line for ``check-config`` and the reload log (never the password)."""
        settings = self.settings
        how = "ldaps" if self.url.tls else "StartTLS" if settings.starttls else "plain LDAP"
        who = settings.bind_dn or "anonymous"
        groups = []
        if settings.group_attr:
            groups.append(settings.group_attr)
        if settings.group_base:
            groups.append(f"members under {settings.group_base}")
        return (
            f"users from {self.url} ({how}, searched as {who}, groups from "
            f"{' and '.join(groups) or 'nowhere'})"
        )

    def refuse(self, username: bytes, password: bytes) -> bool:
        """An empty password (an unauthenticated bind would succeed), a name or password with a
        NUL byte or too long, a name that is not UTF-8 or is empty."""
        return unusable_login(username, password, MAX_NAME_BYTES, MAX_PASSWORD_BYTES)

    def token(self, name: str | None) -> bytes:
        """The directory's identity: a reload that keeps it keeps the cached logins."""
        return self._token

    def check(
        self, name: str | None, token: bytes | None, password: bytes, client: str | None
    ) -> CheckResult:
        """Search for ``name``, bind as the entry found with ``password``: right (with the
        user's groups), wrong, or unavailable (the directory cannot say)."""
        if name is None:
            return WRONG
        try:
            groups = self._check(name, password)
        except UserStoreUnavailable as e:
            return unavailable(str(e))
        except Exception as e:  # a surprise of ldap3: refuse the login, never stall it
            log.exception("ldap: unexpected error checking the login of %r", name)
            return unavailable(f"{self.url.where}: unexpected error: {e!r}")
        if groups is None:
            return WRONG
        return CheckResult(True, groups or NO_GROUPS)

    # -- the check (a worker thread) ------------------------------------------------------------

    def _check(self, name: str, password: bytes) -> frozenset[str] | None:
        """The user's groups when ``name``/``password`` log in, None when they do not;
        UserStoreUnavailable when the directory cannot say."""
        url = self.url
        conn, found = self._search(url.base, _SCOPES[url.scope], user_filter(url, name))
        try:
            entries = [r for r in found if r.get("type") == "searchResEntry"]
            if len(entries) != 1:
                if entries:
                    log.warning(
                        "ldap: %d entries match user %r under %s; refusing the login "
                        "(make %s unique or narrow the URL's filter)",
                        len(entries),
                        name,
                        url.base,
                        url.attr,
                    )
                return None
            dn = str(entries[0]["dn"])
            attributes = entries[0].get("attributes", {})
            if name not in _values(attributes, url.attr):
                log.debug("ldap: %s matches user %r only as %s", dn, name, url.attr)
                return None
            if not self._bind_as(dn, password):
                return None
            groups = set(self._names(attributes))
            if self.settings.group_base:
                groups.update(self._group_search(conn, dn, name))
            return frozenset(groups)
        finally:
            self._release(conn)

    def _names(self, attributes: dict[str, Any]) -> Iterable[str]:
        attr = self.settings.group_attr
        for value in _values(attributes, attr) if attr else []:
            group = group_name(value)
            if group is not None:
                yield group

    def _search(self, base: str, scope: Scope, search: str) -> tuple[Connection, list[Any]]:
        """Search on a pooled connection (retried once on a new one if the pooled one fails);
        returns the connection (give it back with ``_release``) and the response."""
        for attempt in (0, 1):
            conn, reused = self._acquire()
            try:
                conn.search(
                    base,
                    search,
                    search_scope=scope,
                    attributes=self._attributes,
                    size_limit=2,
                    time_limit=max(1, int(self.settings.timeout)),
                )
            except LDAPException as e:
                self._discard(conn)
                if reused and attempt == 0:
                    continue
                raise UserStoreUnavailable(f"{self.url.where}: search failed: {e}") from None
            result = conn.result or {}
            code = result.get("result", 0)
            if code not in (0, 4):  # success, sizeLimitExceeded (two entries: ambiguous)
                self._discard(conn)
                if reused and attempt == 0:
                    continue
                raise UserStoreUnavailable(
                    f"{self.url.where}: search under {base} failed: "
                    f"{result.get('description')} {result.get('message') or ''}".rstrip()
                )
            return conn, list(conn.response or [])
        raise AssertionError("unreachable")  # pragma: no cover

    def _group_search(self, conn: Connection, dn: str, name: str) -> Iterable[str]:
        base = self.settings.group_base
        assert base is not None
        try:
            conn.search(
                base,
                group_filter(dn, name),
                search_scope=SUBTREE,
                attributes=[],
                size_limit=MAX_GROUPS,
                time_limit=max(1, int(self.settings.timeout)),
            )
        except LDAPException as e:
            raise UserStoreUnavailable(f"{self.url.where}: group search failed: {e}") from None
        result = conn.result or {}
        if result.get("result", 0) != 0:
            # Groups not known in full could leave out one a deny rule names: no login.
            raise UserStoreUnavailable(
                f"{self.url.where}: group search under {base} failed: {result.get('description')}"
            )
        for entry in conn.response or []:
            if entry.get("type") == "searchResEntry":
                group = group_name(str(entry["dn"]))
                if group is not None:
                    yield group

    def _bind_as(self, dn: str, password: bytes) -> bool:
        """A simple bind as ``dn`` on a connection of its own: True if the directory accepts
        the password."""
        conn = self._connection(dn, password)
        try:
            self._open(conn)
            if conn.bind():
                return True
        except LDAPException as e:
            raise UserStoreUnavailable(f"{self.url.where}: bind failed: {e}") from None
        finally:
            _close(conn)
        result = conn.result or {}
        if result.get("result") in _REFUSED:
            return False
        raise UserStoreUnavailable(
            f"{self.url.where}: bind as {dn} failed: {result.get('description')}"
        )

    # -- connections ----------------------------------------------------------------------------

    def _connection(self, user: str | None, password: bytes | str | None) -> Connection:
        return Connection(
            self._server,
            user=user,
            # bytes go to the directory as they are (ldap3 applies SASLprep to str only)
            password=password,  # type: ignore[arg-type]
            authentication=SIMPLE if user is not None else ANONYMOUS,
            client_strategy=SYNC,
            auto_bind=AUTO_BIND_NONE,
            read_only=True,
            raise_exceptions=False,
            auto_referrals=False,
            # SO_RCVTIMEO in whole seconds (ldap3 packs it as integers)
            receive_timeout=math.ceil(self.settings.timeout),
        )

    def _open(self, conn: Connection) -> None:
        """Connect (and StartTLS when configured); LDAPException when it fails."""
        # ldap3 shuns an address for 5 s after a failed connect ("invalid server address"):
        # a directory back from an outage is tried at once instead.
        self._server.reset_availability()
        conn.open()
        if self.settings.starttls and not conn.start_tls():
            result = conn.result or {}
            raise UserStoreUnavailable(
                f"{self.url.where}: StartTLS refused: {result.get('description')}"
            )

    def _acquire(self) -> tuple[Connection, bool]:
        """An idle pooled search connection (True: reused), or a new one bound for searches."""
        try:
            return self._idle.get_nowait(), True
        except queue.Empty:
            pass
        conn = self._connection(self.settings.bind_dn, self._bind_password)
        try:
            self._open(conn)
            bound = conn.bind()
        except LDAPException as e:
            _close(conn)
            raise UserStoreUnavailable(f"{self.url.where}: cannot connect: {e}") from None
        except UserStoreUnavailable:
            _close(conn)
            raise
        if not bound:
            result = conn.result or {}
            _close(conn)
            who = self.settings.bind_dn or "anonymous"
            raise UserStoreUnavailable(
                f"{self.url.where}: the search bind as {who} failed: "
                f"{result.get('description')} (check [ldap] bind_dn and its password)"
            )
        return conn, False

    def _release(self, conn: Connection) -> None:
        """Give a search connection back to the pool (closed if the pool is full or closed)."""
        if self.closed or conn.closed:
            _close(conn)
            return
        try:
            self._idle.put_nowait(conn)
        except queue.Full:
            _close(conn)

    def _discard(self, conn: Connection) -> None:
        _close(conn)

    def close(self) -> None:
        """Close the pooled connections (checks still running close theirs when done)."""
        self.closed = True
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                break
            _close(conn)


def _values(attributes: dict[str, Any], attr: str) -> list[str]:
    """The values of ``attr`` (any case) in a search result entry's attributes."""
    values: Any = next((v for k, v in attributes.items() if k.lower() == attr.lower()), [])
    return [values] if isinstance(values, str) else [str(v) for v in values]


def _close(conn: Connection) -> None:
    """Unbind and close, whatever state the connection is in."""
    with contextlib.suppress(LDAPException, OSError):
        conn.unbind()
