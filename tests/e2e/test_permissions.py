"""Who may talk to a running daemon (issue 9; docs/api.md, "Access"): the control socket
refuses a non-root user — by its mode, and by the peer's credentials even
when the mode would let them in — unless they are in `--socket-group`; the
metrics listener is on loopback only, answers GET alone, and no TCP
listener of the daemon serves the control API, so no policy arrives over
TCP. The users are real throwaway system accounts, the clients the real
CLI run as them."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from microseg.cli import build_parser
from microseg.exporters.prometheus import parse_listen
from microseg.lab.topology import Lab

from .harness import DaemonProcess, Daemons, LabSpec

POLICY = """\
version: 1
default: allow
workloads:
  web: {addresses: [10.212.0.20, "fd00:212::20"]}
"""
HOST_ADDRESS = "10.212.0.1"  # put on the lab's bridge: a non-loopback address of this host
REFUSED = "permission denied"


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int


@pytest.fixture(scope="module")
def accounts() -> Iterator[dict[str, Account]]:
    """A group and two system users: `member` (in the group through its
    supplementary groups) and `outsider`; all deleted afterwards."""
    tag = os.urandom(3).hex()
    group, names = f"mst9g{tag}", {"member": f"mst9m{tag}", "outsider": f"mst9o{tag}"}
    subprocess.run(["groupadd", "--system", group], check=True)
    made: list[str] = []
    try:
        for role, name in names.items():
            extra = ["--groups", group] if role == "member" else []
            subprocess.run(["useradd", "--system", "--no-create-home", "--user-group",
                            "--shell", "/usr/sbin/nologin", *extra, name], check=True)
            made.append(name)
        out = {role: Account(name, int(_id("-u", name)), int(_id("-g", name)))
               for role, name in names.items()}
        out["group"] = Account(group, -1, int(_getent_gid(group)))
        yield out
    finally:
        for name in made:
            subprocess.run(["userdel", name], check=False)
        subprocess.run(["groupdel", group], check=False)


def _id(flag: str, name: str) -> str:
    return subprocess.run(["id", flag, name], capture_output=True, text=True,
                          check=True).stdout.strip()


def _getent_gid(group: str) -> str:
    return subprocess.run(["getent", "group", group], capture_output=True, text=True,
                          check=True).stdout.split(":")[2]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    """No workloads: the daemon's glob matches nothing, which it allows. The
    bridge carries HOST_ADDRESS."""
    with LabSpec([], prefix="mst9", subnet4="10.212.0.0/24", subnet6="fd00:212::/64").up() \
            as lab:
        subprocess.run(["ip", "addr", "add", f"{HOST_ADDRESS}/24", "dev", lab.bridge],
                       check=True)
        yield lab


@pytest.fixture(scope="module")
def workdirs() -> Iterator[Callable[[], Path]]:
    """Directories everyone may traverse (pytest's own are root-only), so
    it is the socket's own mode and the daemon's credential check that are
    tested, not a directory in the way."""
    made: list[Path] = []

    def make() -> Path:
        made.append(Path(tempfile.mkdtemp(prefix="mst9-")))
        made[-1].chmod(0o755)
        return made[-1]

    yield make
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def daemon(lab: Lab, workdirs: Callable[[], Path], module_daemons: Daemons) -> DaemonProcess:
    """Started as by default: no --socket-group."""
    return module_daemons.start(lab, POLICY, workdir=workdirs())


@pytest.fixture
def group_daemon(lab: Lab, workdirs: Callable[[], Path], accounts: dict[str, Account],
                 daemons: Daemons) -> DaemonProcess:
    return daemons.start(lab, POLICY, "--socket-group", accounts["group"].name,
                         workdir=workdirs())


def run_as(who: Account, argv: list[str], *, group: int | None = None,
           extra_groups: list[int] | None = None, timeout: float = 60
           ) -> subprocess.CompletedProcess[str]:
    """argv as `who`, with exactly the groups given (by default its own)."""
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd="/",
                          user=who.uid, group=who.gid if group is None else group,
                          extra_groups=extra_groups or [],
                          env={"PATH": os.environ["PATH"], "HOME": "/", "NO_COLOR": "1"})


def cli_as(who: Account, d: DaemonProcess, *args: str, **kw) -> subprocess.CompletedProcess[str]:
    return run_as(who, [sys.executable, "-m", "microseg", *args, "--socket", d.socket], **kw)


CONNECT = """\
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as e:
    sys.exit(e.__class__.__name__)
s.sendall(sys.argv[2].encode() + b" HTTP/1.0\\r\\n\\r\\n")
print(s.makefile("rb").readline().decode().strip())
"""


def raw_connect_as(who: Account, path: str, request: str = "GET /v1/status",
                   **kw) -> subprocess.CompletedProcess[str]:
    """Connect to the socket and send one request: prints the status line,
    or exits 1 with the name of the exception the connect raised."""
    return run_as(who, [sys.executable, "-c", CONNECT, path, request], **kw)


def assert_refused(r: subprocess.CompletedProcess[str]) -> None:
    """Exit 3 (missing privileges: the README's exit codes), one line on stderr, no output."""
    assert r.returncode == 3, (r.returncode, r.stderr)
    assert len(r.stderr.splitlines()) == 1 and REFUSED in r.stderr, r.stderr
    assert r.stdout == ""


def policy_state(d: DaemonProcess) -> tuple:
    p = d.status()["policy"]
    return (p["generation"], p["sha256"], p["reloads_total"], p["reload_failures_total"],
            d.policy_path.read_text())


def test_a_non_root_user_is_refused(daemon: DaemonProcess,
                                    accounts: dict[str, Account]) -> None:
    """Without --socket-group the socket is 0600 root's: a user's connect
    fails, and `stats` and `watch` exit 3 with one line."""
    d = daemon
    st = os.stat(d.socket)
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o600, 0)
    out = accounts["outsider"]
    r = raw_connect_as(out, d.socket)
    assert r.returncode == 1 and r.stderr.strip() == "PermissionError", r
    assert_refused(cli_as(out, d, "stats"))
    assert_refused(cli_as(out, d, "watch", "--json", "--last", "1", "--no-follow"))
    assert_refused(cli_as(out, d, "policy", "show"))


def test_the_daemon_checks_credentials_even_on_an_open_socket(
        daemon: DaemonProcess, accounts: dict[str, Account]) -> None:
    """Should the socket's mode ever let everyone in (a chmod by hand), the
    daemon still answers a non-root peer 403 — on every path, reload too."""
    d, out = daemon, accounts["outsider"]
    before = policy_state(d)
    os.chmod(d.socket, 0o666)
    try:
        r = raw_connect_as(out, d.socket)
        assert r.stdout.startswith("HTTP/1.0 403"), r  # the connect itself works
        r = raw_connect_as(out, d.socket, request="POST /v1/policy/reload?force=1")
        assert r.stdout.startswith("HTTP/1.0 403"), r
        assert_refused(cli_as(out, d, "stats"))
        assert_refused(cli_as(out, d, "watch", "--json", "--last", "1", "--no-follow"))
    finally:
        os.chmod(d.socket, 0o600)
    assert policy_state(d) == before


def test_socket_group_lets_its_members_in_and_no_one_else(
        group_daemon: DaemonProcess, accounts: dict[str, Account]) -> None:
    """--socket-group: the socket is 0660 root:GROUP; a member (by its
    supplementary or its primary group) uses `stats` and `watch`; the same
    user without the group, and anyone else, is refused."""
    group, d = accounts["group"], group_daemon
    st = os.stat(d.socket)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, 0, group.gid)
    member, out = accounts["member"], accounts["outsider"]
    # A member through its supplementary groups, and one through its primary group.
    for kw in ({"extra_groups": [group.gid]}, {"group": group.gid}):
        r = cli_as(member, d, "stats", "--json", **kw)
        assert r.returncode == 0, (kw, r.stderr)
        assert json.loads(r.stdout)["policy"]["generation"] == d.generation()
        r = cli_as(member, d, "watch", "--json", "--type", "policy", "--last", "1",
                   "--no-follow", **kw)
        assert r.returncode == 0 and json.loads(r.stdout)["type"] == "policy", (kw, r.stderr)
    # The same user without the group is refused, like anyone else.
    assert_refused(cli_as(member, d, "stats"))
    r = raw_connect_as(out, d.socket)
    assert r.returncode == 1 and r.stderr.strip() == "PermissionError", r
    assert_refused(cli_as(out, d, "stats"))
    assert_refused(cli_as(out, d, "watch", "--json", "--last", "1", "--no-follow"))


def test_only_root_stages_promotes_or_clears(group_daemon: DaemonProcess,
                                             accounts: dict[str, Account],
                                             workdirs: Callable[[], Path]) -> None:
    """A staged candidate decides what will be enforced, and a promote
    writes root's policy file: a --socket-group member may read `stage
    status`, never stage, promote or clear (exit 3, one line)."""
    group, d = accounts["group"], group_daemon
    member = accounts["member"]
    before = policy_state(d)
    cand = workdirs() / "allow-all.yaml"  # a file the member may read
    cand.write_text("version: 1\ndefault: allow\n")
    cand.chmod(0o644)
    r = cli_as(member, d, "policy", "stage", str(cand), extra_groups=[group.gid])
    assert r.returncode == 3 and "only root may stage a policy" in r.stderr, r
    r = cli_as(member, d, "policy", "stage", "status", "--json", extra_groups=[group.gid])
    assert r.returncode == 0 and json.loads(r.stdout) == {"staged": None}, r
    assert d.cli("policy", "stage", str(cand)).returncode == 0  # root stages
    for action in ("promote", "clear"):
        r = cli_as(member, d, "policy", "stage", action, extra_groups=[group.gid])
        assert r.returncode == 3 and "only root may" in r.stderr, (action, r)
    assert policy_state(d) == before
    assert json.loads(d.cli("policy", "stage", "status", "--json").stdout)["staged"]
    assert d.cli("policy", "stage", "clear").returncode == 0


# -- the metrics listener --------------------------------------------------

def tcp_listeners(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket in LISTEN state the process holds."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        m = re.fullmatch(r"socket:\[(\d+)\]", _readlink(f"/proc/{pid}/fd/{fd}"))
        if m:
            inodes.add(m.group(1))
    found = []
    for table, size in (("tcp", 4), ("tcp6", 16)):
        with open(f"/proc/net/{table}") as f:
            for row in list(f)[1:]:
                cols = row.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if state == "0A" and inode in inodes:  # TCP_LISTEN
                    addr, port = local.split(":")
                    found.append((_proc_net_address(addr, size), int(port, 16)))
    return found


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def _proc_net_address(hexaddr: str, size: int) -> str:
    raw = bytes.fromhex(hexaddr)
    # /proc/net/tcp* prints each 32-bit word in host (little-endian) order.
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, size, 4))
    return socket.inet_ntop(socket.AF_INET if size == 4 else socket.AF_INET6, raw)


def host_addresses(lab: Lab) -> list[str]:
    """The non-loopback addresses of this host on the lab's bridge and on
    the default route's interface, if there is one."""
    links = [lab.bridge] + [r["dev"] for r in _ip_json("route", "show", "default")]
    return [a["local"] for link in links for x in _ip_json("addr", "show", "dev", link)
            for a in x.get("addr_info", []) if a.get("scope") == "global"]


def _ip_json(*args: str) -> list[dict]:
    out = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout or "[]")


def request(port: int, method: str, path: str, body: bytes | None = None,
            host: str = "127.0.0.1") -> tuple[int, bytes]:
    c = http.client.HTTPConnection(host, port, timeout=10)
    try:
        c.request(method, path, body=body)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def test_metrics_listen_on_loopback_by_default() -> None:
    default = build_parser().parse_args(["run", "-i", "x"]).metrics
    assert parse_listen(default) == ("127.0.0.1", 9750)


def test_the_metrics_listener_is_loopback_only(daemon: DaemonProcess, lab: Lab) -> None:
    """Bound to 127.0.0.1 and nothing else: the daemon's one TCP listener;
    GET /metrics works there, and every other address of the host refuses
    the port, though it is reachable (a listener on all addresses is)."""
    d = daemon
    assert d.proc is not None
    host, port = d.status()["metrics"].rsplit(":", 1)
    assert host == "127.0.0.1"
    # The daemon's only TCP listener: this one, bound to loopback alone.
    assert tcp_listeners(d.proc.pid) == [("127.0.0.1", int(port))]
    status, body = request(int(port), "GET", "/metrics")
    assert status == 200 and b"microseg_policy_generation" in body
    addresses = host_addresses(lab)
    assert HOST_ADDRESS in addresses
    with socket.create_server(("0.0.0.0", 0)) as control:
        socket.create_connection((HOST_ADDRESS, control.getsockname()[1]), timeout=5).close()
    for addr in addresses:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((addr, int(port)), timeout=5).close()


def test_the_metrics_listener_is_read_only_and_serves_no_control_api(
        daemon: DaemonProcess) -> None:
    """Every TCP listener of the daemon (there is one: metrics) answers a
    policy sent with any method 404 or 405, has none of the control API's
    paths, and the running policy does not change."""
    d = daemon
    assert d.proc is not None
    before = policy_state(d)
    changed = POLICY.replace("default: allow", "default: deny").encode()
    paths = ["/metrics", "/", "/v1/status", "/v1/policy", "/v1/policy/reload",
             "/v1/policy/reload?force=1", "/v1/events", "/v1/sessions", "/v1/stats"]
    listeners = tcp_listeners(d.proc.pid)
    assert listeners
    for host, port in listeners:
        for path in paths:
            for method in ("POST", "PUT", "PATCH", "DELETE"):
                status, _ = request(port, method, path, body=changed, host=host)
                assert status in (404, 405), (method, path, status)
            if path.startswith("/v1/"):
                status, _ = request(port, "GET", path, host=host)
                assert status == 404, (path, status)
    assert policy_state(d) == before
