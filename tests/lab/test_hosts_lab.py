"""The many-hosts lab (microseg.lab.hosts) and its etcd (microseg.lab.etcd),
for real: two hosts in namespaces routing their workloads' traffic to each
other over a wire, a TLS etcd that only holders of its CA's client
certificates may use, and each host command's private bpffs. Whatever fails,
every namespace, process and temporary directory is gone afterwards."""

from __future__ import annotations

import base64
import fnmatch
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from microseg.lab.etcd import Etcd
from microseg.lab.hosts import HostsLab
from microseg.lab.topology import WorkloadSpec, links, wait_for

TOOLS = ("ip", "etcd", "openssl", "curl", "mount", "sysctl", "ping")
MISSING = [t for t in TOOLS if shutil.which(t) is None]
pytestmark = [pytest.mark.root,
              pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)} "
                                 "(make setup installs them)")]

PREFIX = "mshl"
HOSTS = {"a": [WorkloadSpec("web", 10)], "b": [WorkloadSpec("db", 20)]}
# In every bpffs: the kernel's bpf_preload iterators.
PRELOADED = {"maps.debug", "progs.debug"}


@pytest.fixture
def lab() -> Iterator[HostsLab]:
    with HostsLab(HOSTS, prefix=PREFIX) as made:
        yield made
    assert made.stale_namespaces() == [] and made.stale_links() == []


def root_leftovers(lab: HostsLab) -> tuple[list[str], list[str]]:
    """Namespaces and root links named like the lab's, as `ip` lists them."""
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names = [line.split()[0] for line in netns.splitlines() if line.strip()]
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    ifnames = [line.split(": ")[1].split("@")[0] for line in out.splitlines()]
    ours = (f"{PREFIX}-", *(f"{PREFIX}{h}" for h in lab.hosts))
    return ([n for n in names if n.startswith(f"{PREFIX}-")],
            [n for n in ifnames if n.startswith(ours)])


def test_workloads_on_two_hosts_reach_each_other_over_the_wire() -> None:
    lab = HostsLab(HOSTS, prefix=PREFIX)
    try:
        lab.up()
        lab.serve("a", "web", tcp=[80])
        lab.serve("b", "db", tcp=[5432])
        sleeper = lab.spawn("b", "db", ["sleep", "300"])
        for family in ("ipv4", "ipv6"):
            db, web = getattr(lab, family)("b", "db"), getattr(lab, family)("a", "web")
            assert lab.probe("a", "web", "tcp", db, 5432), f"a -> b tcp {family}"
            assert lab.probe("b", "db", "tcp", web, 80), f"b -> a tcp {family}"
            ping = lab.run("a", "web", ["ping", "-c", "1", "-W", "2", db])
            # 62: routed by host a and by host b, not across a shared link.
            assert ping.returncode == 0 and "ttl=62" in ping.stdout, ping.stdout
        # A daemon's -i on host a matches a's workloads only, never the wire
        # or the bridge; and nothing of the lab is in the root namespace.
        assert fnmatch.filter(links(lab.ns("a")), lab.glob("a")) == [lab.host_if("a", "web")]
        assert lab.stale_links() == []
    finally:
        lab.down()
    assert sleeper.wait(5) is not None
    assert root_leftovers(lab) == ([], [])


def test_down_clears_what_a_crashed_run_left(lab: HostsLab) -> None:
    orphan = lab.spawn_host("a", ["sleep", "300"])
    # Another run with this prefix and other hosts: it knows nothing of a or b.
    HostsLab({"z": []}, prefix=PREFIX).down()
    assert orphan.wait(5) is not None
    assert root_leftovers(lab) == ([], [])


def kv(lab: HostsLab, host: str, etcd: Etcd, op: str, body: dict,
       *tls: str) -> subprocess.CompletedProcess[str]:
    """curl etcd's JSON gateway from host (tls: curl's certificate options)."""
    return lab.run_host(host, ["curl", "-sS", "--noproxy", "*", "--max-time", "5", *tls,
                               "-d", json.dumps(body), f"{etcd.endpoint}/v3/kv/{op}"])


def b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode()


def read(lab: HostsLab, host: str, etcd: Etcd, key: str) -> list[str]:
    r = kv(lab, host, etcd, "range", {"key": b64(key)}, *etcd.client_tls)
    assert r.returncode == 0, r.stderr
    return [base64.b64decode(x["value"]).decode() for x in json.loads(r.stdout).get("kvs", [])]


def test_etcd_with_client_certificates_serves_the_hosts(lab: HostsLab) -> None:
    with lab.etcd(tls=True) as etcd:
        assert etcd.endpoint == f"https://{lab.etcd_ip}:2379"
        etcd.start()
        put = kv(lab, "a", etcd, "put", {"key": b64("/ms/a"), "value": b64("web")},
                 *etcd.client_tls)
        assert put.returncode == 0 and '"revision"' in put.stdout, (put.stdout, put.stderr)
        assert read(lab, "b", etcd, "/ms/a") == ["web"]

        # Refused at the handshake: no certificate, or one of another CA.
        bare = kv(lab, "b", etcd, "range", {"key": b64("/ms/a")}, "--cacert", str(etcd.cacert))
        foreign = kv(lab, "b", etcd, "range", {"key": b64("/ms/a")}, "--cacert",
                     str(etcd.cacert), "--cert", str(etcd.foreign_cert),
                     "--key", str(etcd.foreign_key))
        for refused in (bare, foreign):
            assert refused.returncode != 0 and "kvs" not in refused.stdout, refused.stdout
        assert wait_for(lambda: "didn't provide a certificate" in etcd.log_tail(50)
                        and "unknown authority" in etcd.log_tail(50), 3), etcd.log_tail(50)

        etcd.restart()
        assert read(lab, "a", etcd, "/ms/a") == ["web"]
        etcd.kill()
        assert not etcd.up
        etcd.start()
        assert read(lab, "b", etcd, "/ms/a") == ["web"]
        data_dir, tmp = str(etcd.data_dir), etcd.dir
    assert subprocess.run(["pgrep", "-f", data_dir], capture_output=True).returncode == 1
    assert not tmp.exists()
    etcd.close()  # a second close does nothing


def test_host_exec_gives_each_command_a_bpffs_of_its_own(lab: HostsLab) -> None:
    outside = Path(f"/sys/fs/bpf/{PREFIX}-root-{os.getpid()}")
    made = f"{PREFIX}-inside-{os.getpid()}"
    outside.mkdir()
    try:
        r = lab.run_host("a", ["sh", "-c", f"mkdir /sys/fs/bpf/{made} && ls -A /sys/fs/bpf"])
        assert r.returncode == 0, r.stderr
        assert set(r.stdout.split()) - PRELOADED == {made}  # not the root's
        assert not Path("/sys/fs/bpf", made).exists()
        again = lab.run_host("a", ["ls", "-A", "/sys/fs/bpf"])
        assert set(again.stdout.split()) - PRELOADED == set()  # gone with the first
        net = lab.run_host("a", ["ls", "/sys/class/net"]).stdout.split()
        assert sorted(net) == sorted(["lo", "wire0", lab.lab("a").bridge,
                                      lab.host_if("a", "web")])
    finally:
        outside.rmdir()


@pytest.mark.parametrize(("hosts", "prefix", "message"), [
    ({"a": [WorkloadSpec("averylongname", 10)]}, PREFIX, "longer than 15"),
    ({"a-1": []}, PREFIX, "lowercase letters and digits"),
    ({"abc": []}, "mshost", "at most 0 of them"),
    ({"a": [WorkloadSpec("gw", 1)]}, PREFIX, "gateway"),
])
def test_names_that_cannot_be_built_are_refused_up_front(hosts, prefix, message) -> None:
    with pytest.raises(ValueError, match=message):
        HostsLab(hosts, prefix=prefix)
