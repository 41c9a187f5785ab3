"""The ``socksd`` command: ``serve`` runs the server, ``user`` manages the htpasswd user file,
``check-config`` validates a config file and prints the effective rules, ``health`` checks that a
server answers.

Every mistake on the command line or in the config file ends in one line on stderr,
``socksd: error: <what> ...; <fix>``, and exit status 2.
"""

from __future__ import annotations

import argparse
import getpass
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from socksd import __version__
from socksd.config import (
    DEFAULT_LISTEN,
    Config,
    ConfigError,
    ListenAddress,
    build_config,
    load_file,
)


def _serve_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the SOCKS5 server",
        description="Run the SOCKS5 server in the foreground. Every flag has a TOML key of the "
        "same name (dashes as underscores); flags win over the config file.",
    )
    p.add_argument("--config", type=Path, metavar="PATH", help="TOML config file")
    p.add_argument(
        "--listen",
        action="append",
        metavar="HOST:PORT",
        help=f"address to listen on, repeatable; IPv6 as [::1]:1080 "
        f"(default {DEFAULT_LISTEN}; port 0 picks a free port)",
    )
    p.add_argument(
        "--users",
        metavar="PATH|pam:SERVICE|ldap[s]://...",
        help="htpasswd file (bcrypt), pam:SERVICE for the system's PAM stack of SERVICE "
        "(/etc/pam.d/SERVICE), or an LDAP directory ldap[s]://HOST/BASE?ATTR?SCOPE?FILTER "
        "(with [ldap] in the config file); when given, username/password is required",
    )
    p.add_argument(
        "--users-cache-ttl",
        type=float,
        metavar="S",
        help="seconds a login verified by PAM is trusted without a new check (default 300)",
    )
    p.add_argument(
        "--methods",
        metavar="LIST",
        help="authentication methods in the order of preference, from gssapi, userpass, none "
        "(default: gssapi when a keytab or service is given, userpass when users are, else none)",
    )
    p.add_argument(
        "--gssapi-keytab",
        metavar="PATH",
        help="Kerberos keytab for GSSAPI (RFC 1961) authentication (default: KRB5_KTNAME)",
    )
    p.add_argument(
        "--gssapi-service",
        metavar="NAME",
        help="GSSAPI host-based service name; clients ask for NAME@<host> (default rcmd)",
    )
    p.add_argument(
        "--gssapi-levels",
        metavar="LIST",
        help="GSSAPI protection levels accepted: 1 integrity, 2 confidentiality, "
        "3 selective (default 1,2,3)",
    )
    p.add_argument(
        "--allow-open",
        action="store_const",
        const=True,
        default=None,
        help="allow no authentication on an address other machines can reach",
    )
    p.add_argument(
        "--log-format", choices=("text", "json"), help="server and access log format (default text)"
    )
    p.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), help="default info"
    )
    p.add_argument(
        "--access-log",
        metavar="DEST",
        help='where session lines go: "-" stderr (default), "off", or a file path',
    )
    p.add_argument(
        "--log-file",
        metavar="PATH",
        help='server log: "-" stderr (default; journald under systemd) or a file, '
        "reopened on SIGUSR1",
    )
    p.add_argument(
        "--handshake-timeout",
        type=float,
        metavar="S",
        help="seconds from accept to a complete request (default 10)",
    )
    p.add_argument(
        "--connect-timeout",
        type=float,
        metavar="S",
        help="seconds to connect to a target (default 10)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        metavar="S",
        help="close a session with no traffic for S seconds (default 0: never)",
    )
    p.add_argument(
        "--shutdown-timeout",
        type=float,
        metavar="S",
        help="on SIGTERM/SIGINT, seconds to let sessions finish (default 30)",
    )
    p.add_argument(
        "--resolve-timeout",
        type=float,
        metavar="S",
        help="seconds to resolve a target's name (default 5)",
    )
    p.add_argument(
        "--relay-buffer",
        type=int,
        metavar="BYTES",
        help="per-direction write buffer of a session before the other side is "
        "paused (default 262144)",
    )
    p.add_argument(
        "--splice",
        choices=("auto", "on", "off"),
        help="move plain CONNECT/BIND sessions carrying bulk data to zero-copy os.splice "
        "(Linux; default auto: where available)",
    )
    p.add_argument(
        "--max-sessions",
        type=int,
        metavar="N",
        help="concurrent sessions; more are closed at accept (default 10000)",
    )
    p.add_argument(
        "--dns",
        action="append",
        metavar="IP[:PORT]",
        help="resolve names with this DNS server instead of the system resolver; repeatable",
    )
    p.add_argument(
        "--workers",
        type=_workers,
        metavar="N",
        help="worker processes sharing the listen ports; 'auto' or 0 is one per CPU (default 1)",
    )
    p.add_argument(
        "--limits-store",
        metavar="local|host|redis://HOST:PORT/DB",
        help="where the per-address and per-user session limits and the failed-login block "
        "count: local (each process for itself; default), host (the workers of this host), "
        "or a Redis URL (every node of a fleet; ?lease=S, default 10)",
    )
    p.add_argument(
        "--commands",
        metavar="LIST",
        help="SOCKS commands served, comma-separated: connect,bind,udp (default all three); "
        "others are answered 0x07",
    )
    p.add_argument(
        "--protocols",
        metavar="LIST",
        help="protocols served on the listen ports, comma-separated: socks5,socks4,http "
        "(default socks5); told apart by the first byte",
    )
    p.add_argument(
        "--bind-timeout",
        type=float,
        metavar="S",
        help="BIND: seconds to wait for the peer's connection; then reply 0x06 (default 60)",
    )
    p.add_argument(
        "--udp-idle-timeout",
        type=float,
        metavar="S",
        help="end a UDP association with no datagram either way for S seconds "
        "(default 300; 0: never)",
    )
    p.add_argument(
        "--advertise",
        metavar="IP",
        help="this node's address clients reach, put in BIND and UDP ASSOCIATE replies (behind "
        "NAT or a load balancer); default: the local address used",
    )
    p.add_argument("--external-address", metavar="IP", help="old name of --advertise")
    p.add_argument(
        "--bind-out",
        action="append",
        metavar="IP",
        help="send to targets from this address of this host (one IPv4 and/or one IPv6: a "
        "target is reached from the one of its family, others get 0x03); repeatable; "
        "default: the kernel picks",
    )
    p.add_argument(
        "--proxy-protocol-from",
        action="append",
        metavar="CIDR",
        help="load balancers whose connections start with a PROXY protocol header (v1 or v2), "
        "required from them and refused from others; repeatable",
    )
    p.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        help="event loop (default auto: uvloop when installed)",
    )
    p.add_argument(
        "--control-socket",
        metavar="PATH",
        help="Unix socket `socksd sessions` talks to (mode 0600); 'off' for none "
        "(default: $RUNTIME_DIRECTORY/socksd.sock under systemd, else none)",
    )
    p.add_argument(
        "--control-group",
        metavar="GROUP",
        help="group that may use the control socket too (mode 0660)",
    )
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (default off; port 0: any "
        "free port, shown in the log)",
    )
    p.add_argument(
        "--metrics-allow-remote",
        action="store_const",
        const=True,
        default=None,
        help="allow a metrics address other machines can reach (the endpoint has no auth)",
    )
    access = p.add_argument_group(
        "access rules and limits ([[rules]], [groups], [bandwidth]: TOML)"
    )
    access.add_argument(
        "--default",
        choices=("allow", "deny"),
        help="action when no rule matches (default allow)",
    )
    access.add_argument(
        "--upstream",
        metavar="NAME",
        help="send every allowed request through the [upstreams] entry NAME unless its rule "
        'names another ("direct": none; default: none)',
    )
    access.add_argument(
        "--protect-local",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="deny other machines this host's own, loopback and link-local addresses unless a "
        "rule lists them in `to` (default on)",
    )
    for flag, what in (
        (
            "--max-sessions-per-ip",
            "concurrent sessions per client address; more are closed at "
            "accept (default 0: no limit)",
        ),
        (
            "--max-sessions-per-user",
            "concurrent sessions per user; more get reply 0x01 (default 0: no limit)",
        ),
        (
            "--max-auth-failures",
            "failed logins from one address (IPv6: its /64) after which each further failure "
            "from it is delayed more, and with --auth-block it is blocked (default 10; 0: off)",
        ),
        (
            "--max-auth-checks-per-ip",
            "logins of one address being checked or waiting out a failure delay at once; more "
            "are answered as failed at once (default 4; 0: no limit)",
        ),
    ):
        access.add_argument(flag, type=int, metavar="N", help=what)
    access.add_argument(
        "--auth-block-time",
        type=float,
        metavar="S",
        help="failed logins are forgotten S seconds after the last one; with --auth-block, "
        "also how long a blocked address stays blocked (default 60)",
    )
    access.add_argument(
        "--auth-delay",
        type=float,
        metavar="S",
        help="delay of the first failed-login reply of a user from an address; doubles with "
        "each further failure (default 0.5; 0: none)",
    )
    access.add_argument(
        "--max-auth-delay",
        type=float,
        metavar="S",
        help="longest failed-login delay; less than --handshake-timeout "
        "(default 5, at most half the handshake timeout)",
    )
    access.add_argument(
        "--auth-block",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also close every connection from an address at accept once it has "
        "--max-auth-failures failed logins, for --auth-block-time (default off)",
    )


def _workers(text: str) -> int:
    if text == "auto":
        return 0
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected a number of processes or 'auto'") from None
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 ('auto') or more")
    return value


def _user_parser(sub: Any) -> None:
    p = sub.add_parser(
        "user",
        help="manage the htpasswd user file",
        description="Add, delete and list users of an htpasswd file (bcrypt).",
    )
    users = p.add_subparsers(dest="user_command", required=True, metavar="{add,del,list}")
    for name, helptext in (
        ("add", "add a user or change a password"),
        ("del", "delete a user"),
        ("list", "list user names"),
    ):
        q = users.add_parser(name, help=helptext)
        q.add_argument("--users", required=True, type=Path, metavar="PATH", help="htpasswd file")
        if name != "list":
            q.add_argument("name", help="user name")
        if name == "add":
            q.add_argument(
                "--password-stdin",
                action="store_true",
                help="read the password from the first line of standard input",
            )


def _check_config_parser(sub: Any) -> None:
    p = sub.add_parser(
        "check-config",
        help="validate a config file and print the effective rules",
        description="Check a TOML config file as `socksd serve --config FILE` would (the user "
        "file included) and print the effective settings and rules, the implicit ones too. "
        "Exit status 0 when valid, 2 with one error line otherwise.",
    )
    p.add_argument("file", type=Path, metavar="FILE", help="TOML config file")


def _watch_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError("expected seconds between two refreshes") from None
    if not MIN_WATCH <= value <= MAX_WATCH:
        raise argparse.ArgumentTypeError(f"must be from {MIN_WATCH:g} to {MAX_WATCH:g} seconds")
    return value


MIN_WATCH = 0.2
MAX_WATCH = 3600.0
DEFAULT_WATCH = 2.0


def _sessions_parser(sub: Any) -> None:
    from socksd.sessionview import SORT_KEYS

    p = sub.add_parser(
        "sessions",
        help="show who is connected now (or end one session)",
        description="Ask a running server, through its control socket, for its open sessions "
        "(every worker's): id, client, user, command, target, state, bytes each way, age, idle "
        "time. Without --control-socket or --config it looks in $RUNTIME_DIRECTORY, then "
        "/run/socksd/socksd.sock.",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--control-socket", type=Path, metavar="PATH", help="the server's socket")
    where.add_argument(
        "--config", type=Path, metavar="FILE", help="the server's TOML file (its control_socket)"
    )
    p.add_argument("--json", action="store_true", help="print the server's JSON answer")
    p.add_argument(
        "--sort",
        choices=SORT_KEYS,
        default="age",
        help="table order: age (oldest first, default), bytes (most first), client, idle "
        "(longest first), id",
    )
    p.add_argument(
        "--watch",
        type=_watch_interval,
        nargs="?",
        const=DEFAULT_WATCH,
        metavar="SECONDS",
        help=f"refresh every SECONDS (default {DEFAULT_WATCH:g}) until Ctrl-C; with --json one "
        "JSON object a line",
    )
    p.add_argument("--count", type=int, metavar="N", help="with --watch: stop after N refreshes")
    p.add_argument(
        "--kill", metavar="ID", help="end the session ID (as listed) and say whether it existed"
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=15.0,
        metavar="S",
        help="seconds to wait for the server's answer (default 15)",
    )


def _health_parser(sub: Any) -> None:
    p = sub.add_parser(
        "health",
        help="check that a SOCKS5 server answers (exit 0) or not (exit 1)",
        description="Send a SOCKS5 greeting to HOST:PORT and wait for the method selection; any "
        "selection, 'no acceptable method' included, is healthy. Prints one line; exit status 0 "
        "when healthy, 1 when not. No credentials are needed or sent.",
    )
    p.add_argument(
        "address",
        nargs="?",
        default=DEFAULT_LISTEN,
        metavar="HOST:PORT",
        help=f"the server to check, IPv6 as [::1]:1080 (default {DEFAULT_LISTEN})",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds to connect and for the answer (default 5)",
    )


def health_command(args: argparse.Namespace) -> int:
    """One line on stdout, exit status 0 when a SOCKS5 server answers at ``args.address``."""
    from socksd.client import Proxy, ProxyError
    from socksd.client.probe import method_name, probe

    address = ListenAddress.parse(args.address, "address")
    try:
        method = probe(Proxy(address.host, address.port), args.timeout)
    except ProxyError as e:
        print(f"unhealthy: {e}")
        return 1
    print(f"healthy: {address} answers SOCKS5 (selects {method_name(method)})")
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="socksd", description="A SOCKS5 proxy server (RFC 1928, RFC 1929, RFC 1961)."
    )
    parser.add_argument("--version", action="version", version=f"socksd {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{serve,user,check-config,sessions,health}"
    )
    _serve_parser(sub)
    _user_parser(sub)
    _check_config_parser(sub)
    _sessions_parser(sub)
    _health_parser(sub)
    return parser


_SERVE_KEYS = (
    "listen",
    "users",
    "users_cache_ttl",
    "methods",
    "gssapi_keytab",
    "gssapi_service",
    "gssapi_levels",
    "allow_open",
    "log_format",
    "log_level",
    "access_log",
    "log_file",
    "handshake_timeout",
    "connect_timeout",
    "idle_timeout",
    "shutdown_timeout",
    "resolve_timeout",
    "relay_buffer",
    "splice",
    "max_sessions",
    "dns",
    "loop",
    "workers",
    "limits_store",
    "default",
    "protect_local",
    "max_sessions_per_ip",
    "max_sessions_per_user",
    "max_auth_failures",
    "auth_block_time",
    "auth_delay",
    "max_auth_delay",
    "max_auth_checks_per_ip",
    "auth_block",
    "commands",
    "protocols",
    "bind_timeout",
    "udp_idle_timeout",
    "advertise",
    "external_address",
    "bind_out",
    "proxy_protocol_from",
    "control_socket",
    "control_group",
    "upstream",
    "metrics",
    "metrics_allow_remote",
)


def config_from_args(args: argparse.Namespace) -> Config:
    """The effective config: file values, then flags."""
    file_values = load_file(args.config) if args.config is not None else {}
    overrides = {key: getattr(args, key) for key in _SERVE_KEYS}
    return build_config(file_values, overrides)


def _read_password(from_stdin: bool) -> bytes:
    if from_stdin:
        line = sys.stdin.buffer.readline()
        return line.rstrip(b"\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Repeat password: ") != first:
        raise ConfigError("passwords do not match; try again")
    return first.encode("utf-8")


def user_command(args: argparse.Namespace) -> int:
    from socksd.auth.htpasswd import UserFile, UserFileError

    path: Path = args.users
    try:
        users = UserFile.load(path) if path.exists() else UserFile()
        if args.user_command == "list":
            for name in users.names():
                print(name)
            return 0
        if args.user_command == "del":
            if args.name not in users.names():
                raise ConfigError(f"user {args.name!r} is not in {path}")
            users.remove(args.name)
            users.save(path)
            print(f"deleted user {args.name!r} from {path}")
            return 0
        existed = args.name in users.names()
        users.add(args.name, _read_password(args.password_stdin))
        users.save(path)
        print(f"{'updated' if existed else 'added'} user {args.name!r} in {path}")
        return 0
    except (UserFileError, ValueError) as e:
        raise ConfigError(str(e)) from None


def _control_summary(config: Config) -> str:
    """Where ``socksd sessions`` connects and who may (the group checked), for check-config."""
    from socksd.server.process.control import control_socket_path, group_id

    path = control_socket_path(config)
    if path is None:
        return "none (set control_socket for socksd sessions)"
    if config.control_group is None:
        return f"{path} (mode 0600)"
    return f"{path} (mode 0660, group {config.control_group}: gid {group_id(config.control_group)})"


PROBE_TIMEOUT = 1.0
"""Seconds ``check-config`` waits at most for a Redis limit store to answer."""


def probe_redis(url: str, timeout: float) -> tuple[dict[str, Any] | None, str]:
    """Ask the Redis at ``url`` for its ``INFO`` within ``timeout`` seconds in all (a thread
    that may be left behind, the name lookup included): (the answer, "") or (None, why not)."""
    import threading

    import redis

    answer: list[dict[str, Any] | BaseException] = []

    def ask() -> None:
        try:
            # the thread's own timeouts outlast the join: a silent Redis is always "no answer
            # within", never a race between the two bounds
            client = redis.Redis.from_url(
                url, socket_connect_timeout=timeout * 2, socket_timeout=timeout * 2
            )
            try:
                answer.append(client.info())
            finally:
                client.close()
        except Exception as e:  # any failure is "does not answer", said with its reason
            answer.append(e)

    thread = threading.Thread(target=ask, name="socksd-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    if not answer:
        return None, f"no answer within {timeout:g}s"
    result = answer[0]
    if isinstance(result, BaseException):
        return None, str(result) or type(result).__name__
    return result, ""


def _shared(config: Config) -> str:
    """Which of the configured limits a shared store counts (the others are per process)."""
    shared = []
    if config.shared_max_sessions:
        shared.append(f"max_sessions={config.shared_max_sessions} in all")
    if config.max_sessions_per_ip:
        shared.append("max_sessions_per_ip")
    if config.max_sessions_per_user:
        shared.append("max_sessions_per_user")
    if config.auth_block and config.max_auth_failures:
        shared.append("auth_block")
    if config.bandwidth:
        shared.append("[bandwidth]")
    return f"counts {', '.join(shared)}" if shared else "no limit set that it would count"


def _limits_store_summary(config: Config) -> str:
    """What ``limits_store`` shares, for check-config; for Redis, whether it answers now (within
    ``PROBE_TIMEOUT``). ConfigError for a Redis Cluster, which the store cannot use."""
    from socksd.limitstore import CLUSTER_UNSUPPORTED, is_cluster, split_lease, without_password
    from socksd.server.process.workers import worker_count

    spec = config.limits_store
    if spec == "local":
        return "local (each process counts its own sessions and failed logins)"
    if spec == "host":
        return (
            f"host (shared by the {worker_count(config)} workers of this host); {_shared(config)}"
        )
    url, lease = split_lease(spec)
    shown = without_password(url)
    info, error = probe_redis(url, PROBE_TIMEOUT)
    if info is not None and is_cluster(info):
        raise ConfigError(f"limits_store: {shown} is {CLUSTER_UNSUPPORTED}")
    where = f"{shown} (shared by every node using it; lease {lease:g}s; {_shared(config)})"
    if info is None:
        return f"{where}: does not answer now ({error}); serve admits on local limits until it does"
    return f"{where}: answers (Redis {info.get('redis_version', '?')})"


def check_config_command(args: argparse.Namespace) -> int:
    """Validate ``args.file`` and print what ``serve`` would apply (derived as serve does)."""
    from socksd.server.process.context import derive

    path: Path = args.file
    config = build_config(load_file(path), {})
    parts = derive(config)  # the user file, keytab, access log and rules, as serve builds them
    parts.close()
    control = _control_summary(config)  # checks control_group
    store = _limits_store_summary(config)  # asks a Redis store, bounded
    print(f"{path}: valid")
    print(f"listen: {', '.join(str(a) for a in config.listen)}")
    if config.protocols != ("socks5",):
        print(f"protocols: {', '.join(config.protocols)}")
    if config.metrics is not None:
        print(f"metrics: http://{config.metrics}/metrics")
    methods = []
    for method in config.auth_methods:
        if method == "userpass" and parts.users is not None:
            users = parts.users.describe()
            if math.isfinite(parts.users.cache_ttl):
                users += f", logins cached {parts.users.cache_ttl:g}s"
            methods.append(f"username/password, {users}")
        elif method == "gssapi":
            keytab = config.gssapi_keytab or "the default keytab (KRB5_KTNAME)"
            methods.append(f"GSSAPI, service {config.service}@<host> from {keytab}")
        else:
            methods.append(method)
    print(f"authentication: {'; '.join(methods)}")
    limits = [
        f"max_sessions={config.max_sessions}",
        f"max_sessions_per_ip={config.max_sessions_per_ip or 'none'}",
        f"max_sessions_per_user={config.max_sessions_per_user or 'none'}",
        f"max_auth_failures={config.max_auth_failures or 'none'}",
        f"auth_block_time={config.auth_block_time:g}s",
        f"auth_delay={config.auth_delay:g}s" if config.auth_delay else "auth_delay=none",
        f"max_auth_delay={config.effective_max_auth_delay:g}s",
        f"max_auth_checks_per_ip={config.max_auth_checks_per_ip or 'none'}",
        f"auth_block={'on' if config.auth_block else 'off'}",
        f"idle_timeout={config.idle_timeout:g}s" if config.idle_timeout else "idle_timeout=none",
    ]
    print(f"limits: {' '.join(limits)}")
    print(f"limits store: {store}")
    if config.proxy_protocol_from:
        print(
            f"proxy_protocol_from: {', '.join(config.proxy_protocol_from)} (a PROXY protocol "
            "header required from these, refused from others)"
        )
    if config.advertise:
        print(f"advertise: {config.advertise} (BND.ADDR of BIND and UDP ASSOCIATE replies)")
    if config.bind_out is not None:
        print(f"bind_out: {config.bind_out} (source addresses towards targets, one per family)")
    print(f"control socket: {control}")
    for user, rate in config.bandwidth.items():
        print(f"bandwidth: {user} {rate} bytes/s each way" if rate else f"bandwidth: {user} none")
    for name, members in config.groups.items():
        print(f"group @{name}: {', '.join(members)}")
    for spec in config.upstreams.values():
        print(spec.describe())
    print("rules (first match wins):")
    for line in parts.rules.describe():
        print(f"  {line}")
    return 0


def control_path(args: argparse.Namespace) -> Path:
    """The control socket ``socksd sessions`` asks: the flag, the config file's, systemd's
    runtime directory, ``/run/socksd/socksd.sock``; ConfigError when none is known."""
    from socksd.server.process.control import SYSTEM_SOCKET, control_socket_path

    if args.control_socket is not None:
        return Path(args.control_socket)
    config = build_config(load_file(args.config), {}) if args.config is not None else Config()
    path = control_socket_path(config)
    if path is None and config.control_socket == "off":
        raise ConfigError(f"control_socket: {args.config} turns the control socket off")
    if path is None and args.config is None and SYSTEM_SOCKET.exists():
        path = SYSTEM_SOCKET
    if path is None:
        raise ConfigError(
            "control_socket: no control socket known; give --control-socket PATH or "
            "--config FILE (the server's control_socket)"
        )
    return path


def sessions_command(args: argparse.Namespace) -> int:
    """List the open sessions of a running server, watch them, or end one (``--kill``)."""
    import json
    import time

    from socksd.server.process.control import ControlError, query
    from socksd.sessionview import LiveSession, format_table

    if args.kill is not None and args.watch is not None:
        raise ConfigError("--kill ends one session; leave out --watch")
    if args.count is not None and (args.watch is None or args.count < 1):
        raise ConfigError("--count: give a number of refreshes of at least 1, with --watch")
    path = control_path(args)
    try:
        if args.kill is not None:
            reply = query(path, {"op": "kill", "id": args.kill}, args.timeout)
            killed = bool(reply.get("killed"))
            if args.json:
                print(json.dumps({"id": args.kill, "killed": killed}))
            else:
                print(f"session {args.kill}: {'killed' if killed else 'no such session'}")
            return 0 if killed else 1
        tty = sys.stdout.isatty()
        shown = 0
        while True:
            reply = query(path, {"op": "sessions"}, args.timeout)
            if args.json:
                print(json.dumps(reply, separators=(",", ":") if args.watch else None))
            else:
                try:
                    sessions = [LiveSession.from_dict(item) for item in reply["sessions"]]
                    workers = int(reply.get("workers", 1))
                except (KeyError, TypeError, ValueError) as e:
                    raise ControlError(f"the server's answer is not understood: {e}") from None
                table = format_table(
                    sessions, sort=args.sort, workers=workers, errors=reply.get("errors", [])
                )
                if args.watch is not None:
                    if tty:
                        sys.stdout.write("\x1b[H\x1b[2J")  # clear the screen, as watch(1) does
                    elif shown:
                        print()
                    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                    print(f"{stamp}  {path}  every {args.watch:g}s (Ctrl-C ends)")
                print(table)
            sys.stdout.flush()
            shown += 1
            if args.watch is None or (args.count is not None and shown >= args.count):
                return 0
            time.sleep(args.watch)
    except ControlError as e:
        raise ConfigError(str(e)) from None
    except KeyboardInterrupt:
        return 0


def _error(message: str) -> None:
    """``socksd: error: MESSAGE`` on the console (and in ``log_file`` when serve opened one)."""
    from socksd.server.process.serverlog import console_error

    console_error(message)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``socksd`` command."""
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "user":
            return user_command(args)
        if args.command == "check-config":
            return check_config_command(args)
        if args.command == "sessions":
            return sessions_command(args)
        if args.command == "health":
            return health_command(args)
        config = config_from_args(args)
        from socksd.server import ServerContext, run

        ctx = ServerContext.create(config)
        return run(config, ctx, source=lambda: config_from_args(args))
    except ConfigError as e:
        _error(str(e))
        return 2
    except OSError as e:
        _error(f"{e.strerror or e} ({getattr(e, 'filename', '') or 'socket'})")
        return 2
    except KeyboardInterrupt:
        return 130
