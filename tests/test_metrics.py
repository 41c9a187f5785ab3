"""The metrics settings and what one finished session or event adds (in a private registry)."""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry

from socksd.accesslog import SessionRecord, UdpStats
from socksd.config import Config, ConfigError, ListenAddress, build_config
from socksd.metrics import ServerMetrics, SessionMetrics
from socksd.protocol import ReplyCode
from socksd.server.handshake.admission import Refusal
from socksd.server.process.reload import restart_only_changes


def test_off_by_default() -> None:
    assert build_config({}, {}).metrics is None
    assert build_config({"metrics": "off"}, {}).metrics is None


@pytest.mark.parametrize("text", ["127.0.0.1:9464", "[::1]:9464", "localhost:0"])
def test_loopback_addresses_are_accepted(text: str) -> None:
    assert build_config({"metrics": text}, {}).metrics == ListenAddress.parse(text, "metrics")


@pytest.mark.parametrize("text", ["0.0.0.0:9464", "[::]:9464", "192.0.2.1:9464"])
def test_a_remote_address_needs_intent(text: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config({"metrics": text}, {})
    message = str(caught.value)
    assert message.startswith("metrics: ")
    assert "\n" not in message
    assert "--metrics-allow-remote" in message and "metrics_allow_remote = true" in message
    config = build_config({"metrics": text, "metrics_allow_remote": True}, {})
    assert config.metrics == ListenAddress.parse(text, "metrics")


def test_open_proxy_intent_is_not_metrics_intent() -> None:
    with pytest.raises(ConfigError, match=r"^metrics: "):
        build_config({"metrics": "0.0.0.0:9464", "allow_open": True}, {})


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (9464, 'metrics: expected "HOST:PORT"'),
        ("9464", "metrics: '9464' is not HOST:PORT"),
        ("127.0.0.1:99999", "metrics: port in"),
    ],
)
def test_bad_values_name_the_key(value: object, needle: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config({"metrics": value}, {})
    assert needle in str(caught.value)


def test_allow_remote_must_be_a_boolean() -> None:
    with pytest.raises(ConfigError, match=r"^metrics_allow_remote: expected true or false"):
        build_config({"metrics_allow_remote": "yes"}, {})


def test_the_endpoint_needs_a_restart() -> None:
    old = Config()
    new = Config(metrics=ListenAddress.parse("127.0.0.1:9464", "metrics"))
    assert restart_only_changes(old, new) == ["metrics: None -> 127.0.0.1:9464"]


@pytest.fixture
def metrics() -> tuple[SessionMetrics, CollectorRegistry]:
    registry = CollectorRegistry()
    server = ServerMetrics()
    registry.register(server)
    return SessionMetrics(registry, server), registry


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    found = registry.get_sample_value(name, labels)
    assert found is not None, (name, labels)
    return found


def test_a_finished_session_is_counted_from_its_record(
    metrics: tuple[SessionMetrics, CollectorRegistry],
) -> None:
    m, registry = metrics
    m.opened()
    assert value(registry, "socksd_sessions_active") == 1
    record = SessionRecord("192.0.2.1:5", time.time(), user="alice", command="CONNECT", reply=0)
    record.bytes_up, record.bytes_down = 10, 2000
    m.finished(record)
    assert value(registry, "socksd_sessions_active") == 0
    assert value(registry, "socksd_sessions_total", command="CONNECT", reply="0x00") == 1
    assert value(registry, "socksd_relayed_bytes_total", command="CONNECT", direction="up") == 10
    assert (
        value(registry, "socksd_relayed_bytes_total", command="CONNECT", direction="down") == 2000
    )
    m.opened()
    partly = SessionRecord("192.0.2.1:8", time.time(), command="CONNECT", reply=0)
    partly.bytes_up, partly.bytes_down = 100, 50
    m.finished(partly, 60, 50)  # 60 and 50 counted while it ran: only the rest now
    assert value(registry, "socksd_relayed_bytes_total", command="CONNECT", direction="up") == 50
    assert (
        value(registry, "socksd_relayed_bytes_total", command="CONNECT", direction="down") == 2000
    )
    m.opened()
    udp = SessionRecord("192.0.2.1:6", time.time(), command="UDP_ASSOCIATE", reply=0)
    udp.udp = UdpStats(4, 3, {"frag": 2, "denied": 1, "send": 0})
    m.finished(udp)
    assert value(registry, "socksd_udp_datagrams_total", direction="up") == 4
    assert value(registry, "socksd_udp_datagrams_total", direction="down") == 3
    assert value(registry, "socksd_udp_dropped_total", reason="frag") == 2
    assert value(registry, "socksd_udp_dropped_total", reason="denied") == 1
    assert registry.get_sample_value("socksd_udp_dropped_total", {"reason": "send"}) is None
    m.opened()
    m.finished(SessionRecord("192.0.2.1:7", time.time()))  # a failed login: no request
    assert value(registry, "socksd_sessions_total", command="none", reply="none") == 1
    assert value(registry, "socksd_sessions_total", command="CONNECT", reply="0x00") == 2


def test_no_client_address_or_user_becomes_a_label(
    metrics: tuple[SessionMetrics, CollectorRegistry],
) -> None:
    m, registry = metrics
    m.opened()
    m.finished(SessionRecord("192.0.2.99:5", time.time(), user="mallory", command="CONNECT"))
    text = "\n".join(f"{s.name}{s.labels}" for family in registry.collect() for s in family.samples)
    assert "192.0.2.99" not in text and "mallory" not in text


def test_refusals_are_sorted_into_denials_limits_and_throttles(
    metrics: tuple[SessionMetrics, CollectorRegistry],
) -> None:
    m, registry = metrics
    m.refusal(Refusal(ReplyCode.NOT_ALLOWED, "denied by rule 3", "3"))
    m.refusal(Refusal(None, "denied by protect_local at accept", "protect_local", log_now=True))
    m.refusal(Refusal(None, "max_sessions_per_ip", limit="max_sessions_per_ip"))
    m.refusal(Refusal(None, "blocked", limit="auth_block"))
    m.refusal(Refusal(ReplyCode.HOST_UNREACHABLE, "example.org has no address"))
    assert value(registry, "socksd_rule_denials_total", rule="3") == 1
    assert value(registry, "socksd_rule_denials_total", rule="protect_local") == 1
    assert value(registry, "socksd_limit_refusals_total", limit="max_sessions_per_ip") == 1
    assert value(registry, "socksd_limit_refusals_total", limit="max_sessions_per_user") == 0
    assert value(registry, "socksd_throttled_logins_total", limit="auth_block") == 1


def test_latencies_and_logins(metrics: tuple[SessionMetrics, CollectorRegistry]) -> None:
    m, registry = metrics
    m.handshake_done(0.003)
    m.resolved(0.02, True)
    m.resolved(5.0, False)
    m.connected(0.0004, True)
    m.auth_failed("gssapi")
    m.throttled("auth_delay")
    assert value(registry, "socksd_handshake_seconds_count") == 1
    assert value(registry, "socksd_handshake_seconds_bucket", le="0.005") == 1
    assert value(registry, "socksd_handshake_seconds_bucket", le="0.0025") == 0
    assert value(registry, "socksd_resolve_seconds_count", result="ok") == 1
    assert value(registry, "socksd_resolve_seconds_sum", result="error") == 5.0
    assert value(registry, "socksd_connect_seconds_bucket", result="ok", le="0.0005") == 1
    assert value(registry, "socksd_connect_seconds_count", result="error") == 0
    assert value(registry, "socksd_auth_failures_total", method="gssapi") == 1
    assert value(registry, "socksd_auth_failures_total", method="userpass") == 0
    assert value(registry, "socksd_throttled_logins_total", limit="auth_delay") == 1


def test_server_metrics_reloads_and_restarts(
    metrics: tuple[SessionMetrics, CollectorRegistry],
) -> None:
    m, registry = metrics
    loaded = value(registry, "socksd_config_loaded_timestamp_seconds")
    m.reloaded(False)
    assert value(registry, "socksd_config_reloads_total", result="failed") == 1
    assert value(registry, "socksd_config_loaded_timestamp_seconds") == loaded
    time.sleep(0.01)
    m.reloaded(True)
    assert value(registry, "socksd_config_reloads_total", result="ok") == 1
    assert value(registry, "socksd_config_loaded_timestamp_seconds") > loaded
    assert 0 <= value(registry, "socksd_config_age_seconds") < 60
    assert value(registry, "socksd_worker_restarts_total") == 0
    assert value(registry, "socksd_workers") == 1
    worker = SessionMetrics(CollectorRegistry(), None)
    worker.reloaded(True)  # a worker's reload is the supervisor's to count: nothing, no error
