"""Two hosts sharing identities and one policy through a real etcd with TLS
client certificates (docs/many-hosts.md), proven with real traffic across
the wire between two simulated hosts (microseg/lab/hosts.py), a daemon in
each with a bpffs of its own.

Host a runs db and web; host b runs api and rogue. Host a's rule allows
{app: api} to {tier: db}: api's packets are allowed on a only because b
published api's labels; rogue's are denied.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from microseg.lab.etcd import Etcd
from microseg.lab.hosts import HostsLab
from microseg.lab.topology import WorkloadSpec, wait_for

from .harness import DaemonProcess, Daemons

PREFIX = "msh"
TTL = 5
HOSTS = {"a": [WorkloadSpec("db", 10, {"tier": "db"}), WorkloadSpec("web", 20, {"tier": "web"})],
         "b": [WorkloadSpec("api", 10, {"app": "api"}),
               WorkloadSpec("rogue", 20, {"app": "rogue"})]}


def local_policy(lab: HostsLab, host: str, rules: str, default: str) -> str:
    """A host's own policy file: its workloads (published to the others)."""
    ws = "\n".join(f"  {w.name}: {{addresses: [{lab.ipv4(host, w.name)}, "
                   f"\"{lab.ipv6(host, w.name)}\"], labels: {json.dumps(w.labels)}}}"
                   for w in HOSTS[host])
    return f"version: 1\ndefault: {default}\nworkloads:\n{ws}\nrules:\n{rules}"


A_RULES = """\
  - name: api-to-db
    from: {labels: {app: api}}
    to: {labels: {tier: db}}
    protocol: tcp
    ports: [5432]
    action: allow
"""
B_RULES = """\
  - name: out
    from: any
    to: any
    action: allow
"""


class HostDaemon(DaemonProcess):
    """`microseg run` inside a lab host, with a private bpffs, on etcd."""

    def __init__(self, workdir: Path, lab: HostsLab, host: str, etcd: Etcd,
                 policy: str | None, *extra: str) -> None:
        self.hosts, self.host, self.etcd = lab, host, etcd
        super().__init__(workdir, lab.lab(host), policy, *extra)

    def argv(self) -> list[str]:
        e = self.etcd
        cluster = ["--etcd", e.endpoint, "--node", self.host, "--etcd-ttl", str(TTL),
                   "--etcd-cacert", str(e.cacert), "--etcd-cert", str(e.cert),
                   "--etcd-key", str(e.key)]
        argv = super().argv()
        argv[argv.index("-i") + 1] = self.hosts.glob(self.host)
        if "--policy" in self.extra:  # --policy etcd
            i = argv.index("--policy")
            del argv[i:i + 2]
        return self.hosts.host_exec(self.host, [*argv, *cluster])

    def rows(self, *args: str) -> list[dict]:
        out = self.cli(*args, "--json")
        assert out.returncode == 0, out.stderr
        return [orjson.loads(line) for line in out.stdout.splitlines()]

    def workload_names(self) -> set[str]:
        return {f"{r['workload']}@{r['node']}" for r in self.rows("workloads")}

    def events(self, **match: object) -> list[dict]:
        out = []
        for line in self.flow_log.read_bytes().splitlines():
            e = orjson.loads(line)
            if all(e.get(k) == v for k, v in match.items()):
                out.append(e)
        return out


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[HostsLab, Etcd]]:
    with HostsLab(HOSTS, prefix=PREFIX) as hosts:
        etcd = hosts.etcd(tls=True)
        try:
            etcd.start()
            hosts.serve("a", "db", tcp=[5432])
            yield hosts, etcd
        finally:
            etcd.close()
    assert hosts.stale_namespaces() == [] and hosts.stale_links() == []


@pytest.fixture
def daemons(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemons]:
    made = Daemons(lambda: tmp_path_factory.mktemp("host"))
    try:
        yield made
    finally:
        made.close()


def start(daemons: Daemons, lab: HostsLab, etcd: Etcd, host: str, policy: str | None,
          *extra: str) -> HostDaemon:
    d = HostDaemon(daemons._workdir(), lab, host, etcd, policy, *extra)
    daemons._made.append(d)
    d.start(timeout=30)
    return d


def connects(lab: HostsLab, who: str) -> bool:
    return lab.probe("b", who, "tcp", lab.ipv4("a", "db"), 5432)


def test_a_rule_on_one_host_judges_a_workload_of_the_other(
        lab: tuple[HostsLab, Etcd], daemons: Daemons) -> None:
    hosts, etcd = lab
    a = start(daemons, hosts, etcd, "a", local_policy(hosts, "a", A_RULES, "deny"))
    b = start(daemons, hosts, etcd, "b", local_policy(hosts, "b", B_RULES, "deny"))
    assert wait_for(lambda: {"api@b", "rogue@b"} <= a.workload_names(), timeout=5), \
        a.rows("workloads")
    assert {"db@a", "web@a"} <= b.workload_names()
    api = next(r for r in a.rows("workloads") if r["workload"] == "api")
    assert api["source"] == "etcd" and api["labels"] == {"app": "api"}
    assert api["addresses"] == [hosts.ipv4("b", "api"), hosts.ipv6("b", "api")]

    # Real traffic across the wire, judged on a by what b published.
    assert connects(hosts, "api")
    assert not connects(hosts, "rogue")
    allowed = a.events(type="verdict", verdict="allowed")
    assert any(e["src"]["workload"] == "api" and e["rule"] == "api-to-db" for e in allowed)
    denied = a.events(type="verdict", verdict="denied")
    assert any(e["src"]["workload"] == "rogue" and e["dst"]["workload"] == "db"
               for e in denied)
    # Workload events of b's workloads name their node.
    added = a.events(type="workload", action="added", workload="api")
    assert added and added[0]["node"] == "b" and added[0]["source"] == "etcd"

    nodes = a.rows("nodes")
    assert [n["node"] for n in nodes] == ["a", "b"] and all(n["etcd_up"] for n in nodes)
    assert nodes[1]["workloads"] == 2 and nodes[0]["self"]
    st = a.status()["etcd"]
    assert st["up"] and st["node"] == "a" and st["remote_workloads"] == 2

    # etcd restarts mid-run: nothing known changes, no verdict changes.
    gen = a.generation()
    etcd.restart()
    assert wait_for(lambda: a.log().count("etcd: resynced") >= 1
                    and b.log().count("etcd: resynced") >= 1, timeout=20), a.log()[-2000:]
    assert a.generation() == gen
    assert connects(hosts, "api") and not connects(hosts, "rogue")

    # b dies without a word: after its lease runs out, a forgets its
    # workloads, and api is a stranger (denied by default) again — also
    # on the connection it holds open: judged again, and revoked.
    hold = hosts.spawn("b", "api", [sys.executable, "-m", "microseg.lab.traffic", "hold",
                                    "tcp", hosts.ipv4("a", "db"), "5432", "--interval", "0.2"],
                       stdout=subprocess.PIPE, text=True)
    assert hold.stdout is not None and hold.stdout.readline() == "connected\n"
    b.signal(signal.SIGKILL)
    t0 = time.monotonic()
    assert wait_for(lambda: not {"api@b", "rogue@b"} & a.workload_names(), timeout=TTL + 5)
    took = time.monotonic() - t0
    print(f"b killed: its workloads gone from a after {took:.1f} s (ttl {TTL} s)")
    assert took >= TTL - 1.5
    assert [n["node"] for n in a.rows("nodes")] == ["a"]
    assert not connects(hosts, "api")
    api4 = hosts.ipv4("b", "api")
    assert wait_for(lambda: a.events(type="verdict", reason="revoked"), timeout=5)
    revoked = a.events(type="verdict", reason="revoked")
    # (By whichever packet of the connection came first: api's, or db's reply.)
    ends = {(e["src"]["ip"], e["dst"]["ip"]) for e in revoked}
    assert ends <= {(api4, hosts.ipv4("a", "db")), (hosts.ipv4("a", "db"), api4)}, revoked
    hold.terminate()
    hold.communicate(timeout=10)
    b.proc.wait(timeout=10)
    b.proc = None  # killed: its flow log is checked, its exit is a crash's


def test_etcd_unreachable_is_said_and_changes_nothing(
        lab: tuple[HostsLab, Etcd], daemons: Daemons) -> None:
    hosts, etcd = lab
    a = start(daemons, hosts, etcd, "a", local_policy(hosts, "a", A_RULES, "deny"))
    b = start(daemons, hosts, etcd, "b", local_policy(hosts, "b", B_RULES, "deny"))
    assert wait_for(lambda: "api@b" in a.workload_names(), timeout=5)
    assert etcd.proc is not None
    etcd.proc.send_signal(signal.SIGSTOP)  # silent: no reset, no FIN
    try:
        t0 = time.monotonic()
        assert wait_for(lambda: not a.status()["etcd"]["up"], timeout=6)
        print(f"etcd silent: down in a's status after {time.monotonic() - t0:.1f} s")
        nodes = a.cli("nodes")
        assert "etcd unreachable since" in nodes.stderr
        # The metrics listener is on the host's own loopback.
        scrape = hosts.run_host("a", ["curl", "-sf", f"http://{a.status()['metrics']}/metrics"])
        assert "microseg_etcd_up 0.0" in scrape.stdout, scrape
        # The last known identities stay enforced.
        assert "api@b" in a.workload_names()
        assert connects(hosts, "api") and not connects(hosts, "rogue")
    finally:
        etcd.proc.send_signal(signal.SIGCONT)
    assert wait_for(lambda: a.status()["etcd"]["up"], timeout=20)
    assert b.status()["etcd"]["up"]


def test_one_cluster_policy_enforced_by_both_hosts(
        lab: tuple[HostsLab, Etcd], daemons: Daemons, tmp_path: Path) -> None:
    hosts, etcd = lab
    a = start(daemons, hosts, etcd, "a", None, "--policy", "etcd", "--policy-default", "audit")
    b = start(daemons, hosts, etcd, "b", None, "--policy", "etcd", "--policy-default", "audit")
    ws = "\n".join(f"  {w.name}: {{addresses: [{hosts.ipv4(h, w.name)}], "
                   f"labels: {json.dumps(w.labels)}}}"
                   for h in HOSTS for w in HOSTS[h])
    text = (f"version: 1\ndefault: deny\nworkloads:\n{ws}\nrules:\n{A_RULES}"
            "  - name: from-b\n    from: {labels: {app: api}}\n    to: any\n"
            "    action: allow\n")
    f = tmp_path / "cluster.yaml"
    f.write_text(text)
    out = a.cli("policy", "apply", "--cluster", str(f))
    assert out.returncode == 0, out.stderr
    assert "stored in etcd at revision" in out.stdout and "active here" in out.stdout
    sha = hashlib.sha256(text.encode()).hexdigest()
    assert wait_for(lambda: b.status()["policy"]["sha256"] == sha, timeout=5)
    nodes = b.rows("nodes")
    assert {n["node"]: n["policy_sha256"] for n in nodes} == {"a": sha, "b": sha}
    applied = b.events(type="policy", result="applied", sha256=sha)
    assert applied and applied[0]["source"] == "etcd" and applied[0]["revision"] > 0
    # A cluster policy's workloads are every node's: none published.
    assert all(n["workloads"] == 0 for n in nodes)
    assert connects(hosts, "api") and not connects(hosts, "rogue")
    # A candidate is staged beside the cluster policy as beside a file's;
    # promoting it is `apply --cluster`'s job.
    candidate = tmp_path / "candidate.yaml"
    candidate.write_text(text.replace("    from: {labels: {app: api}}\n    to: any\n",
                                      "    from: any\n    to: any\n"))
    staged = a.cli("policy", "stage", str(candidate))
    assert staged.returncode == 0, staged.stderr
    db = hosts.ipv4("a", "db")
    assert not hosts.probe("a", "web", "tcp", db, 5432)  # the active policy decides
    status = json.loads(a.cli("policy", "stage", "status", "--json").stdout)["staged"]
    assert status["would_change"] >= 1, status
    promote = a.cli("policy", "stage", "promote")
    assert promote.returncode == 1 and "apply --cluster" in promote.stderr, promote
    assert a.cli("policy", "stage", "clear").returncode == 0
    # An invalid one is refused by the command, and stores nothing.
    f.write_text(text + "  - oops\n")
    bad = a.cli("policy", "apply", "--cluster", str(f))
    assert bad.returncode == 1 and "invalid, not applied" in bad.stderr
    assert b.status()["policy"]["sha256"] == sha
    # A daemon following the cluster's policy has no file to edit.
    f.write_text(text)
    edit = a.cli("policy", "apply", str(f))
    assert edit.returncode == 1 and "apply --cluster" in edit.stderr
    # Restarted while etcd does not answer: the cluster policy it applied
    # last is enforced, not the built-in audit policy, nor nothing.
    a.stop()
    assert etcd.proc is not None
    etcd.proc.send_signal(signal.SIGSTOP)
    try:
        a.start(timeout=40)
        assert a.status()["policy"]["sha256"] == sha
        assert "enforcing the cluster policy this node last applied" in a.log()
        assert not connects(hosts, "rogue")
    finally:
        etcd.proc.send_signal(signal.SIGCONT)
    assert wait_for(lambda: a.status()["etcd"]["up"], timeout=20)
