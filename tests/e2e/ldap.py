"""A throwaway OpenLDAP directory for the LDAP user-store tests (Debian ``slapd``, ``ldap-utils``).

:class:`Slapd` writes a minimal ``slapd.conf`` (mdb backend, suffix ``dc=example,dc=test``, a
root DN with a password, the ``memberof`` overlay, a self-signed certificate for StartTLS and
ldaps), starts ``slapd -d 0`` as a child on loopback ports of the tests' own, loads people,
groups and a search account with ``ldapadd`` (so the overlay fills ``memberOf``), and is stopped
by its PID. Nothing outside its temporary directory is touched.

Access: the search account ``cn=socksd,ou=services`` reads everything; anyone may bind (``auth``)
but anonymous searches see nothing, so the tests also show ``[ldap] bind_dn`` is used.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from tests.helpers import free_port_base, wait_for

SLAPD = shutil.which("slapd") or "/usr/sbin/slapd"
SUFFIX = "dc=example,dc=test"
ROOT_DN = f"cn=admin,{SUFFIX}"
ROOT_PASSWORD = "root-Secret"
PEOPLE = f"ou=people,{SUFFIX}"
GROUPS = f"ou=groups,{SUFFIX}"
TEAMS = f"ou=teams,{SUFFIX}"
SERVICE_DN = f"cn=socksd,ou=services,{SUFFIX}"
SERVICE_PASSWORD = "service-Secret"


def slapd_port() -> int:
    """A free pair of loopback ports for one slapd: plain LDAP on the first, ldaps on the next."""
    return free_port_base(2)


def missing() -> str | None:
    """Why the directory cannot run here (None: it can)."""
    for tool in ("ldapadd", "ldapdelete", "slappasswd", "openssl"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (apt-get install slapd ldap-utils openssl)"
    if not os.path.exists(SLAPD):
        return "slapd is not installed (apt-get install slapd)"
    try:
        import ldap3  # noqa: F401
    except ImportError:
        return "the Python package ldap3 is not installed"
    return None


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (and localhost): (certificate, key)."""
    cert, key = directory / "ldap-cert.pem", directory / "ldap-key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


def hash_password(password: str) -> str:
    """``{SSHA}`` of ``password`` by slappasswd."""
    out = subprocess.run(
        ["slappasswd", "-s", password], check=True, capture_output=True, text=True, timeout=30
    )
    return out.stdout.strip()


class Slapd:
    """One slapd on ``127.0.0.1:port`` (plain, StartTLS) and ``port + 1`` (ldaps)."""

    def __init__(self, root: Path, port: int) -> None:
        self.root = root
        self.port = port
        self.tls_port = port + 1
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True, exist_ok=True)
        (root / "db").mkdir(exist_ok=True)
        self.cert, self.key = make_certificate(root)
        self.conf = root / "slapd.conf"
        self.conf.write_text(self._config())
        self.log = root / "slapd.log"

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    def _config(self) -> str:
        schema = "/etc/ldap/schema"
        return f"""\
include {schema}/core.schema
include {schema}/cosine.schema
include {schema}/nis.schema
include {schema}/inetorgperson.schema
modulepath /usr/lib/ldap
moduleload back_mdb
moduleload memberof
pidfile {self.root}/slapd.pid
argsfile {self.root}/slapd.args
TLSCertificateFile {self.cert}
TLSCertificateKeyFile {self.key}

database mdb
maxsize 10485760
suffix "{SUFFIX}"
rootdn "{ROOT_DN}"
rootpw {hash_password(ROOT_PASSWORD)}
directory {self.root}/db
overlay memberof
memberof-refint true
access to * by dn.exact="{SERVICE_DN}" read by self read by anonymous auth by * none
"""

    # -- the process ----------------------------------------------------------------------------

    def start(self) -> None:
        """Start slapd and wait until it accepts connections."""
        logf = self.log.open("ab")
        listen = f"ldap://127.0.0.1:{self.port}/ ldaps://127.0.0.1:{self.tls_port}/"
        self.proc = subprocess.Popen(
            [SLAPD, "-d", "0", "-f", str(self.conf), "-h", listen],
            stdout=logf,
            stderr=subprocess.STDOUT,
        )
        logf.close()
        if not wait_for(self._accepting, timeout=20):
            self.stop()
            raise RuntimeError(f"slapd did not start:\n{self.log.read_text(errors='replace')}")

    def _accepting(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"slapd exited with {self.proc.returncode}:\n{self.log.read_text(errors='replace')}"
            )
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        """Stop slapd (SIGTERM, then SIGKILL) and wait for it."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGCONT)  # in case a test paused it
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def kill(self) -> None:
        """Kill slapd at once (a directory that went down)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(5)
        self.proc = None

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections, nothing answers."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    # -- the data -------------------------------------------------------------------------------

    def _tool(self, tool: str, ldif: str | None = None, *args: str) -> None:
        argv = [tool, "-x", "-H", self.url, "-D", ROOT_DN, "-w", ROOT_PASSWORD, *args]
        out = subprocess.run(
            argv, input=ldif, capture_output=True, text=True, timeout=30, check=False
        )
        if out.returncode != 0:
            raise RuntimeError(f"{tool} failed ({out.returncode}): {out.stderr or out.stdout}")

    def add(self, ldif: str) -> None:
        """ldapadd as the root DN."""
        self._tool("ldapadd", ldif)

    def modify(self, ldif: str) -> None:
        """ldapmodify as the root DN."""
        self._tool("ldapmodify", ldif)

    def delete(self, dn: str) -> None:
        """ldapdelete as the root DN."""
        self._tool("ldapdelete", None, dn)

    def load_base(self) -> None:
        """The suffix, its three branches and the search account."""
        entries = [f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\n"
                   "dc: example\no: Example\n"]  # fmt: skip
        for ou in ("people", "groups", "teams", "services"):
            entries.append(f"dn: ou={ou},{SUFFIX}\nobjectClass: organizationalUnit\nou: {ou}\n")
        entries.append(
            f"dn: {SERVICE_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
            f"cn: socksd\nuserPassword: {hash_password(SERVICE_PASSWORD)}\n"
        )
        self.add("\n".join(entries))

    def add_user(self, uid: str, password: str) -> str:
        """A person under ou=people with ``password``; returns its DN."""
        dn = f"uid={uid},{PEOPLE}"
        self.add(
            f"dn: {dn}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {uid}\nsn: {uid}\n"
            f"userPassword: {hash_password(password)}\n"
        )
        return dn

    def add_group(self, cn: str, members: list[str], branch: str = GROUPS) -> str:
        """A groupOfNames with ``members`` (DNs); returns its DN."""
        dn = f"cn={cn},{branch}"
        lines = "".join(f"member: {m}\n" for m in members)
        self.add(f"dn: {dn}\nobjectClass: groupOfNames\ncn: {cn}\n{lines}")
        return dn
