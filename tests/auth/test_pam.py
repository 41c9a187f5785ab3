"""PAM's conversation and input checks (the C marshalling through libpam's own types), and the
service checks of ``users = "pam:SERVICE"``; a real PAM stack runs in tests/e2e/test_pam.py."""

from __future__ import annotations

import ctypes
import secrets
from pathlib import Path

import pytest

from socksd.auth import pam
from socksd.auth.pam import (
    PAM_CONV_ERR,
    PAM_ERROR_MSG,
    PAM_PROMPT_ECHO_OFF,
    PAM_PROMPT_ECHO_ON,
    PAM_SUCCESS,
    PAM_TEXT_INFO,
    PamStore,
    answer,
    conversation,
    libpam,
    service_error,
)
from socksd.auth.stores import WRONG, UserStoreError
from socksd.config import ConfigError, build_config, load_file

PAM_BINARY_PROMPT = 7


def test_answer_gives_the_password_to_password_prompts_only() -> None:
    assert answer([(PAM_PROMPT_ECHO_OFF, b"Password: ")], b"pw") == [b"pw"]
    assert answer(
        [(PAM_TEXT_INFO, b"hello"), (PAM_PROMPT_ECHO_OFF, b"Password: "), (PAM_ERROR_MSG, b"x")],
        b"pw",
    ) == [None, b"pw", None]
    # a stack whose modules each ask (no use_first_pass) gets the password each time
    assert answer([(PAM_PROMPT_ECHO_OFF, b"P1"), (PAM_PROMPT_ECHO_OFF, b"P2")], b"pw") == [
        b"pw",
        b"pw",
    ]


@pytest.mark.parametrize("style", [PAM_PROMPT_ECHO_ON, PAM_BINARY_PROMPT, 5, 99, -1])
def test_answer_fails_any_other_prompt(style: int) -> None:
    assert answer([(style, b"login: ")], b"pw") is None
    assert answer([(PAM_PROMPT_ECHO_OFF, b"Password: "), (style, b"Code: ")], b"pw") is None


def _messages(*prompts: tuple[int, bytes]) -> ctypes.Array[ctypes._Pointer[pam._Message]]:
    items = [pam._Message(style, text) for style, text in prompts]
    array = (ctypes.POINTER(pam._Message) * len(items))(*(ctypes.pointer(m) for m in items))
    array._keep = items  # type: ignore[attr-defined]
    return array


def _call(password: bytes, *prompts: tuple[int, bytes]) -> tuple[int, list[bytes | None]]:
    """Call the C conversation function as libpam does; free what it allocated."""
    lib = libpam()
    converse = conversation(lib, password)
    responses = ctypes.POINTER(pam._Response)()
    status = converse(len(prompts), _messages(*prompts), ctypes.byref(responses), None)
    texts: list[bytes | None] = []
    if responses:
        for i in range(len(prompts)):
            resp = responses[i].resp
            texts.append(ctypes.string_at(resp) if resp else None)
            assert responses[i].resp_retcode == 0
            lib.free(resp)
        lib.free(ctypes.cast(responses, ctypes.c_void_p))
    return status, texts


def test_the_c_conversation_answers_the_password_prompt() -> None:
    status, texts = _call(b"s3cret", (PAM_TEXT_INFO, b"welcome"), (PAM_PROMPT_ECHO_OFF, b"Pw: "))
    assert status == PAM_SUCCESS
    assert texts == [None, b"s3cret"]


def test_the_c_conversation_fails_a_user_name_prompt_and_allocates_nothing() -> None:
    status, texts = _call(b"s3cret", (PAM_PROMPT_ECHO_ON, b"login: "))
    assert status == PAM_CONV_ERR
    assert texts == []  # *resp left NULL: nothing for libpam to free


@pytest.mark.parametrize("count", [0, pam.PAM_MAX_NUM_MSG + 1])
def test_the_c_conversation_refuses_a_bad_message_count(count: int) -> None:
    converse = conversation(libpam(), b"pw")
    responses = ctypes.POINTER(pam._Response)()
    messages = _messages((PAM_PROMPT_ECHO_OFF, b"Pw: "))
    assert converse(count, messages, ctypes.byref(responses), None) == PAM_CONV_ERR
    assert not responses


@pytest.fixture
def store(tmp_path: Path) -> PamStore:
    """A store whose service file is in a test directory: libpam, which reads /etc/pam.d, finds
    none and uses its fallback, /etc/pam.d/other."""
    name = f"socksd-unit-{secrets.token_hex(4)}"
    (tmp_path / name).write_text("auth required pam_deny.so\naccount required pam_deny.so\n")
    return PamStore(name, cache_ttl=300, timeout=5, pam_dir=tmp_path)


@pytest.mark.parametrize(
    ("username", "password"),
    [
        (b"alice\0", b"pw"),
        (b"alice", b"pw\0junk"),
        (b"alic\xe9", b"pw"),
        (b"alice", b"p\xffw"),
        (b"", b"pw"),
        (b"alice", b""),
        (b"a" * 256, b"pw"),
        (b"alice", b"p" * 512),
    ],
)
def test_names_and_passwords_pam_cannot_take_fail_at_once(
    store: PamStore, username: bytes, password: bytes
) -> None:
    assert store.refuse(username, password) is True


def test_utf8_names_and_passwords_are_checked(store: PamStore) -> None:
    assert store.refuse("zoë".encode(), "pässword".encode()) is False
    assert store.refuse(b"a" * 255, b"p" * 511) is False


def test_a_real_pam_call_for_an_unknown_user_fails(store: PamStore) -> None:
    """pam_start, pam_authenticate and pam_end through ctypes, for real (the fallback stack:
    pam_unix on Debian, or a denial), for a user no system has."""
    assert store.check("nobody-socksd-test", store.token("x"), b"pw", "127.0.0.1") == WRONG


def test_service_names() -> None:
    assert service_error("socksd") is None
    assert service_error("socks-d_1.x") is None
    for bad in ("", "../shadow", "a/b", ".hidden", "sp ace", "nul\0"):
        assert service_error(bad) is not None, bad


def test_a_missing_service_file_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(UserStoreError) as e:
        PamStore("nosuch", cache_ttl=300, timeout=5, pam_dir=tmp_path)
    assert str(e.value).startswith(f"pam:nosuch: no PAM service file {tmp_path / 'nosuch'}")
    with pytest.raises(UserStoreError, match="PAM service name"):
        PamStore("../etc", cache_ttl=300, timeout=5, pam_dir=tmp_path)


def test_users_key_takes_a_pam_service() -> None:
    config = build_config({"users": "pam:socksd", "users_cache_ttl": 30}, {})
    assert config.users == "pam:socksd"
    assert config.users_cache_ttl == 30
    assert config.auth_methods == ("userpass",)
    assert build_config({"users": "users.htpasswd"}, {}).users == Path("users.htpasswd")
    assert build_config({}, {}).users_cache_ttl == 300


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"users": "pam:"}, "users: pam:: a PAM service name is"),
        ({"users": "pam:../x"}, "users: pam:../x: a PAM service name is"),
        ({"users": 5}, 'users: expected the path of an htpasswd file, "pam:SERVICE" or'),
        ({"users_cache_ttl": -1}, "users_cache_ttl: must be at least 0"),
        ({"users_cache_ttl": "long"}, "users_cache_ttl: expected a number"),
    ],
)
def test_users_key_errors(values: dict[str, object], error: str) -> None:
    with pytest.raises(ConfigError) as e:
        build_config(values, {})
    assert str(e.value).startswith(error)


def test_a_pam_service_in_a_config_file_is_not_a_relative_path(tmp_path: Path) -> None:
    path = tmp_path / "socksd.toml"
    path.write_text('users = "pam:socksd"\n')
    assert load_file(path)["users"] == "pam:socksd"
    path.write_text('users = "users.htpasswd"\n')
    assert load_file(path)["users"] == str(tmp_path / "users.htpasswd")


class FakeLibpam:
    """libpam's functions as ``authenticate`` calls them: records the items set, answers
    pam_authenticate with ``status``."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.items: dict[int, bytes] = {}

    def start(self, service: bytes, user: bytes, conv: object, handle: object) -> int:
        return pam.PAM_SUCCESS

    def set_item(self, handle: object, item: int, value: int | None) -> int:
        if item == pam.PAM_RHOST and value is not None:
            self.items[item] = ctypes.string_at(value)
        return pam.PAM_SUCCESS

    def authenticate(self, handle: object, flags: int) -> int:
        return self.status

    def acct_mgmt(self, handle: object, flags: int) -> int:
        return pam.PAM_SUCCESS

    def end(self, handle: object, status: int) -> int:
        return pam.PAM_SUCCESS

    def error(self, handle: object, status: int) -> str:
        return f"status {status}"


@pytest.mark.parametrize(
    ("status", "ok", "unavailable"),
    [
        (pam.PAM_SUCCESS, True, None),
        (pam.PAM_AUTH_ERR, False, None),
        (pam.PAM_USER_UNKNOWN, False, None),
        (pam.PAM_AUTHINFO_UNAVAIL, False, "pam_authenticate: status 9"),
        (pam.PAM_SYSTEM_ERR, False, "pam_authenticate: status 4"),
    ],
)
def test_a_stack_that_cannot_decide_is_unavailable_not_a_wrong_password(
    store: PamStore,
    monkeypatch: pytest.MonkeyPatch,
    status: int,
    ok: bool,
    unavailable: str | None,
) -> None:
    """PAM_AUTHINFO_UNAVAIL (a module's server unreachable) and PAM_SYSTEM_ERR say nothing of
    the password: the login path must not count them as failed logins. The client's address
    goes to the stack as PAM_RHOST."""
    lib = FakeLibpam(status)
    monkeypatch.setattr(store, "_lib", lib)
    verdict = store.check("alice", store.token("alice"), b"pw", "192.0.2.7")
    assert (verdict.ok, verdict.unavailable) == (ok, unavailable)
    assert lib.items == {pam.PAM_RHOST: b"192.0.2.7"}
