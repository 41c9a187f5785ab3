"""The ``socksd`` command: ``serve`` runs the server, ``user`` manages the htpasswd user file,
``check-config`` validates a config file and prints the effective rules.

Every mistake on the command line or in the config file ends in one line on stderr,
``socksd: error: <what> ...; <fix>``, and exit status 2.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from socksd import __version__
from socksd.config import DEFAULT_LISTEN, Config, ConfigError, build_config, load_file


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
        metavar="PATH",
        help="htpasswd file (bcrypt); when given, username/password is required",
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
        "--commands",
        metavar="LIST",
        help="SOCKS commands served, comma-separated: connect,bind,udp (default all three); "
        "others are answered 0x07",
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
        "--external-address",
        metavar="IP",
        help="address advertised in BIND and UDP ASSOCIATE replies (behind NAT); "
        "default: the local address used",
    )
    p.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        help="event loop (default auto: uvloop when installed)",
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


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="socksd", description="A SOCKS5 proxy server (RFC 1928, RFC 1929, RFC 1961)."
    )
    parser.add_argument("--version", action="version", version=f"socksd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{serve,user,check-config}")
    _serve_parser(sub)
    _user_parser(sub)
    _check_config_parser(sub)
    return parser


_SERVE_KEYS = (
    "listen",
    "users",
    "methods",
    "gssapi_keytab",
    "gssapi_service",
    "gssapi_levels",
    "allow_open",
    "log_format",
    "log_level",
    "access_log",
    "handshake_timeout",
    "connect_timeout",
    "idle_timeout",
    "shutdown_timeout",
    "resolve_timeout",
    "relay_buffer",
    "max_sessions",
    "dns",
    "loop",
    "workers",
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
    "bind_timeout",
    "udp_idle_timeout",
    "external_address",
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


def check_config_command(args: argparse.Namespace) -> int:
    """Validate ``args.file`` and print what ``serve`` would apply (derived as serve does)."""
    from socksd.server.process.context import derive

    path: Path = args.file
    config = build_config(load_file(path), {})
    parts = derive(config)  # the user file, keytab, access log and rules, as serve builds them
    parts.close()
    print(f"{path}: valid")
    print(f"listen: {', '.join(str(a) for a in config.listen)}")
    if config.metrics is not None:
        print(f"metrics: http://{config.metrics}/metrics")
    methods = []
    for method in config.auth_methods:
        if method == "userpass" and parts.users is not None:
            methods.append(f"username/password, {len(parts.users.users)} users in {config.users}")
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
    for user, rate in config.bandwidth.items():
        print(f"bandwidth: {user} {rate} bytes/s each way" if rate else f"bandwidth: {user} none")
    for name, members in config.groups.items():
        print(f"group @{name}: {', '.join(members)}")
    print("rules (first match wins):")
    for line in parts.rules.describe():
        print(f"  {line}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``socksd`` command."""
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "user":
            return user_command(args)
        if args.command == "check-config":
            return check_config_command(args)
        config = config_from_args(args)
        from socksd.server import ServerContext, run

        ctx = ServerContext.create(config)
        return run(config, ctx, source=lambda: config_from_args(args))
    except ConfigError as e:
        print(f"socksd: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(
            f"socksd: error: {e.strerror or e} ({getattr(e, 'filename', '') or 'socket'})",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        return 130
