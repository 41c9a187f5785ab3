"""Load balancers: proxy_protocol_from and advertise settings, trust, the client a header names."""

from __future__ import annotations

import pytest

from socksd.accesslog import SessionRecord, format_json, format_text
from socksd.cli import check_config_command, config_from_args, make_parser
from socksd.config import ConfigError, build_config
from socksd.protocol.proxy_header import ProxyCommand, ProxyFamily, ProxyHeader
from socksd.server.handshake.proxied import TrustedProxies, client_of

BALANCER = ("10.0.0.2", 40312)


def test_proxy_protocol_from_key_and_flag() -> None:
    config = build_config(
        {"proxy_protocol_from": ["10.0.0.0/24", "127.0.0.9", "2001:db8::/64"]}, {}
    )
    assert config.proxy_protocol_from == ("10.0.0.0/24", "127.0.0.9/32", "2001:db8::/64")
    assert build_config({"proxy_protocol_from": "10.0.0.7"}, {}).proxy_protocol_from == (
        "10.0.0.7/32",
    )
    assert build_config({}, {}).proxy_protocol_from == ()
    args = make_parser().parse_args(
        ["serve", "--proxy-protocol-from", "10.0.0.1", "--proxy-protocol-from", "10.0.1.0/24"]
    )
    assert config_from_args(args).proxy_protocol_from == ("10.0.0.1/32", "10.0.1.0/24")


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("balancer.example", "proxy_protocol_from: 'balancer.example' is not an address"),
        (["10.0.0.0/33"], "proxy_protocol_from: '10.0.0.0/33' is not an address"),
        (5, "proxy_protocol_from: expected a list of networks"),
        ([5], "proxy_protocol_from: expected a list of networks"),
        (["0.0.0.0/0"], "proxy_protocol_from: '0.0.0.0/0' is every address"),
        (["::/0"], "proxy_protocol_from: '::/0' is every address"),
    ],
)
def test_proxy_protocol_from_errors(value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config({"proxy_protocol_from": value}, {})


def test_advertise_and_its_old_name() -> None:
    assert build_config({"advertise": "[2001:DB8::1]"}, {}).advertise == "2001:db8::1"
    assert build_config({"external_address": "192.0.2.1"}, {}).advertise == "192.0.2.1"
    args = make_parser().parse_args(["serve", "--advertise", "192.0.2.3"])
    assert config_from_args(args).advertise == "192.0.2.3"
    # a flag wins over the file, whichever name either uses
    assert build_config(
        {"external_address": "192.0.2.1"}, {"advertise": "192.0.2.2"}
    ).advertise == ("192.0.2.2")
    with pytest.raises(ConfigError, match="advertise: given twice"):
        build_config({"external_address": "192.0.2.1", "advertise": "192.0.2.1"}, {})
    with pytest.raises(ConfigError, match=r"^advertise: expected the IP address"):
        build_config({"advertise": "node1.example"}, {})
    with pytest.raises(ConfigError, match=r"external_address is the old name of advertise"):
        build_config({"external_address": "0.0.0.0"}, {})


def test_trusted_proxies() -> None:
    trusted = TrustedProxies(("10.0.0.0/24", "127.0.0.9/32", "2001:db8::/64"))
    assert trusted
    assert trusted.trusts("10.0.0.255")
    assert trusted.trusts("127.0.0.9")
    assert trusted.trusts("::ffff:10.0.0.3")  # an IPv4-mapped peer on a [::] listener
    assert trusted.trusts("2001:db8::5")
    assert not trusted.trusts("10.0.1.0")
    assert not trusted.trusts("127.0.0.1")
    assert not trusted.trusts("2001:db8:0:1::5")
    assert not trusted.trusts("")
    assert not TrustedProxies()
    assert not TrustedProxies().trusts("127.0.0.9")


def test_client_of() -> None:
    proxied = ProxyHeader(2, source=("192.0.2.5", 5000), destination=("10.0.0.11", 1080))
    assert client_of(proxied, BALANCER) == ("192.0.2.5", 5000)
    mapped = ProxyHeader(1, source=("::ffff:c000:205", 5000), destination=("::1", 1080))
    assert client_of(mapped, BALANCER) == ("192.0.2.5", 5000)
    v6 = ProxyHeader(2, source=("2001:db8::5", 5000), destination=("2001:db8::1", 1080))
    assert client_of(v6, BALANCER) == ("2001:db8::5", 5000)
    # no address: the balancer's own connection (health check)
    assert client_of(ProxyHeader(2, ProxyCommand.LOCAL), BALANCER) == BALANCER
    assert client_of(ProxyHeader(1), BALANCER) == BALANCER
    assert client_of(ProxyHeader(2, family=ProxyFamily.UNIX), BALANCER) == BALANCER


def test_access_log_via() -> None:
    record = SessionRecord("192.0.2.5:5000", 0.0, command="CONNECT", reply=0)
    assert "via" not in format_json(record, 1.0)
    assert " via=" not in format_text(record, 1.0)
    record.via = "10.0.0.2:40312"
    assert '"via":"10.0.0.2:40312"' in format_json(record, 1.0)
    assert format_text(record, 1.0).endswith(" via=10.0.0.2:40312")


def test_check_config_shows_balancers(tmp_path: object, capsys: pytest.CaptureFixture[str]) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "socksd.toml"
    path.write_text(
        'proxy_protocol_from = ["10.0.0.2"]\nadvertise = "203.0.113.11"\naccess_log = "off"\n'
    )
    args = make_parser().parse_args(["check-config", str(path)])
    assert check_config_command(args) == 0
    out = capsys.readouterr().out
    assert "proxy_protocol_from: 10.0.0.2/32 (a PROXY protocol header required" in out
    assert "advertise: 203.0.113.11" in out


def test_bind_address_prefers_the_advertised_address_when_it_is_this_hosts() -> None:
    from socksd.server.commands.base import bind_address

    assert bind_address(None, "127.0.0.1") == "127.0.0.1"
    assert bind_address("127.0.0.1", "127.0.0.1") == "127.0.0.1"
    assert bind_address("127.0.0.21", "127.0.0.1") == "127.0.0.21"  # all of 127/8 is this host's
    assert bind_address("192.0.2.77", "127.0.0.1") == "127.0.0.1"  # NAT: not an address here
