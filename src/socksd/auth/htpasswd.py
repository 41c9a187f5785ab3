# The user store behind RFC 1929 username/password authentication: an Apache htpasswd file.
#
# Format: one ``name:hash`` per line; blank lines and lines starting with ``#`` are comments. Only
# bcrypt hashes (``$2y$``, ``$2b$``, ``$2a$``, what ``htpasswd -B`` writes) are accepted. The other
# kinds htpasswd can write ({SHA}, $apr1$ MD5, crypt, plaintext) are fast or broken hashes, so a
# file holding one is refused at load time with a message naming the line and the fix, instead of
# being accepted and turned into a slow failure at login. Messages never echo a hash field: in a
# hand-written file it may be a plaintext password.
#
# Comments and the order of lines are kept, so ``socksd user add`` on a hand-edited file changes
# only the one line it must. New hashes are written with the ``$2y$`` prefix that Apache writes:
# ``$2y$`` and ``$2b$`` are the same algorithm, and Apache's own tools read only the former back.
#
# ``save`` is atomic (a temporary file in the same directory, fsync, rename, fsync of the
# directory): a server reloading the file never sees half of it, and a crash leaves the old file.

from __future__ import annotations

import contextlib
import os
import re
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import bcrypt

MAX_NAME_BYTES = 255
"""RFC 1929 carries the user name in a field of at most 255 bytes."""

MAX_PASSWORD_BYTES = 72
"""bcrypt uses at most 72 bytes of password; bcrypt>=5 raises for longer ones."""

DEFAULT_ROUNDS = 12
"""bcrypt cost (log2 of the rounds) for new hashes."""

_FIX = "recreate it with `htpasswd -B` or `socksd user add`"

# $2a$/$2b$/$2y$, two-digit cost 04..31, 22 characters of salt and 31 of checksum.
_BCRYPT_RE = re.compile(rb"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")
_CRYPT_RE = re.compile(r"[./A-Za-z0-9]{13}")
_SCHEME_RE = re.compile(r"\$([A-Za-z0-9-]+)\$")


class UserFileError(ValueError):
    """A user file cannot be used; the message names the file, the line and the fix."""


def check_name(name: str) -> None:
    """Raise ValueError unless ``name`` can be a user name in the file and on the wire."""
    if not name:
        raise ValueError("user name is empty")
    if ":" in name:
        raise ValueError(f"user name {name!r} contains ':', the field separator")
    if "\n" in name or "\r" in name:
        raise ValueError(f"user name {name!r} contains a line break")
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise ValueError(f"user name {name!r} is longer than {MAX_NAME_BYTES} bytes in UTF-8")


def check_password(password: bytes) -> None:
    """Raise ValueError unless bcrypt can hash ``password`` without truncating or changing it."""
    if not 1 <= len(password) <= MAX_PASSWORD_BYTES:
        raise ValueError(
            f"password must be 1 to {MAX_PASSWORD_BYTES} bytes (bcrypt's limit), "
            f"got {len(password)}"
        )
    if b"\0" in password:
        raise ValueError("password contains a NUL byte, which many bcrypt implementations cut at")


def hash_password(password: bytes, rounds: int = DEFAULT_ROUNDS) -> bytes:
    """Return a ``$2y$`` bcrypt hash of ``password`` with cost ``rounds``."""
    check_password(password)
    hashed = bcrypt.hashpw(password, bcrypt.gensalt(rounds))
    return b"$2y$" + hashed[4:]


def _hash_kind(field: str) -> str:
    """Name the kind of a non-bcrypt hash field without revealing its content."""
    if field.startswith("{SHA}"):
        return "{SHA}"
    match = _SCHEME_RE.match(field)
    if match:
        return match.group(0)
    if _CRYPT_RE.fullmatch(field):
        return "crypt"
    return "plaintext or unknown"


@dataclass(frozen=True, slots=True)
class _UserLine:
    """Place of a user's line; its text is rebuilt from the current hash on save."""

    name: str


class UserFile:
    """An htpasswd file in memory: users with bcrypt hashes, comments kept in order."""

    def __init__(self) -> None:
        """Create an empty user file."""
        self._lines: list[str | _UserLine] = []
        self._users: dict[str, bytes] = {}

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> UserFile:
        """Read and check the file at ``path``; raise UserFileError if it cannot be used."""
        with open(path, "rb") as f:
            data = f.read()
        return cls.parse(data, source=os.fspath(path))

    @classmethod
    def parse(cls, data: bytes, source: str = "<user file>") -> UserFile:
        """Parse htpasswd content; ``source`` names it in error messages."""
        users = cls()
        first_line: dict[str, int] = {}
        raw_lines = data.split(b"\n")
        if raw_lines[-1] == b"":
            raw_lines.pop()  # after the final newline: not a line
        for number, raw in enumerate(raw_lines, start=1):
            where = f"{source} line {number}"
            try:
                text = raw.decode("utf-8").rstrip("\r")
            except UnicodeDecodeError:
                raise UserFileError(f"{where}: not valid UTF-8; save the file as UTF-8") from None
            stripped = text.strip()
            if not stripped or stripped.startswith("#"):
                users._lines.append(text)
                continue
            name, sep, field = stripped.partition(":")
            if not sep:
                raise UserFileError(
                    f"{where}: no ':' separator; each line must be 'name:hash' "
                    f"(comments start with '#')"
                )
            try:
                check_name(name)
            except ValueError as e:
                raise UserFileError(f"{where}: {e}; fix or remove the line") from None
            if name in first_line:
                raise UserFileError(
                    f"{where}: user {name!r} is already defined on line {first_line[name]}; "
                    f"remove one of the two lines"
                )
            if not field:
                raise UserFileError(f"{where}: user {name!r} has no password hash; {_FIX}")
            hashed = field.encode("ascii", errors="replace")
            if not _BCRYPT_RE.fullmatch(hashed):
                if field.startswith(("$2a$", "$2b$", "$2y$")):
                    raise UserFileError(
                        f"{where}: user {name!r} has a malformed bcrypt hash; {_FIX}"
                    )
                raise UserFileError(
                    f"{where}: user {name!r} has an unsupported hash ({_hash_kind(field)}); "
                    f"only bcrypt is supported: {_FIX}"
                )
            first_line[name] = number
            users._users[name] = hashed
            users._lines.append(_UserLine(name))
        return users

    @property
    def users(self) -> Mapping[str, bytes]:
        """Read-only view: user name -> bcrypt hash."""
        return MappingProxyType(self._users)

    def names(self) -> list[str]:
        """User names in file order."""
        return list(self._users)

    def add(self, name: str, password: bytes, *, rounds: int = DEFAULT_ROUNDS) -> None:
        """Set ``name``'s password (hashed with bcrypt), adding the user if new."""
        check_name(name)
        hashed = hash_password(password, rounds)
        if name not in self._users:
            self._lines.append(_UserLine(name))
        self._users[name] = hashed

    def remove(self, name: str) -> None:
        """Remove user ``name``; raise KeyError if there is none."""
        if name not in self._users:
            raise KeyError(name)
        del self._users[name]
        self._lines.remove(_UserLine(name))

    def dumps(self) -> bytes:
        """Return the file content: every kept line, each ending in a newline."""
        out: list[str] = []
        for line in self._lines:
            if isinstance(line, _UserLine):
                out.append(f"{line.name}:{self._users[line.name].decode('ascii')}\n")
            else:
                out.append(line + "\n")
        return "".join(out).encode("utf-8")

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the file atomically; a new file gets mode 0600, an existing one keeps its mode."""
        # Write through a symlink to its target rather than replacing the link with a file.
        target = os.path.realpath(path)
        directory = os.path.dirname(target)
        try:
            old: os.stat_result | None = os.stat(target)
        except FileNotFoundError:
            old = None
        fd, tmp = tempfile.mkstemp(
            dir=directory, prefix=f".{os.path.basename(target)}.", suffix=".tmp"
        )
        try:
            with os.fdopen(fd, "wb") as f:
                if old is not None:
                    os.fchmod(f.fileno(), stat.S_IMODE(old.st_mode))
                    # Root editing the file of an unprivileged server must not take it over.
                    with contextlib.suppress(PermissionError):
                        os.fchown(f.fileno(), old.st_uid, old.st_gid)
                else:
                    os.fchmod(f.fileno(), 0o600)
                f.write(self.dumps())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        # Make the rename itself durable.
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
