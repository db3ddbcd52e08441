"""A lab of workloads in network namespaces on one bridge.

Each workload is a namespace ``{prefix}-{name}`` whose ``eth0`` is one end
of a veth pair; the host end, named ``{prefix}-{name}``, sits on the bridge
``{prefix}br0`` (no dash: a daemon attached by the glob ``{prefix}-*`` must
not attach to the bridge). Addresses are IPv4 and IPv6 from the lab's own
subnets; nothing on the host gets an address or a route, so the lab touches
nothing else. ``down()`` removes every piece with the prefix, including the
stale leftovers of a lab that crashed, and the processes started in it.

The end-to-end tests and ``microseg demo`` both build on this. The many-hosts
lab (``microseg.lab.hosts``) builds one per simulated host: with ``netns=``
the bridge and host ends live in that namespace instead of this one, and with
``gateway=`` the bridge gets an address of the subnets that every workload
routes through by default.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Self


@dataclass(frozen=True)
class WorkloadSpec:
    name: str
    host: int  # last address byte/group: 10 gives 10.203.0.10 and fd00:203::10
    labels: dict[str, str] = field(default_factory=dict)


def _ip(*argv: str, check: bool = True,
        netns: str | None = None) -> subprocess.CompletedProcess[str]:
    where = ["-n", netns] if netns else []
    return subprocess.run(["ip", *where, *argv], check=check, capture_output=True, text=True)


class Rebuilt:
    """A lab built afresh: up() first removes what a crashed run of the
    same prefix left, and a failed build leaves nothing; `with` tears it
    down, also after a failure."""

    def __enter__(self) -> Self:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    def up(self) -> None:
        self.down()  # stale pieces of an earlier lab with this prefix
        try:
            self._build()
        except BaseException:
            self.down()
            raise

    def _build(self) -> None:
        raise NotImplementedError

    def down(self) -> None:
        raise NotImplementedError


class Lab(Rebuilt):
    def __init__(self, workloads: Sequence[WorkloadSpec], prefix: str = "msd",
                 subnet4: str = "10.203.0.0/24", subnet6: str = "fd00:203::/64", *,
                 netns: str | None = None, gateway: int | None = None,
                 ns_prefix: str | None = None) -> None:
        """netns: the namespace that holds the bridge and the host ends (it
        must exist; default: this one). gateway: the host number of an address
        on the bridge that workloads route through by default (default: none,
        and the bridge has no IPv6 at all). ns_prefix: workload namespaces are
        ``{ns_prefix}-{name}`` (default: the prefix)."""
        if len(prefix) > 6 or "-" in prefix:
            raise ValueError("lab prefix: at most 6 characters, no dash")
        self.prefix = prefix
        self.workloads = list(workloads)
        self.net4 = ipaddress.ip_network(subnet4)
        self.net6 = ipaddress.ip_network(subnet6)
        self.bridge = f"{prefix}br0"
        self.netns = netns
        self.gateway = gateway
        self.ns_prefix = ns_prefix or prefix
        self._procs: list[subprocess.Popen] = []
        if gateway is not None and any(w.host == gateway for w in self.workloads):
            raise ValueError(f"host number {gateway} is the gateway's")

    # -- names and addresses ---------------------------------------------

    def ns(self, name: str) -> str:
        return f"{self.ns_prefix}-{name}"

    def host_if(self, name: str) -> str:
        return f"{self.prefix}-{name}"[:15]

    @property
    def glob(self) -> str:
        return f"{self.prefix}-*"

    def ipv4(self, name: str) -> str:
        return self._addr4(self._spec(name).host)

    def ipv6(self, name: str) -> str:
        return self._addr6(self._spec(name).host)

    def _addr4(self, host: int) -> str:
        return str(self.net4.network_address + host)

    def _addr6(self, host: int) -> str:
        return str(self.net6.network_address + int(str(host), 16))

    def _spec(self, name: str) -> WorkloadSpec:
        for w in self.workloads:
            if w.name == name:
                return w
        raise KeyError(name)

    def ifindex(self, name: str) -> int:
        if self.netns is not None:  # this process's /sys shows its own namespace
            out = _ip("-j", "link", "show", self.host_if(name), netns=self.netns).stdout
            return int(json.loads(out)[0]["ifindex"])
        with open(f"/sys/class/net/{self.host_if(name)}/ifindex") as f:
            return int(f.read())

    # -- lifecycle ---------------------------------------------------------

    def _build(self) -> None:
        cmds = [f"link add {self.bridge} type bridge", f"link set {self.bridge} up"]
        if self.gateway is None:
            _batch(cmds, netns=self.netns)
            _sysctl(f"net.ipv6.conf.{self.bridge}.disable_ipv6", "1", netns=self.netns)
        else:
            _batch([*cmds, *self._addr_cmds(self.gateway, self.bridge)], netns=self.netns)
        for w in self.workloads:
            self._add(w)

    def _addr_cmds(self, host: int, dev: str) -> list[str]:
        # nodad: the address is usable at once, not after duplicate detection.
        return [f"addr add {self._addr4(host)}/{self.net4.prefixlen} dev {dev}",
                f"addr add {self._addr6(host)}/{self.net6.prefixlen} dev {dev} nodad"]

    def _add(self, w: WorkloadSpec) -> None:
        ns, hif = self.ns(w.name), self.host_if(w.name)
        # The host end is created down and inside a batch, so the bridge and
        # the namespace side are ready before the link comes up.
        _batch([f"netns add {ns}"])
        _batch([f"link add {hif} type veth peer name eth0 netns {ns}",
                f"link set {hif} master {self.bridge}"], netns=self.netns)
        _sysctl(f"net.ipv6.conf.{hif}.disable_ipv6", "1", netns=self.netns)
        routes = [] if self.gateway is None else [
            f"route add default via {self._addr4(self.gateway)}",
            f"route add default via {self._addr6(self.gateway)}"]
        _batch(["link set lo up", *self._addr_cmds(w.host, "eth0"), "link set eth0 up",
                *routes], netns=ns)
        _batch([f"link set {hif} up"], netns=self.netns)

    def add_workload(self, w: WorkloadSpec) -> None:
        """One more workload in a running lab (an interface appearing)."""
        self.workloads.append(w)
        self._add(w)

    def remove_workload(self, name: str) -> None:
        """Take a workload away (its interface vanishes)."""
        _ip("netns", "del", self.ns(name), check=False)
        _ip("link", "del", self.host_if(name), check=False, netns=self.netns)
        self.workloads = [w for w in self.workloads if w.name != name]

    def down(self) -> None:
        """Remove everything with this lab's prefix; never fails."""
        kill_all(self._procs)
        remove_namespaces(self.stale_namespaces())
        for link in self.stale_links():
            _ip("link", "del", link, check=False, netns=self.netns)

    def stale_namespaces(self) -> list[str]:
        return namespaces(f"{self.ns_prefix}-")

    def stale_links(self) -> list[str]:
        names = os.listdir("/sys/class/net") if self.netns is None else links(self.netns)
        return [n for n in names if n.startswith(f"{self.prefix}-") or n == self.bridge]

    # -- running things inside ----------------------------------------------

    def _argv(self, name: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(name), *argv]

    def run(self, name: str, argv: Sequence[str], timeout: float = 30,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self._argv(name, argv), capture_output=True, text=True,
                              timeout=timeout, check=check)

    def spawn(self, name: str, argv: Sequence[str], **kw) -> subprocess.Popen:
        """A long-running process in the workload's namespace; killed by down()."""
        p = subprocess.Popen(self._argv(name, argv), start_new_session=True, **kw)
        self._procs.append(p)
        return p

    def serve(self, name: str, tcp: Sequence[int] = (), udp: Sequence[int] = ()) -> None:
        """Start echo servers in a workload and wait until they listen."""
        argv = [sys.executable, "-m", "microseg.lab.traffic", "serve"]
        for p in tcp:
            argv += ["--tcp", str(p)]
        for p in udp:
            argv += ["--udp", str(p)]
        proc = self.spawn(name, argv, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"echo server in {name} failed to start")

    def probe(self, name: str, proto: str, dst: str, port: int = 0,
              timeout: float = 1.0) -> bool:
        """True when dst answers from inside workload name (tcp/udp echo, ping)."""
        if proto == "icmp":
            r = self.run(name, ["ping", "-c", "1", "-W", str(max(1, int(timeout))), dst])
            return r.returncode == 0
        r = self.run(name, [sys.executable, "-m", "microseg.lab.traffic", "probe", proto, dst,
                            str(port), "--timeout", str(timeout)])
        return r.returncode == 0


def _batch(cmds: list[str], netns: str | None = None) -> None:
    where = ["-n", netns] if netns else []
    r = subprocess.run(["ip", *where, "-batch", "-"], input="\n".join(cmds) + "\n",
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"ip -batch failed: {r.stderr.strip()}")


def _sysctl(key: str, value: str, netns: str | None = None) -> None:
    """Set a sysctl here, or in netns (net.* are per namespace: this
    process's /proc/sys shows its own); never fails."""
    if netns is not None:
        subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-qw", f"{key}={value}"],
                       capture_output=True)
        return
    path = "/proc/sys/" + key.replace(".", "/")
    with contextlib.suppress(OSError), open(path, "w") as f:
        f.write(value)


def namespaces(prefix: str) -> list[str]:
    """The named network namespaces whose name starts with prefix."""
    out = _ip("netns", "list", check=False).stdout
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return [n for n in names if n.startswith(prefix)]


def links(netns: str) -> list[str]:
    """The links in a namespace ([] if there is no such namespace)."""
    out = _ip("-j", "link", "show", check=False, netns=netns).stdout
    return [link["ifname"] for link in json.loads(out or "[]")]


def remove_namespaces(names: Iterable[str]) -> None:
    """Kill every process in these namespaces, then delete them (and with
    them every link inside); never fails."""
    for ns in names:
        pids = _ip("netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
        _ip("netns", "del", ns, check=False)


def kill_all(procs: list[subprocess.Popen]) -> None:
    """Kill what a lab started (each in a process group of its own), reap
    it, and forget it; never fails."""
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
    for p in procs:
        with contextlib.suppress(Exception):
            p.wait(timeout=5)
    procs.clear()


def wait_for(cond, timeout: float = 5.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return cond()


def iter_specs(names: Sequence[str], start: int = 10, step: int = 10) -> Iterator[WorkloadSpec]:
    for i, n in enumerate(names):
        yield WorkloadSpec(n, start + i * step)


# -- python -m microseg.lab up|down: a lab to point a daemon at by hand --------

STARTER = (WorkloadSpec("client", 10, {"role": "client"}),
           WorkloadSpec("web", 20, {"app": "shop", "tier": "web"}),
           WorkloadSpec("db", 30, {"app": "shop", "tier": "db"}))
STARTER_SERVERS = {"web": {"tcp": (80, 443), "udp": (53,)}, "db": {"tcp": (5432, 22)}}


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m microseg.lab",
        description="Build (up) or remove (down) a lab of three workloads — client, web, db "
        "— in network namespaces on one bridge, with echo servers on web (tcp 80, 443; "
        "udp 53) and db (tcp 5432, 22). Nothing else on the host is touched.")
    ap.add_argument("action", choices=["up", "down"])
    ap.add_argument("--prefix", default="msd", help="namespace/interface prefix "
                    "(default: %(default)s; interfaces are PREFIX-NAME)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("microseg.lab: needs root (network namespaces)", file=sys.stderr)
        return 3
    lab = Lab(STARTER, prefix=args.prefix)
    if args.action == "down":
        lab.down()
        print(f"lab {args.prefix} removed")
        return 0
    lab.up()
    for name, servers in STARTER_SERVERS.items():
        lab.serve(name, **servers)  # they outlive this command; `down` stops them
    print(f"lab {args.prefix} up: attach with -i '{lab.glob}'")
    for w in STARTER:
        print(f"  {w.name:7s} {lab.ipv4(w.name):15s} {lab.ipv6(w.name):18s} "
              f"netns {lab.ns(w.name)}, host interface {lab.host_if(w.name)}")
    probe = f"ip netns exec {lab.ns('client')} {sys.executable} -m microseg.lab.traffic probe"
    print(f"traffic: {probe} tcp {lab.ipv4('web')} 80\n"
          f"         {probe} udp {lab.ipv6('web')} 53\n"
          f"         ip netns exec {lab.ns('client')} ping -c1 {lab.ipv4('db')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
