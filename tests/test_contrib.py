"""The service files in contrib/ and the Dockerfile: systemd-analyze accepts the unit (and its
low-port drop-in), the unit says what the README promises, the Dockerfile installs as the README
says, runs as non-root and checks health with ``socksd health``, compose mounts read-only, and
the container's example config is valid."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from socksd import fdlimit
from socksd.config import Config

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "contrib/systemd/socksd.service"
DROP_IN = ROOT / "contrib/systemd/socksd.service.d/low-port.conf"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "contrib/docker-compose.yml"
README = ROOT / "README.md"


def unit_settings(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> values, in order (systemd keys may repeat)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key}", []).append(value)
    return out


def installed_socksd() -> str:
    """An executable that runs socksd: the installed command, else a wrapper script."""
    return shutil.which("socksd") or ""


def _verify_copy(tmp_path: Path, with_drop_in: bool) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` on a copy of the unit whose ExecStart is this machine's socksd
    (verify insists that the program exists), optionally with the low-port drop-in."""
    program = installed_socksd()
    if not program:
        program = str(tmp_path / "socksd")
        Path(program).write_text(f'#!/bin/sh\nexec {sys.executable} -m socksd "$@"\n')
        Path(program).chmod(0o755)
    units = tmp_path / "units"
    units.mkdir()
    text = UNIT.read_text().replace("ExecStart=/usr/local/bin/socksd ", f"ExecStart={program} ")
    assert text != UNIT.read_text()
    (units / "socksd.service").write_text(text)
    if with_drop_in:
        (units / "socksd.service.d").mkdir()
        shutil.copy(DROP_IN, units / "socksd.service.d" / DROP_IN.name)
    return subprocess.run(
        ["systemd-analyze", "verify", "socksd.service"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        env={"SYSTEMD_UNIT_PATH": f"{units}:", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"},
    )


needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


@needs_systemd_analyze
@pytest.mark.parametrize("with_drop_in", [False, True])
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path, with_drop_in: bool) -> None:
    result = _verify_copy(tmp_path, with_drop_in)
    assert result.returncode == 0, result.stderr
    assert result.stdout == result.stderr == ""  # unknown keys are only warnings: none either


@needs_systemd_analyze
def test_systemd_analyze_verify_would_catch_a_mistake(tmp_path: Path) -> None:
    """The check above is not vacuous: a typo in a key makes verify speak."""
    (tmp_path / "u").mkdir()
    bad = UNIT.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict")
    (tmp_path / "u" / "socksd.service").write_text(bad)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / "u" / "socksd.service")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert "ProtectSytem" in result.stderr


def test_unit_is_notify_with_reload_and_a_graceful_stop() -> None:
    unit = unit_settings(UNIT)
    assert unit["Service.Type"] == ["notify"]
    assert unit["Service.ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["Service.KillMode"] == ["mixed"]  # SIGTERM to the supervisor only
    assert int(unit["Service.TimeoutStopSec"][0]) > Config().shutdown_timeout
    argv = shlex.split(unit["Service.ExecStart"][0])
    assert argv[1:] == ["serve", "--config", "/etc/socksd/socksd.toml"]
    assert unit["Service.ConfigurationDirectory"] == ["socksd"]


def test_unit_hardening() -> None:
    unit = unit_settings(UNIT)
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "DynamicUser": "yes",
        "CapabilityBoundingSet": "",
        "AmbientCapabilities": "",
    }.items():
        assert unit[f"Service.{key}"] == [value], key
    families = set(unit["Service.RestrictAddressFamilies"][0].split())
    assert families == {"AF_INET", "AF_INET6", "AF_UNIX", "AF_NETLINK"}
    drop_in = unit_settings(DROP_IN)
    assert drop_in["Service.CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert drop_in["Service.AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]


def test_unit_file_limit_holds_the_default_max_sessions_at_worst() -> None:
    """UDP associations hold 4 files each: the worst case of the default must fit."""
    limit = int(unit_settings(UNIT)["Service.LimitNOFILE"][0])
    worst = 4 * fdlimit.DEFAULT_MAX_SESSIONS + fdlimit.FILE_RESERVE
    assert limit >= worst
    assert fdlimit.sessions_within(limit, 1) >= fdlimit.DEFAULT_MAX_SESSIONS


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


def readme_install_command() -> str:
    """The pip command of the README's Quick start."""
    quick = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    found = re.findall(r"(python3 -m pip install \S+)", quick)
    assert found, "the README's Quick start has no pip install"
    return found[0]


def test_dockerfile_installs_with_the_readmes_command() -> None:
    commands = [
        part.strip()
        for word, rest in dockerfile_instructions()
        if word == "RUN"
        for part in rest.split("&&")
    ]
    installs = [c for c in commands if "pip install" in c]
    assert installs == [readme_install_command()]
    # and in a virtual environment, as the README says for Debian-based Pythons
    assert any(c.startswith("python3 -m venv ") for c in commands)


def test_dockerfile_runs_as_non_root_and_checks_health_with_socksd_health() -> None:
    stage = final_stage()
    assert stage[0] == ("FROM", "python:3.11-slim")
    users = [rest for word, rest in stage if word == "USER"]
    assert users, "the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    health = [rest for word, rest in stage if word == "HEALTHCHECK"]
    assert len(health) == 1
    command = json.loads(health[0].split("CMD", 1)[1])
    assert command[:2] == ["socksd", "health"]
    assert ("EXPOSE", "1080") in stage
    cmd = json.loads(next(rest for word, rest in stage if word == "CMD"))
    assert cmd == ["serve", "--config", "/etc/socksd/socksd.toml"]


def test_compose_mounts_config_and_users_read_only() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    service = compose["services"]["socksd"]
    assert service["build"] == ".."
    volumes = service["volumes"]
    targets = {v.split(":")[1]: v for v in volumes}
    assert set(targets) == {"/etc/socksd/socksd.toml", "/etc/socksd/users"}
    assert all(v.endswith(":ro") for v in volumes)
    for volume in volumes:
        assert (COMPOSE.parent / volume.split(":")[0]).name in ("socksd.toml", "users")
    assert "1080:1080" in service["ports"]


def test_the_containers_example_config_is_valid(tmp_path: Path) -> None:
    """contrib/socksd.toml as the container reads it, with a user file beside it."""
    shutil.copy(COMPOSE.parent / "socksd.toml", tmp_path / "socksd.toml")
    from socksd.auth.htpasswd import UserFile

    users = UserFile()
    users.add("alice", b"s3cret")
    users.save(tmp_path / "users")
    from socksd.cli import main

    assert main(["check-config", str(tmp_path / "socksd.toml")]) == 0


def test_the_build_context_holds_what_pip_install_needs(tmp_path: Path) -> None:
    """What .dockerignore lets through (pyproject.toml, README.md, src/) is enough to build."""
    allowed = [
        line for line in (ROOT / ".dockerignore").read_text().splitlines() if line[:1] == "!"
    ]
    assert sorted(allowed) == ["!README.md", "!pyproject.toml", "!src/"]
    context = tmp_path / "context"
    context.mkdir()
    shutil.copy(ROOT / "pyproject.toml", context)
    shutil.copy(ROOT / "README.md", context)
    shutil.copytree(ROOT / "src", context / "src", ignore=shutil.ignore_patterns("__pycache__"))
    # setuptools' own backend (what pip install runs), building the source distribution, which
    # needs every file the package build reads; offline, unlike pip's isolated build.
    build = "import setuptools.build_meta as b, sys; print(b.build_sdist(sys.argv[1]))"
    result = subprocess.run(
        [sys.executable, "-c", build, str(tmp_path / "dist")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=context,
    )
    assert result.returncode == 0, result.stderr
    sdist = tmp_path / "dist" / result.stdout.split()[-1]
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    assert any(n.endswith("src/socksd/server/process/run.py") for n in names)
    assert any(n.endswith("src/socksd/py.typed") for n in names)


def test_container_ports_agree() -> None:
    """The example config listens where EXPOSE, the compose mapping and HEALTHCHECK look."""
    import tomllib

    config = tomllib.loads((COMPOSE.parent / "socksd.toml").read_text())
    assert config["listen"] == ["0.0.0.0:1080"]
    stage = final_stage()
    health = json.loads(next(rest for word, rest in stage if word == "HEALTHCHECK").split("CMD")[1])
    assert health[2].endswith(":1080")
    assert ("EXPOSE", "1080") in stage
    service = yaml.safe_load(COMPOSE.read_text())["services"]["socksd"]
    assert service["ports"] == ["1080:1080"]


def test_every_contrib_file_the_readme_names_exists() -> None:
    named = set(re.findall(r"contrib/[\w./-]+[\w]", README.read_text()))
    assert named, "the README names no contrib file"
    for path in named - {"contrib/users"}:  # the admin makes that one (git ignores it)
        assert (ROOT / path).exists(), path
    # and every file in contrib/ is documented
    shipped = {str(p.relative_to(ROOT)) for p in (ROOT / "contrib").rglob("*") if p.is_file()}
    assert shipped <= named | {"contrib/users"}, shipped - named
