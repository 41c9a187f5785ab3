"""Passwords for upstreams and the LDAP search bind: one reader (``socksd.secret``), its errors
named after the caller's key."""

from __future__ import annotations

from pathlib import Path

import pytest

from socksd.auth.ldapconfig import LdapConfigError, parse_ldap_settings
from socksd.secret import SecretError, read_secret
from socksd.upstreams import UpstreamError, parse_upstream


def test_the_first_line_of_the_file_or_the_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = tmp_path / "pw"
    file.write_text("s3cret\r\nignored\n")
    assert read_secret("x.password", file, None) == "s3cret"
    monkeypatch.setenv("SOCKSD_TEST_PW", "from-env")
    assert read_secret("x.password", None, "SOCKSD_TEST_PW") == "from-env"
    assert read_secret("x.password", None, None) is None


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (None, "x.password_file: cannot read {file}: No such file or directory"),
        (b"\n\nlater", "x.password_file: the first line of {file} is empty"),
        (b"\xff\xfe", "x.password_file: {file} is not UTF-8 text"),
    ],
)
def test_a_file_that_cannot_give_a_password(
    tmp_path: Path, content: bytes | None, error: str
) -> None:
    file = tmp_path / "pw"
    if content is not None:
        file.write_bytes(content)
    with pytest.raises(SecretError) as e:
        read_secret("x.password", file, None)
    assert str(e.value) == error.format(file=file)


def test_an_unset_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOCKSD_TEST_PW", raising=False)
    with pytest.raises(SecretError) as e:
        read_secret("x.password", None, "SOCKSD_TEST_PW")
    assert str(e.value) == (
        "x.password_env: $SOCKSD_TEST_PW is not set (or empty) in socksd's environment"
    )


def test_each_caller_names_its_own_key(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    upstream = parse_upstream(
        "corp", {"proxy": "socks5://alice@127.0.0.1:1080", "password_file": str(missing)}
    )
    with pytest.raises(UpstreamError, match=r"^upstreams\.corp\.password_file: cannot read "):
        upstream.proxy()
    ldap = parse_ldap_settings(
        {"bind_dn": "cn=socksd,dc=example", "bind_password_file": str(missing)}
    )
    with pytest.raises(LdapConfigError, match=r"^ldap\.bind_password_file: cannot read "):
        ldap.bind_password()
