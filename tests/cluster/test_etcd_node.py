"""A node's life against a real etcd (Debian's etcd-server, TLS with client
certificates, in a namespace of the test's own): publish on a lease,
list-then-watch, lease expiry and revocation, an etcd restart, refused
certificates, hostile values, and a keyspace touched only under the prefix.
The test's loop enters the namespace (setns) so its sockets live there."""

from __future__ import annotations

import asyncio
import base64
import errno
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping

import pytest

from microseg.cluster.etcd import EtcdClient, EtcdError, TLSFiles
from microseg.cluster.node import ClusterNode, LocalWorkload
from microseg.inventory.model import DiscoveredWorkload
from microseg.lab.etcd import Etcd, request

pytestmark = pytest.mark.root
NS = "msct-etcd"
PREFIX = "/microseg-test/"


@pytest.fixture(scope="module")
def etcd() -> Iterator[Etcd]:
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (make setup installs etcd-server)")
    from pyroute2.netns import popns, pushns

    subprocess.run(["ip", "netns", "del", NS], capture_output=True)
    subprocess.run(["ip", "netns", "add", NS], check=True)
    member = Etcd("127.0.0.1", netns=NS, tls=True)
    pushns(NS)
    try:
        member.start()
        yield member
    finally:
        popns()
        member.close()
        subprocess.run(["ip", "netns", "del", NS], capture_output=True)


def tls(e: Etcd) -> TLSFiles:
    return TLSFiles(str(e.cacert), str(e.cert), str(e.key))


@pytest.fixture
async def client(etcd: Etcd) -> AsyncIterator[EtcdClient]:
    c = EtcdClient([etcd.endpoint], PREFIX, tls(etcd))
    await c.delete_prefix("")
    yield c
    await c.delete_prefix("")
    await c.close()


class Node:
    """A ClusterNode running on the test's loop, recording what it learns."""

    def __init__(self, etcd: Etcd, name: str, ttl: int = 5) -> None:
        self.client = EtcdClient([etcd.endpoint], PREFIX, tls(etcd))
        self.seen: list[dict[str, DiscoveredWorkload]] = []
        self.policies: list[tuple[bytes, int]] = []

        async def on_workloads(ws: Mapping[str, DiscoveredWorkload]) -> None:
            self.seen.append(dict(ws))

        async def on_policy(data: bytes, rev: int) -> None:
            self.policies.append((data, rev))

        self.node = ClusterNode(self.client, name, ttl, version="test",
                                on_workloads=on_workloads, on_policy=on_policy)
        self.task = asyncio.create_task(self.node.run())

    @property
    def remote(self) -> set[str]:
        return {f"{w.node}/{w.name}" for w in self.node.remote.values()}

    async def crash(self) -> None:
        """Gone without a word: the lease runs out by itself."""
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.client.close()

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.node.leave()
        await self.client.close()


def local(name: str, addr: str, **labels: str) -> LocalWorkload:
    return LocalWorkload(name, "docker", tuple(sorted(labels.items())), (addr,))


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


async def test_nodes_learn_each_others_workloads_and_forget_them_on_leave(
        etcd: Etcd, client: EtcdClient) -> None:
    a, b = Node(etcd, "a"), Node(etcd, "b")
    try:
        a.node.set_local({"db": local("db", "10.1.0.5", tier="db")})
        b.node.set_local({"api": local("api", "10.2.0.5", app="api")})
        await until(lambda: a.remote == {"b/api"} and b.remote == {"a/db"}
                    and "b" in a.node.nodes)  # b's node record: a key of its own
        w = next(iter(a.node.remote.values()))
        assert (w.name, w.node, w.label_map, [str(x) for x in w.addresses]) == \
            ("api", "b", {"app": "api"}, ["10.2.0.5"])
        assert set(a.node.nodes) == {"a", "b"} and a.node.nodes["b"]["version"] == "test"
        # A change and a removal arrive by the watch.
        b.node.set_local({"api2": local("api2", "10.2.0.6")})
        await until(lambda: a.remote == {"b/api2"})
        # A clean stop revokes the lease: gone at once, not after the TTL.
        await b.stop()
        took = await until(lambda: not a.remote and "b" not in a.node.nodes, timeout=2)
        print(f"revoked: forgotten in {took * 1000:.0f} ms")
    finally:
        await a.stop()
        await b.stop()


async def test_a_crashed_nodes_workloads_vanish_after_its_ttl(
        etcd: Etcd, client: EtcdClient) -> None:
    a, b = Node(etcd, "a"), Node(etcd, "b", ttl=5)
    try:
        b.node.set_local({"api": local("api", "10.2.0.5")})
        await until(lambda: a.remote == {"b/api"})
        t0 = time.monotonic()
        await b.crash()
        await asyncio.sleep(3)
        assert a.remote == {"b/api"}, "kept while its lease lives"
        await until(lambda: not a.remote, timeout=10)
        took = time.monotonic() - t0
        print(f"crashed node forgotten after {took:.1f} s (ttl 5)")
        assert 4 <= took <= 8
    finally:
        await a.stop()


async def test_an_update_written_between_list_and_watch_is_not_missed(
        etcd: Etcd, client: EtcdClient) -> None:
    """The watch starts at the listed revision + 1: writes racing the start
    of a node (hundreds, from another client) all arrive."""
    writer = asyncio.create_task(_write_many(client, 300))
    a = Node(etcd, "a")
    try:
        await writer
        want = {f"w/n{i}" for i in range(300)}
        await until(lambda: a.remote == want, timeout=10)
    finally:
        await a.stop()


async def _write_many(c: EtcdClient, n: int) -> None:
    for i in range(n):
        await c.put(f"workloads/w/n{i}", b'{"labels": {}, "addresses": ["10.9.%d.%d"]}'
                    % (i // 250, i % 250 + 1))


async def test_etcd_restarting_keeps_what_is_known_then_resyncs(
        etcd: Etcd, client: EtcdClient) -> None:
    a, b = Node(etcd, "a", ttl=10), Node(etcd, "b", ttl=10)
    try:
        b.node.set_local({"api": local("api", "10.2.0.5")})
        await until(lambda: a.remote == {"b/api"})
        reports = len(a.seen)
        etcd.kill()
        took = await until(lambda: not a.node.up, timeout=5)
        print(f"etcd killed: down in status after {took:.2f} s")
        assert a.remote == {"b/api"}, "the last known identities stay"
        assert a.node.last_error and "unreachable" in a.node.last_error
        etcd.start()
        await until(lambda: a.node.up and b.node.up, timeout=15)
        assert a.node.resyncs >= 2
        assert a.remote == {"b/api"}
        # The fresh list found what was known: no new inventory was reported.
        assert len(a.seen) == reports
    finally:
        await a.stop()
        await b.stop()


async def test_etcd_that_stops_answering_is_down_within_5_s(
        etcd: Etcd, client: EtcdClient) -> None:
    """A partition: no RST, no FIN, just silence (the member is stopped)."""
    a = Node(etcd, "a", ttl=30)
    try:
        await until(lambda: a.node.up)
        assert etcd.proc is not None
        etcd.proc.send_signal(signal.SIGSTOP)
        try:
            took = await until(lambda: not a.node.up, timeout=5)
            print(f"silent etcd: down in status after {took:.2f} s")
        finally:
            etcd.proc.send_signal(signal.SIGCONT)
        await until(lambda: a.node.up, timeout=15)
    finally:
        await a.stop()


async def test_the_cluster_policy_arrives_with_its_revision(
        etcd: Etcd, client: EtcdClient) -> None:
    a = Node(etcd, "a")
    try:
        await until(lambda: a.node.up)
        rev = await a.node.put_policy(b"version: 1\n")
        await until(lambda: a.policies == [(b"version: 1\n", rev)])
    finally:
        await a.stop()


async def test_hostile_values_are_skipped_with_a_warning(
        etcd: Etcd, client: EtcdClient) -> None:
    for key, value in [("workloads/x/bad", b"not json"),
                       ("workloads/x/lo", b'{"addresses": ["127.0.0.1"]}'),
                       ("workloads/x/labels", b'{"labels": {"a": 1}}'),
                       ("workloads/x/bad name!", b'{}'),
                       ("nodes/x", b"[]"),
                       ("workloads/x/good", b'{"labels": {"a": "b"}, "addresses": ["10.3.0.1"]}')]:
        await client.put(key, value)
    a = Node(etcd, "a")
    try:
        await until(lambda: a.node.up)
        assert a.remote == {"x/good"}
        assert len(a.node.warnings) == 5, a.node.warnings
    finally:
        await a.stop()


async def test_certificates_etcd_does_not_trust_are_refused(etcd: Etcd) -> None:
    none = EtcdClient([etcd.endpoint], PREFIX, TLSFiles(str(etcd.cacert)))
    foreign = EtcdClient([etcd.endpoint], PREFIX,
                         TLSFiles(str(etcd.cacert), str(etcd.foreign_cert),
                                  str(etcd.foreign_key)))
    for c in (none, foreign):
        with pytest.raises(EtcdError, match="TLS handshake failed") as e:
            await c.put("x", b"y")
        print(e.value)
        assert "\n" not in str(e.value)
        await c.close()


async def test_only_keys_under_the_prefix_are_touched(etcd: Etcd, client: EtcdClient) -> None:
    outside = EtcdClient([etcd.endpoint], "/other/", tls(etcd))
    await outside.put("keep", b"mine")
    a, b = Node(etcd, "a"), Node(etcd, "b")
    try:
        a.node.set_local({"db": local("db", "10.1.0.5")})
        await until(lambda: b.remote == {"a/db"})
        await a.node.put_policy(b"version: 1\n")
        # Every key in etcd (the range from \0 to \0 is the whole keyspace).
        answer = request(etcd.endpoint, "/v3/kv/range", {"key": "AA==", "range_end": "AA==",
                                                         "keys_only": True},
                         str(etcd.cacert), str(etcd.cert), str(etcd.key))
        keys = sorted(base64.b64decode(kv["key"]).decode() for kv in answer["kvs"])
        assert [k for k in keys if not k.startswith(PREFIX)] == ["/other/keep"]
        assert f"{PREFIX}workloads/a/db" in keys and f"{PREFIX}nodes/a" in keys
    finally:
        await a.stop()
        await b.stop()
        await outside.delete("keep")
        await outside.close()


def test_a_reset_after_the_tls_handshake_names_the_certificate() -> None:
    """TLS 1.3: etcd refuses a client certificate after the client's side of
    the handshake is done, and its reset can overtake its alert; the error
    must still point at TLS, not read as an unreachable member."""
    from microseg.cluster.etcd import _unreachable

    reset = ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    assert "client certificate" in _unreachable(["https://127.0.0.1:2379"], reset)
    assert "unreachable" in _unreachable(["http://127.0.0.1:2379"], reset)
