"""The ``socksd`` command: ``serve`` runs the server, ``user`` manages the htpasswd user file.

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
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        help="event loop (default auto: uvloop when installed)",
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


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="socksd", description="A SOCKS5 proxy server (RFC 1928, RFC 1929, RFC 1961)."
    )
    parser.add_argument("--version", action="version", version=f"socksd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{serve,user}")
    _serve_parser(sub)
    _user_parser(sub)
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``socksd`` command."""
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "user":
            return user_command(args)
        config = config_from_args(args)
        from socksd.auth.htpasswd import UserFileError
        from socksd.server import build_context, run

        try:
            ctx = build_context(config)
        except UserFileError as e:
            raise ConfigError(f"users: {e}") from None
        return run(config, ctx)
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
