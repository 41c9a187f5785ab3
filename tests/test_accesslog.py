"""The access-log formats: every user name reads back exactly, and none can forge a field or line."""

from __future__ import annotations

import json
import re

import pytest

from socksd.accesslog import SessionRecord, format_json, format_text, user_name

NAMES = [
    b"bob",
    b"-",
    b"a b",
    b'a"b',
    b"a\\b",
    b"\\xff",
    b"\xff",
    b"caf\xc3\xa9",
    b"eve\n2026-01-01T00:00:00.000Z 10.9.8.7:1 user=root CONNECT x:1 rep=0x00",
    b"x rep=0x00 up=1",
]


def _line(user: str | None) -> str:
    record = SessionRecord(client="127.0.0.1:5", started=100.0, user=user, command="CONNECT")
    record.target = "example.test:80"
    record.reply = 0
    return format_text(record, 101.0)


def _user_field(line: str) -> str:
    match = re.match(r'\S+ \S+ user=("(?:[^"\\]|\\.)*"|\S+) CONNECT example\.test:80 -> ', line)
    assert match, line
    return match.group(1)


def test_user_names_read_back_exactly_and_distinctly() -> None:
    seen: dict[str, bytes] = {}
    for raw in NAMES:
        name = user_name(raw)
        line = _line(name)
        assert len(line.splitlines()) == 1, line
        field = _user_field(line)
        read_back = json.loads(field) if field.startswith('"') else field
        assert read_back == name
        assert read_back.encode("utf-8", "surrogateescape") == raw
        assert field not in seen, (raw, seen.get(field))
        seen[field] = raw
    assert _user_field(_line(None)) == "-"
    assert _user_field(_line("bob")) == "bob"


@pytest.mark.parametrize("raw", [b"\xff", b"\\xff", b"-", b"a\\b"])
def test_names_that_need_it_are_quoted(raw: bytes) -> None:
    assert _user_field(_line(user_name(raw))).startswith('"')


def test_json_lines_stay_valid_json() -> None:
    for raw in NAMES:
        record = SessionRecord(client="127.0.0.1:5", started=100.0, user=user_name(raw))
        text = format_json(record, 101.0)
        assert "\n" not in text and text.isascii()
        assert json.loads(text)["user"].encode("utf-8", "surrogateescape") == raw
