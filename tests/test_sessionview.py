"""The live-sessions view: JSON objects both ways, sorting, sizes and durations, the table."""

from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from socksd.sessionview import (
    LiveSession,
    format_table,
    human_bytes,
    human_duration,
    sort_sessions,
    table_row,
)


def live(
    id: str = "0-1",
    *,
    client: str = "127.0.0.1:40000",
    user: str | None = "alice",
    command: str | None = "CONNECT",
    target: str | None = "example.org:443",
    state: str = "relaying",
    age: float = 10.0,
    idle: float | None = 1.0,
    up: int = 100,
    down: int = 2000,
    udp: dict[str, object] | None = None,
) -> LiveSession:
    return LiveSession(
        id=id,
        worker=int(id.split("-", maxsplit=1)[0].split(".", maxsplit=1)[0]),
        client=client,
        user=user,
        command=command,
        target=target,
        remote="192.0.2.1:443" if state == "relaying" else None,
        state=state,
        started=1_800_000_000.25,
        age=age,
        idle=idle,
        bytes_up=up,
        bytes_down=down,
        udp=udp,
    )


def test_json_object_has_the_documented_keys_and_reads_back() -> None:
    udp = {"datagrams_up": 3, "datagrams_down": 2, "dropped": {"source": 1}}
    session = live("1-7", state="udp", command="UDP_ASSOCIATE", udp=udp, idle=None)
    data = json.loads(json.dumps(session.as_dict()))
    assert set(data) == {
        "id", "worker", "client", "user", "command", "target", "remote", "state", "started",
        "started_unix", "age", "idle", "bytes_up", "bytes_down", "udp", "protocol",
    }  # fmt: skip
    assert data["started"] == "2027-01-15T08:00:00.250Z"
    assert data["idle"] is None and data["udp"] == udp and data["worker"] == 1
    assert LiveSession.from_dict(data) == session


@pytest.mark.parametrize(
    "broken",
    [{}, {"id": 5}, {"id": "0-1", "worker": "x"}, {"id": "0-1", "client": None}],
)
def test_malformed_session_object_is_a_value_error(broken: dict[str, object]) -> None:
    data = {**live().as_dict(), **broken} if broken else {}
    with pytest.raises(ValueError):
        LiveSession.from_dict(data)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (150 * 1024, "150 KiB"),
        (5 * 1024**3 + 1, "5.0 GiB"),
        (3 * 1024**6, "3072 PiB"),
    ],
)
def test_human_bytes(n: int, text: str) -> None:
    assert human_bytes(n) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "-"),
        (-0.01, "0.0s"),
        (0.44, "0.4s"),
        (45.9, "45s"),
        (185, "3m05s"),
        (2 * 3600 + 3 * 60 + 59, "2h03m"),
        (4 * 86400 + 2 * 3600, "4d02h"),
    ],
)
def test_human_duration(seconds: float | None, text: str) -> None:
    assert human_duration(seconds) == text


def test_sort_orders() -> None:
    a = live("0-1", client="10.0.0.2:1", age=5, up=1, down=1, idle=0.0)
    b = live("1-1", client="10.0.0.1:1", age=50, up=10, down=10_000, idle=None)
    c = live("0-10", client="10.0.0.3:1", age=20, up=0, down=500, idle=30.0)
    d = live("1.2-1", client="10.0.0.4:1", age=1, up=0, down=0, idle=0.5)
    sessions = [a, b, c, d]
    ids = lambda key: [s.id for s in sort_sessions(sessions, key)]  # noqa: E731
    assert ids("age") == ["1-1", "0-10", "0-1", "1.2-1"]
    assert ids("bytes") == ["1-1", "0-10", "0-1", "1.2-1"]
    assert ids("client") == ["1-1", "0-1", "0-10", "1.2-1"]
    assert ids("idle") == ["0-10", "1.2-1", "0-1", "1-1"]  # unknown idle last
    assert ids("id") == ["0-1", "0-10", "1-1", "1.2-1"]


def test_table_has_a_header_one_line_per_session_and_a_summary() -> None:
    sessions = [
        live("0-1", age=3725, up=1536, down=5 * 1024 * 1024, idle=0.2),
        live("1-4", user=None, command="UDP_ASSOCIATE", target="0.0.0.0:0", state="udp", age=9),
        live("0-2", command=None, target=None, state="handshake", age=0.5, up=0, down=0),
    ]
    lines = format_table(sessions, workers=2).splitlines()
    assert lines[0].split() == [
        "ID", "CLIENT", "USER", "COMMAND", "TARGET", "STATE", "UP", "DOWN", "AGE", "IDLE",
    ]  # fmt: skip
    assert lines[1].split() == [
        "0-1", "127.0.0.1:40000", "alice", "CONNECT", "example.org:443", "relaying",
        "1.5", "KiB", "5.0", "MiB", "1h02m", "0.2s",
    ]  # fmt: skip
    assert lines[2].split()[:6] == ["1-4", "127.0.0.1:40000", "-", "UDP", "0.0.0.0:0", "udp"]
    assert lines[3].split()[:6] == ["0-2", "127.0.0.1:40000", "alice", "-", "-", "handshake"]
    assert lines[4] == "3 sessions (2 workers), 1.6 KiB up, 5.0 MiB down"
    assert len(lines) == 5
    # columns line up: every row's AGE ends where the header's does
    end = lines[0].index("AGE") + 3
    assert all(line[end - 1] != " " for line in lines[1:4])


def test_table_quotes_what_a_client_chose() -> None:
    evil = live(user="\x1b[2Jroot\nfake line", target="a b:80")
    table = format_table([evil])
    assert "\x1b" not in table and "fake line\n" not in table
    assert '"\\u001b[2Jroot\\nfake line"'[:15] in table
    assert '"a b:80"' in table
    assert len(table.splitlines()) == 3


def test_table_cuts_long_targets_and_names_incomplete_answers() -> None:
    long = live(target="x" * 200 + ".example:443")
    table = format_table([long], errors=["worker 1: no answer within 5s"])
    row = table.splitlines()[1]
    assert "…" in row and "x" * 60 not in row
    assert table.splitlines()[-1] == "incomplete: worker 1: no answer within 5s"
    assert "1 session (1 worker)" in table


def test_empty_table() -> None:
    assert format_table([]).splitlines() == [
        "ID  CLIENT  USER  COMMAND  TARGET  STATE  UP  DOWN  AGE  IDLE",
        "0 sessions (1 worker), 0 B up, 0 B down",
    ]


_values = (
    st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.lists(st.integers())
)


@given(st.dictionaries(st.sampled_from(sorted(live().as_dict())), _values))
@example({"age": float("inf")})
@example({"idle": float("nan")})
@example({"bytes_up": 1e300})
@example({"worker": True})
@example({"started_unix": "1"})
def test_any_object_reads_as_a_session_or_a_value_error(changes: dict[str, object]) -> None:
    """What a server answers is read back or refused with ValueError, never another error."""
    data = {**live().as_dict(), **changes}
    try:
        session = LiveSession.from_dict(data)
    except ValueError:
        return
    format_table([session])  # and a session read back can always be shown


def test_table_and_json_say_the_protocol_unless_socks5() -> None:
    socks5 = live("0-1")
    http = dataclasses.replace(live("0-2"), protocol="http")
    assert table_row(socks5)[3] == "CONNECT"
    assert table_row(http)[3] == "CONNECT/http"
    data = json.loads(json.dumps(http.as_dict()))
    assert data["protocol"] == "http"
    assert LiveSession.from_dict(data) == http
