"""Tests of the htpasswd user file store."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import bcrypt
import pytest

from socksd.auth.htpasswd import UserFile, UserFileError, check_name, hash_password

FAST = 4  # bcrypt cost for tests

# Made with `htpasswd -nbB alice wonderland` and `htpasswd -nbB bob builder`.
ALICE = b"$2y$05$h3zydEAE2tb8lbTWzkg5ZOQsG3SwhTaAmhGg6obeJDZAuceE4KUVC"
BOB = b"$2y$05$om7xoigxi2RWFaDaHLWC9.wDejj/PZuLH7GYqyVBEHBrGoQ6yuJVy"

needs_htpasswd = pytest.mark.skipif(shutil.which("htpasswd") is None, reason="no htpasswd")


def sample() -> bytes:
    return b"# socksd users\n\nalice:" + ALICE + b"\n  # indented comment\nbob:" + BOB + b"\n"


def test_parse_users_and_comments() -> None:
    users = UserFile.parse(sample())
    assert users.names() == ["alice", "bob"]
    assert users.users == {"alice": ALICE, "bob": BOB}
    assert bcrypt.checkpw(b"wonderland", users.users["alice"])
    assert bcrypt.checkpw(b"builder", users.users["bob"])


def test_round_trip_keeps_comments_and_order() -> None:
    assert UserFile.parse(sample()).dumps() == sample()


def test_crlf_whitespace_and_missing_final_newline() -> None:
    users = UserFile.parse(b"alice:" + ALICE + b"  \r\n  bob:" + BOB)
    assert users.users == {"alice": ALICE, "bob": BOB}
    assert users.dumps() == b"alice:" + ALICE + b"\nbob:" + BOB + b"\n"


def test_empty_file() -> None:
    users = UserFile.parse(b"")
    assert users.names() == []
    assert users.dumps() == b""


def test_all_bcrypt_prefixes_accepted() -> None:
    tail = ALICE[4:]
    users = UserFile.parse(b"a:$2a$" + tail + b"\nb:$2b$" + tail + b"\ny:$2y$" + tail + b"\n")
    assert users.names() == ["a", "b", "y"]
    for hashed in users.users.values():
        assert bcrypt.checkpw(b"wonderland", hashed)


def test_users_view_is_read_only() -> None:
    users = UserFile.parse(sample())
    with pytest.raises(TypeError):
        users.users["eve"] = ALICE  # type: ignore[index]


@pytest.mark.parametrize(
    ("field", "kind"),
    [
        ("{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=", "{SHA}"),
        ("$apr1$3bZEiXqY$Y6nGhIH4JQ8qNqVWgmAOq.", "$apr1$"),
        ("$1$saltsalt$qjXMvbEw8oaL.CzflDugX/", "$1$"),
        (
            "$6$saltsalt$Pl0ymefdTQgF5ARwlM4q0lb9y1XsfUWvflvuGuYMP4ZBl7CjaE5iKPDYO8Xh0Q1CBp9.ip.",
            "$6$",
        ),
        ("rqXexS6ZhobKA", "crypt"),
        ("hunter2!", "plaintext or unknown"),
        ("$2x$05$" + ALICE[7:].decode(), "$2x$"),
    ],
)
def test_unsupported_hash_names_file_line_kind_and_fix(field: str, kind: str) -> None:
    data = b"# users\nalice:" + ALICE + b"\nbob:" + field.encode() + b"\n"
    with pytest.raises(UserFileError) as info:
        UserFile.parse(data, source="users.htpasswd")
    message = str(info.value)
    assert message.startswith(f"users.htpasswd line 3: user 'bob' has an unsupported hash ({kind})")
    assert "only bcrypt is supported" in message
    assert "htpasswd -B" in message
    assert "socksd user add" in message
    assert field not in message  # a hash field may be a plaintext password
    assert isinstance(info.value, ValueError)


def test_malformed_bcrypt_hash() -> None:
    with pytest.raises(UserFileError, match=r"^f line 1: user 'bob' has a malformed bcrypt hash; "):
        UserFile.parse(b"bob:" + BOB[:-1] + b"\n", source="f")
    with pytest.raises(UserFileError, match="malformed bcrypt hash"):
        UserFile.parse(b"bob:$2y$99$" + BOB[7:] + b"\n", source="f")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"just-a-name", "f line 2: no ':' separator; each line must be 'name:hash'"),
        (b":" + ALICE, "f line 2: user name is empty"),
        (b"x" * 256 + b":" + ALICE, "longer than 255 bytes"),
        (b"bob:", "f line 2: user 'bob' has no password hash; recreate it with `htpasswd -B`"),
        (b"bob:\xff", "f line 2: not valid UTF-8"),
    ],
)
def test_malformed_lines(line: bytes, expected: str) -> None:
    with pytest.raises(UserFileError) as info:
        UserFile.parse(b"# c\n" + line + b"\n", source="f")
    assert expected in str(info.value)


def test_duplicate_user() -> None:
    data = b"alice:" + ALICE + b"\n#\nalice:" + BOB + b"\n"
    with pytest.raises(
        UserFileError,
        match=r"^f line 3: user 'alice' is already defined on line 1; remove one of the two lines",
    ):
        UserFile.parse(data, source="f")


def test_load_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "users.htpasswd"
    path.write_bytes(b"bob:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n")
    with pytest.raises(UserFileError, match=f"^{path} line 1: "):
        UserFile.load(path)
    path.write_bytes(sample())
    assert UserFile.load(path).users == {"alice": ALICE, "bob": BOB}


def test_add_hashes_with_2y_prefix() -> None:
    users = UserFile()
    users.add("carol", b"secret", rounds=FAST)
    hashed = users.users["carol"]
    assert hashed.startswith(b"$2y$04$")
    assert bcrypt.checkpw(b"secret", hashed)
    assert not bcrypt.checkpw(b"Secret", hashed)
    assert UserFile.parse(users.dumps()).users == {"carol": hashed}


def test_add_existing_user_replaces_in_place() -> None:
    users = UserFile.parse(sample())
    users.add("alice", b"new password", rounds=FAST)
    assert users.names() == ["alice", "bob"]
    assert bcrypt.checkpw(b"new password", users.users["alice"])
    lines = users.dumps().split(b"\n")
    assert lines[0] == b"# socksd users"
    assert lines[2].startswith(b"alice:$2y$04$")


def test_add_utf8_name_and_round_trip() -> None:
    users = UserFile()
    users.add("zoë", b"pw", rounds=FAST)
    assert UserFile.parse(users.dumps()).names() == ["zoë"]


def test_remove() -> None:
    users = UserFile.parse(sample())
    users.remove("alice")
    assert users.names() == ["bob"]
    assert users.dumps() == b"# socksd users\n\n  # indented comment\nbob:" + BOB + b"\n"
    with pytest.raises(KeyError):
        users.remove("alice")


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("", "empty"),
        ("a:b", "contains ':'"),
        ("a\nb", "line break"),
        ("é" * 128, "longer than 255 bytes"),
    ],
)
def test_bad_names(name: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UserFile().add(name, b"pw", rounds=FAST)


def test_name_limit_is_in_utf8_bytes() -> None:
    check_name("x" * 255)
    check_name("é" * 127 + "x")  # 255 bytes
    with pytest.raises(ValueError, match="255"):
        check_name("x" * 256)


@pytest.mark.parametrize(
    ("password", "message"),
    [(b"", "1 to 72 bytes"), (b"x" * 73, "1 to 72 bytes"), (b"pass\0word", "NUL")],
)
def test_bad_passwords(password: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        UserFile().add("dave", password, rounds=FAST)


def test_72_byte_password_accepted() -> None:
    hashed = hash_password(b"x" * 72, FAST)
    assert bcrypt.checkpw(b"x" * 72, hashed)


def test_save_new_file_is_0600(tmp_path: Path) -> None:
    old_umask = os.umask(0)
    try:
        users = UserFile.parse(sample())
        path = tmp_path / "users.htpasswd"
        users.save(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == sample()
    assert os.listdir(tmp_path) == ["users.htpasswd"]  # no temporary file left


def test_save_keeps_existing_mode(tmp_path: Path) -> None:
    path = tmp_path / "users.htpasswd"
    path.write_bytes(sample())
    path.chmod(0o640)
    users = UserFile.load(path)
    users.remove("bob")
    users.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert UserFile.load(path).names() == ["alice"]


def test_save_is_atomic_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "users.htpasswd"
    path.write_bytes(sample())
    users = UserFile.load(path)
    users.add("carol", b"pw", rounds=FAST)

    def fail(src: str, dst: str) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk on fire"):
        users.save(path)
    assert path.read_bytes() == sample()
    assert os.listdir(tmp_path) == ["users.htpasswd"]


def test_save_replaces_inode(tmp_path: Path) -> None:
    # A reader holding the old file open keeps reading the complete old content.
    path = tmp_path / "users.htpasswd"
    path.write_bytes(sample())
    with path.open("rb") as reader:
        users = UserFile.load(path)
        users.remove("alice")
        users.save(path)
        assert reader.read() == sample()
    assert UserFile.load(path).names() == ["bob"]


def test_save_through_symlink_keeps_link(tmp_path: Path) -> None:
    real = tmp_path / "real.htpasswd"
    real.write_bytes(sample())
    link = tmp_path / "users.htpasswd"
    link.symlink_to(real)
    users = UserFile.load(link)
    users.remove("bob")
    users.save(link)
    assert link.is_symlink()
    assert UserFile.load(real).names() == ["alice"]


@needs_htpasswd
def test_hash_from_apache_htpasswd_verifies() -> None:
    out = subprocess.run(
        ["htpasswd", "-nbB", "-C", "4", "erin", "pässwörd"],
        check=True,
        capture_output=True,
    ).stdout
    users = UserFile.parse(out)
    hashed = users.users["erin"]
    assert hashed.startswith(b"$2y$")
    assert bcrypt.checkpw("pässwörd".encode(), hashed)
    assert not bcrypt.checkpw(b"passwort", hashed)


@needs_htpasswd
def test_apache_htpasswd_verifies_our_hash(tmp_path: Path) -> None:
    path = tmp_path / "users.htpasswd"
    users = UserFile()
    users.add("frank", b"s3cret", rounds=FAST)
    users.save(path)

    def check(password: str) -> int:
        command = ["htpasswd", "-vb", str(path), "frank", password]
        return subprocess.run(command, check=False, capture_output=True).returncode

    assert check("s3cret") == 0
    assert check("wrong") != 0
