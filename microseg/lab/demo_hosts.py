"""`microseg demo --hosts 2`: two hosts sharing identities through one etcd
(docs/many-hosts.md), live.

Host a runs client, web and db; host b runs api and a rogue. Each host runs
its own daemon, on its own policy file, and publishes its workloads to etcd
(TLS with client certificates). Host a's rules select by labels. So api's
connections to db are allowed on a, because b published api's labels there.
The rogue's are denied, and a's verdicts name it although it lives on b.
`top` shows host a's daemon.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

from microseg.lab.demo import STATE_DIR, DaemonLog, demo_socket
from microseg.lab.etcd import Etcd
from microseg.lab.hosts import HostsLab
from microseg.lab.topology import WorkloadSpec

PREFIX = "msm"
HOSTS = {"a": [WorkloadSpec("client", 10, {"role": "client"}),
               WorkloadSpec("web", 20, {"app": "shop", "tier": "web"}),
               WorkloadSpec("db", 30, {"app": "shop", "tier": "db"})],
         "b": [WorkloadSpec("api", 10, {"app": "shop", "tier": "api"}),
               WorkloadSpec("rogue", 20, {"role": "unknown"})]}
SERVERS = {("a", "web"): {"tcp": (80,)}, ("a", "db"): {"tcp": (5432,)},
           ("b", "api"): {"tcp": (8080,)}}

RULES = {"a": """\
  - name: client-to-web
    from: {labels: {role: client}}
    to: {labels: {tier: web}}
    protocol: tcp
    ports: [80]
    action: allow
  - name: web-to-api        # api lives on host b: known here through etcd
    from: {labels: {tier: web}}
    to: {labels: {tier: api}}
    protocol: tcp
    ports: [8080]
    action: allow
  - name: api-to-db         # from host b
    from: {labels: {tier: api}}
    to: {labels: {tier: db}}
    protocol: tcp
    ports: [5432]
    action: allow
""", "b": """\
  - name: web-to-api        # web lives on host a
    from: {labels: {tier: web}}
    to: {labels: {tier: api}}
    protocol: tcp
    ports: [8080]
    action: allow
  - name: out               # host b lets its workloads out: host a judges them
    from: [{labels: {tier: api}}, {labels: {role: unknown}}]
    to: any
    action: allow
"""}

HEADER = """\
# The microseg two-host demo: host {host}'s policy. Edit me: the daemon of
# host {host} applies every save. Its workloads are published to etcd; the
# other host's arrive from there, and rules select them by labels.
"""


def policy_text(lab: HostsLab, host: str) -> str:
    workloads = "\n".join(
        f"  {w.name}:\n    labels: {json.dumps(w.labels)}\n"
        f"    addresses: [{lab.ipv4(host, w.name)}, \"{lab.ipv6(host, w.name)}\"]"
        for w in HOSTS[host])
    return (HEADER.format(host=host) + f"version: 1\nmode: enforce\ndefault: deny\n"
            f"workloads:\n{workloads}\nrules:\n{RULES[host]}")


def traffic(lab: HostsLab) -> dict[tuple[str, str], list[str]]:
    ip4, ip6 = lab.ipv4, lab.ipv6
    return {("a", "client"): [f"tcp,{ip4('a', 'web')},80,2",
                              f"tcp,{ip4('a', 'db')},5432,1"],   # denied: default
            ("a", "web"): [f"tcp,{ip4('b', 'api')},8080,2", f"tcp,{ip6('b', 'api')},8080,1"],
            ("b", "api"): [f"tcp,{ip4('a', 'db')},5432,3", f"tcp,{ip6('a', 'db')},5432,1"],
            ("b", "rogue"): [f"tcp,{ip4('a', 'db')},5432,2",    # denied on host a
                             f"tcp,{ip4('a', 'web')},80,1"]}


class HostsDemo:
    """The two-host lab, its etcd and its daemons; up() then down()."""

    def __init__(self, policy_path: Path, socket_path: str | None, metrics: str) -> None:
        self.lab = HostsLab(HOSTS, prefix=PREFIX)
        self.policy_path = policy_path  # host a's; host b's beside it
        self.socket = socket_path
        self.metrics = metrics
        self.etcd: Etcd | None = None
        self.daemons: dict[str, DaemonLog] = {}

    def policy_of(self, host: str) -> Path:
        p = self.policy_path
        return p if host == "a" else p.with_name(f"{p.stem}-host-{host}{p.suffix}")

    def socket_of(self, host: str) -> str:
        assert self.socket is not None
        return self.socket if host == "a" else str(STATE_DIR / f"host-{host}.sock")

    def clear_stale(self) -> None:
        for host in HOSTS:
            DaemonLog(STATE_DIR, f"host-{host}").clear_stale()
        self.lab.down()

    def up(self, say) -> None:
        self.clear_stale()
        self.socket = self.socket or demo_socket()
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self.lab.up()
        self.etcd = self.lab.etcd(tls=True)
        self.etcd.start()
        say(f"lab: hosts a and b (namespaces {PREFIX}-ha, {PREFIX}-hb) on one wire; etcd at "
            f"{self.etcd.endpoint} with client certificates")
        for (host, name), servers in SERVERS.items():
            self.lab.serve(host, name, **servers)
        e = self.etcd
        for host in HOSTS:
            path = self.policy_of(host)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(policy_text(self.lab, host))
            argv = [sys.executable, "-m", "microseg", "run", "-i", self.lab.glob(host),
                    "--policy", str(path), "--socket", self.socket_of(host),
                    "--metrics", self.metrics, "--flow-log", str(STATE_DIR / f"flow-{host}.log"),
                    "--etcd", e.endpoint, "--node", host, "--etcd-ttl", "10",
                    "--etcd-cacert", str(e.cacert), "--etcd-cert", str(e.cert),
                    "--etcd-key", str(e.key)]
            d = self.daemons[host] = DaemonLog(STATE_DIR, f"host-{host}")
            d.start(self.lab.host_exec(host, argv), self.socket_of(host))
        for host, d in self.daemons.items():
            d.wait_ready()
            say(f"host {host}: daemon on {self.lab.glob(host)}, policy {self.policy_of(host)}, "
                f"socket {self.socket_of(host)}")
        for (host, name), targets in traffic(self.lab).items():
            self.lab.spawn(host, name, [sys.executable, "-m", "microseg.lab.traffic", "mix",
                                        *targets, "--interval", "0.25"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        say("traffic: web (a) -> api (b), api (b) -> db (a) allowed by labels published in "
            "etcd; rogue (b) -> db (a) denied on host a")

    def down(self) -> None:
        """Traffic, daemons (each withdraws its workloads), etcd, the lab.
        Never raises. The daemons go first: a clean stop revokes a lease over
        the wire."""
        for d in self.daemons.values():
            d.stop()
        if self.etcd is not None:
            self.etcd.close()
        with contextlib.suppress(Exception):
            self.lab.down()
