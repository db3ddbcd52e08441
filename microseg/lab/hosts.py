"""Many hosts on one machine: a lab of simulated hosts, each a network
namespace with workloads of its own, joined by one wire, plus a namespace for
etcd — for the tests of daemons on several hosts sharing identities.

A daemon per host runs inside the host's namespace (``host_exec``), with a
private bpffs, and sees only that host's interfaces: its workloads' veths on
its own bridge. Traffic between workloads of two hosts leaves one workload,
is routed by its host over the wire and enters the other host, as between
real machines: each daemon knows the other host's workloads only by address,
and what those addresses are is what it has to learn from etcd.

With prefix msh and hosts a and b (default addresses; all are parameters)::

      msh-a-web               msh-b-db              workload namespaces: default
      eth0 10.245.1.10        eth0 10.245.2.20      route via .1 (::1) of their host
          |                       |
    +-----|--------------+  +-----|--------------+
    |  msha-web          |  |  mshb-db           |  host namespaces msh-ha, msh-hb:
    |  on mshabr0        |  |  on mshbbr0        |  forwarding on, and a route to
    |     10.245.1.1     |  |     10.245.2.1     |  each other host's workload
    |  wire0 10.244.0.1  |  |  wire0 10.244.0.2  |  subnet over the wire
    +-----|--------------+  +-----|--------------+
          |                       |
    +-----ha------br0-------------hb--------etcd----+  msh-fabric: a bridge,
    +-----------------------------------------|-----+  no addresses
                                          |
                                wire0 10.244.0.250 in msh-etcd:
                                etcd (microseg.lab.etcd) on :2379

IPv6 is the same with fd00:245:N::/64 per host and fd00:244::/64 on the wire.
Each host is a ``topology.Lab`` whose bridge lives in the host's namespace,
so a daemon started with ``-i 'msha-*'`` attaches to host a's workloads
only. The etcd namespace has no route to workloads: only hosts talk to it.
Nothing in the root namespace changes — no link, address, route or sysctl.
``down()`` removes every namespace with the prefix (with everything inside,
and the processes in them), also those of a run that crashed.
"""

from __future__ import annotations

import ipaddress
import os
import re
import subprocess
from collections.abc import Mapping, Sequence

from microseg.lab.etcd import Etcd
from microseg.lab.topology import (
    Lab,
    Rebuilt,
    WorkloadSpec,
    _batch,
    _sysctl,
    kill_all,
    namespaces,
    remove_namespaces,
)

IFNAMSIZ = 15  # the longest interface name Linux takes
GATEWAY = 1    # each host's bridge: .1 and ::1 of its workload subnets
ETCD_HOST = 250

# Hosts route. And no duplicate address detection on their links: while a
# link-local address is tentative, a router sends no neighbour solicitation
# for what it forwards, and IPv6 across hosts would fail for a second or two.
HOST_SYSCTLS = {"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1",
                "net.ipv6.conf.all.accept_dad": "0", "net.ipv6.conf.default.accept_dad": "0"}

# The bpffs of `ip netns exec`'s own mount namespace: private to the command
# and gone with it (ip already remounted /sys there for the namespace).
_PRIVATE_BPFFS = 'mount -t bpf bpf /sys/fs/bpf && exec "$@"'


class HostsLab(Rebuilt):
    def __init__(self, hosts: Mapping[str, Sequence[WorkloadSpec]], prefix: str = "msh",
                 wire4: str = "10.244.0.0/24", wire6: str = "fd00:244::/64",
                 sites4: str = "10.245.{n}.0/24", sites6: str = "fd00:245:{n}::/64") -> None:
        """hosts: each host's name (a few lowercase letters or digits) and its
        workloads. The Nth host (from 1) is .N (::N) on the wire, and its
        workloads' subnets are sites4 and sites6 with n=N."""
        if not re.fullmatch(r"[a-z0-9]+", prefix):
            raise ValueError("hosts lab prefix: lowercase letters and digits")
        self.prefix = prefix
        self.hosts = list(hosts)
        self.wire4 = ipaddress.ip_network(wire4)
        self.wire6 = ipaddress.ip_network(wire6)
        self.labs: dict[str, Lab] = {}
        for index, (host, workloads) in enumerate(hosts.items(), start=1):
            _check_names(prefix, host, workloads)
            self.labs[host] = Lab(workloads, prefix=f"{prefix}{host}",
                                  subnet4=sites4.format(n=index),
                                  subnet6=sites6.format(n=index),
                                  netns=self.ns(host), gateway=GATEWAY,
                                  ns_prefix=f"{prefix}-{host}")
        self._procs: list[subprocess.Popen] = []

    # -- names and addresses ---------------------------------------------

    @property
    def fabric_ns(self) -> str:
        return f"{self.prefix}-fabric"

    @property
    def etcd_ns(self) -> str:
        return f"{self.prefix}-etcd"

    def ns(self, host: str) -> str:
        return f"{self.prefix}-h{host}"

    def lab(self, host: str) -> Lab:
        return self.labs[host]

    def workload_ns(self, host: str, name: str) -> str:
        return self.labs[host].ns(name)

    def host_if(self, host: str, name: str) -> str:
        """The workload's veth end in its host's namespace."""
        return self.labs[host].host_if(name)

    def glob(self, host: str) -> str:
        """The daemon's -i on host: that host's workload veths only."""
        return self.labs[host].glob

    def ipv4(self, host: str, name: str) -> str:
        return self.labs[host].ipv4(name)

    def ipv6(self, host: str, name: str) -> str:
        return self.labs[host].ipv6(name)

    def _index(self, host: str) -> int:
        return self.hosts.index(host) + 1

    # Wire addresses read n the way WorkloadSpec.host is read: .250 and ::250.
    def _wire4(self, n: int) -> str:
        return str(self.wire4.network_address + n)

    def _wire6(self, n: int) -> str:
        return str(self.wire6.network_address + int(str(n), 16))

    def wire_ipv4(self, host: str) -> str:
        return self._wire4(self._index(host))

    def wire_ipv6(self, host: str) -> str:
        return self._wire6(self._index(host))

    @property
    def etcd_ip(self) -> str:
        return self._wire4(ETCD_HOST)

    @property
    def etcd_ipv6(self) -> str:
        return self._wire6(ETCD_HOST)

    def etcd(self, tls: bool = False) -> Etcd:
        """An etcd member (not started) on etcd_ip in the etcd namespace."""
        return Etcd(self.etcd_ip, netns=self.etcd_ns, tls=tls)

    # -- lifecycle ---------------------------------------------------------

    def _build(self) -> None:
        members = {self.ns(h): f"h{h}" for h in self.hosts} | {self.etcd_ns: "etcd"}
        _batch([f"netns add {ns}" for ns in (self.fabric_ns, *members)])
        # Before any link is made in them: new links take these as defaults.
        for host in self.hosts:
            for key, value in HOST_SYSCTLS.items():
                _sysctl(key, value, netns=self.ns(host))
        # The fabric is a switch: no IPv6 of its own, so nothing of it on the wire.
        _sysctl("net.ipv6.conf.all.disable_ipv6", "1", netns=self.fabric_ns)
        cmds = ["link add br0 type bridge", "link set br0 up"]
        for ns, end in members.items():
            cmds += [f"link add {end} type veth peer name wire0 netns {ns}",
                     f"link set {end} master br0", f"link set {end} up"]
        _batch(cmds, netns=self.fabric_ns)
        _batch(self._wire_cmds(ETCD_HOST), netns=self.etcd_ns)
        for host in self.hosts:
            self._build_host(host)

    def _wire_cmds(self, n: int) -> list[str]:
        return ["link set lo up",
                f"addr add {self._wire4(n)}/{self.wire4.prefixlen} dev wire0",
                f"addr add {self._wire6(n)}/{self.wire6.prefixlen} dev wire0 nodad",
                "link set wire0 up"]

    def _build_host(self, host: str) -> None:
        routes = []
        for other in self.hosts:
            if other != host:
                lab = self.labs[other]
                routes += [f"route add {lab.net4} via {self.wire_ipv4(other)}",
                           f"route add {lab.net6} via {self.wire_ipv6(other)}"]
        _batch([*self._wire_cmds(self._index(host)), *routes], netns=self.ns(host))
        self.labs[host].up()

    def down(self) -> None:
        """Remove everything with this lab's prefix; never fails."""
        kill_all(self._procs)
        for lab in self.labs.values():
            lab.down()
        remove_namespaces(self.stale_namespaces())

    def stale_namespaces(self) -> list[str]:
        return namespaces(f"{self.prefix}-")

    def stale_links(self) -> list[str]:
        """Links named like this lab's in this (the root) namespace: there
        should never be any, the lab lives in its namespaces."""
        mine = (f"{self.prefix}-", *(f"{lab.prefix}-" for lab in self.labs.values()))
        bridges = {lab.bridge for lab in self.labs.values()}
        return [n for n in os.listdir("/sys/class/net") if n.startswith(mine) or n in bridges]

    # -- running things inside ----------------------------------------------

    def host_exec(self, host: str, argv: Sequence[str]) -> list[str]:
        """argv run in host's namespace with a bpffs of its own on
        /sys/fs/bpf: empty at the start, invisible outside, gone at the end."""
        return ["ip", "netns", "exec", self.ns(host), "sh", "-c", _PRIVATE_BPFFS, "sh", *argv]

    def run_host(self, host: str, argv: Sequence[str],
                 timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.host_exec(host, argv), capture_output=True, text=True,
                              timeout=timeout)

    def spawn_host(self, host: str, argv: Sequence[str], **kw) -> subprocess.Popen:
        """A long-running process on host (host_exec's); killed by down()."""
        p = subprocess.Popen(self.host_exec(host, argv), start_new_session=True, **kw)
        self._procs.append(p)
        return p

    def run(self, host: str, name: str, argv: Sequence[str], timeout: float = 30,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        return self.labs[host].run(name, argv, timeout=timeout, check=check)

    def spawn(self, host: str, name: str, argv: Sequence[str], **kw) -> subprocess.Popen:
        return self.labs[host].spawn(name, argv, **kw)

    def serve(self, host: str, name: str, tcp: Sequence[int] = (),
              udp: Sequence[int] = ()) -> None:
        self.labs[host].serve(name, tcp=tcp, udp=udp)

    def probe(self, host: str, name: str, proto: str, dst: str, port: int = 0,
              timeout: float = 1.0) -> bool:
        return self.labs[host].probe(name, proto, dst, port, timeout=timeout)


def _check_names(prefix: str, host: str, workloads: Sequence[WorkloadSpec]) -> None:
    if not re.fullmatch(r"[a-z0-9]+", host) or len(prefix + host) > 6:
        raise ValueError(f"host {host!r}: lowercase letters and digits, at most "
                         f"{6 - len(prefix)} of them with prefix {prefix!r}")
    for w in workloads:
        hif = f"{prefix}{host}-{w.name}"
        if len(hif) > IFNAMSIZ:
            raise ValueError(f"workload {w.name!r} on host {host!r}: its interface {hif!r} "
                             f"is longer than {IFNAMSIZ} characters")
