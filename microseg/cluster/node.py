"""This host as a node of a microseg cluster: what it publishes to etcd and
what it learns from it (docs/many-hosts.md).

Keys under the prefix (default /microseg/):

    policy                      the cluster policy (YAML bytes)
    nodes/NODE                  the node's report (JSON), on its lease
    workloads/NODE/NAME         a workload of NODE (JSON), on its lease

A node publishes on one lease kept alive while it runs: if it crashes or is
cut off, etcd deletes its keys after the TTL, and every other node forgets
its workloads; a clean stop revokes the lease at once. It reads by
list-then-watch: the whole prefix at one revision, then every change after
that revision, so no update falls between the two. Whenever the connection
breaks it keeps what it knew (the last known identities and policy stay
enforced), retries with back-off, and lists afresh when etcd answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import orjson

from microseg.cluster.etcd import EtcdClient, EtcdError, Event, KeyValue
from microseg.flow.hub import rfc3339
from microseg.inventory.model import DiscoveredWorkload

log = logging.getLogger("microseg.cluster")

SOURCE = "etcd"
POLICY_KEY = "policy"
NODES = "nodes/"
WORKLOADS = "workloads/"
DEFAULT_TTL = 30
MIN_TTL = 5
# The lease is renewed, and etcd's health checked, this often at most: an
# outage shows in status within MIN_TTL seconds whatever the TTL.
KEEPALIVE_MAX_S = 1.5
BACKOFF_S = (0.25, 10.0)
LEAVE_S = 2.0  # a stop waits this long at most to withdraw this node's workloads
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,252}$")


def check_node_name(name: str) -> str:
    if not NAME.match(name):
        raise ValueError(f"--node {name!r}: letters, digits, '.', '_', '-' (a host name)")
    return name


@dataclass(frozen=True)
class LocalWorkload:
    """What this node publishes of one of its workloads."""

    name: str
    source: str
    labels: tuple[tuple[str, str], ...]
    addresses: tuple[str, ...]

    def value(self) -> bytes:
        return orjson.dumps({"name": self.name, "source": self.source,
                             "labels": dict(self.labels), "addresses": list(self.addresses)},
                            option=orjson.OPT_SORT_KEYS)


@dataclass
class Report:
    """What this node says of itself under nodes/NODE."""

    policy_sha256: str | None = None
    policy_generation: int = 0


OnWorkloads = Callable[[Mapping[str, DiscoveredWorkload]], Awaitable[object]]
OnPolicy = Callable[[bytes, int], Awaitable[object]]


class ClusterNode:
    def __init__(self, client: EtcdClient, node: str, ttl: int = DEFAULT_TTL, *,
                 version: str, on_workloads: OnWorkloads,
                 on_policy: OnPolicy | None = None) -> None:
        self.client = client
        self.node = check_node_name(node)
        if ttl < MIN_TTL:
            raise ValueError(f"--etcd-ttl {ttl}: at least {MIN_TTL} seconds")
        self.ttl = ttl
        self.version = version
        self._on_workloads = on_workloads
        self._on_policy = on_policy
        # What others published: key below workloads/ -> workload; nodes by name.
        self.remote: dict[str, DiscoveredWorkload] = {}
        self.nodes: dict[str, dict] = {}
        self.policy: tuple[bytes, int] | None = None  # (value, mod_revision)
        self.revision = 0
        # What this node publishes, and what etcd holds of it under the lease.
        self._local: dict[str, LocalWorkload] = {}
        self._published: dict[str, bytes] = {}
        self.report = Report()
        # What nodes/NODE says now, but its heartbeat and generation; None:
        # to be written (a new lease, or a heartbeat due).
        self._reported: dict | None = None
        self._dirty = asyncio.Event()
        self.lease = 0
        # Shown by status, nodes and metrics.
        self.up = False
        self.since = time.time()
        self.last_error: str | None = None
        self.resyncs = 0
        self.errors = 0
        self.warnings: set[str] = set()
        self._connected = asyncio.Event()

    # -- what the daemon tells it ------------------------------------------------

    def set_local(self, workloads: Mapping[str, LocalWorkload]) -> None:
        """The workloads this node publishes now (replacing the last set)."""
        self._local = dict(workloads)
        self._dirty.set()

    def set_report(self, sha256: str | None, generation: int) -> None:
        self.report = Report(sha256, generation)
        self._dirty.set()

    async def put_policy(self, data: bytes) -> int:
        """Store the cluster policy; the revision of the write."""
        return await self.client.put(POLICY_KEY, data)

    async def wait_connected(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), timeout)
        return self._connected.is_set()

    # -- the connection's life -----------------------------------------------------

    async def run(self) -> None:
        """Until cancelled: connect, publish, list, watch; on any failure keep
        what is known, back off and start over."""
        delay = BACKOFF_S[0]
        while True:
            resyncs = self.resyncs
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except EtcdError as e:
                self._down(str(e))
            except Exception as e:  # a bug or a hostile value: say it, keep going
                log.exception("etcd: unexpected failure")
                self._down(f"{type(e).__name__}: {e}")
            if self.resyncs != resyncs:  # it had connected: a new outage
                delay = BACKOFF_S[0]
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, BACKOFF_S[1])

    def _down(self, why: str) -> None:
        self.errors += 1
        self.last_error = why
        if self.up:
            self.up = False
            self.since = time.time()
            log.error("etcd: %s; the last known identities and policy stay enforced, "
                      "retrying with back-off", why)
        else:
            log.debug("etcd: still down: %s", why)

    async def _session(self) -> None:
        c = self.client
        if self.lease and await c.keepalive(self.lease) <= 0:
            log.warning("etcd: lease %x expired while away: publishing again", self.lease)
            self.lease = 0
        if not self.lease:
            self.lease = await c.grant(self.ttl)
            self._published = {}
            self._reported = None
        await self._publish()
        rev, kvs = await c.range_prefix("")
        await self._resync(rev, kvs)
        was_up, self.up = self.up, True
        self.since = time.time() if not was_up else self.since
        self.last_error = None
        self._connected.set()
        self.resyncs += 1
        log.info("etcd: %s at revision %d via %s: %d nodes, %d remote workloads, lease %x "
                 "(ttl %d s)", "resynced" if self.resyncs > 1 else "connected", rev,
                 c.endpoint, len(self.nodes), len(self.remote), self.lease, self.ttl)
        tasks = [asyncio.create_task(self._watch(rev + 1)),
                 asyncio.create_task(self._keepalive(c.endpoint)),
                 asyncio.create_task(self._publisher())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for t in done:
                t.result()
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t

    async def _keepalive(self, watched: str) -> None:
        """Renew the lease, and check that the endpoint the watch reads from
        still answers: a request that failed over to another endpoint ends
        the session (the watch may be waiting on a silent one)."""
        every = min(self.ttl / 3, KEEPALIVE_MAX_S)
        heartbeat = self.ttl / 3
        last_beat = time.monotonic()
        while True:
            await asyncio.sleep(every)
            if await self.client.keepalive(self.lease) <= 0:
                raise EtcdError(f"etcd {self.client.endpoint}: lease {self.lease:x} expired")
            if self.client.endpoint != watched:
                raise EtcdError(f"etcd {watched}: stopped answering; watching "
                                f"{self.client.endpoint} instead")
            if time.monotonic() - last_beat >= heartbeat:
                last_beat = time.monotonic()
                self._reported = None  # the heartbeat: written again
                self._dirty.set()

    async def _publisher(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            await self._publish()

    async def _publish(self) -> None:
        """Make etcd hold exactly this node's workloads and report."""
        c = self.client
        want = {f"{WORKLOADS}{self.node}/{n}": w.value() for n, w in self._local.items()}
        for key in [k for k in self._published if k not in want]:
            await c.delete(key)
            del self._published[key]
        for key, value in want.items():
            if self._published.get(key) != value:
                await c.put(key, value, self.lease)
                self._published[key] = value
        report = self._report_due()
        if report is not None:
            await c.put(NODES + self.node, report, self.lease)
            self._reported = _settled(self.own())

    def own(self) -> dict:
        """This node's report as it stands, but its heartbeat."""
        return {"node": self.node, "policy_sha256": self.report.policy_sha256,
                "policy_generation": self.report.policy_generation,
                "workloads": len(self._local), "version": self.version}

    def _report_due(self) -> bytes | None:
        """nodes/NODE to write now, or None. It is written when what it says
        changed, but its generation: a generation made by another node's
        inventory change waits for the heartbeat (every node rewriting its
        report at every change would make N² watch events)."""
        own = self.own()
        if self._reported == _settled(own):
            return None
        return orjson.dumps({**own, "heartbeat": _rfc3339(time.time())})

    # -- what others published --------------------------------------------------------

    async def _watch(self, start: int) -> None:
        async for rev, events in self.client.watch("", start):
            self.revision = max(self.revision, rev)
            if events:
                await self._apply(events)

    async def _resync(self, rev: int, kvs: list[KeyValue]) -> None:
        """A fresh list replaces everything learnt before (what vanished while
        away is gone now)."""
        self.revision = rev
        remote_before, policy_before = self.remote, self.policy
        self.remote, self.nodes = {}, {}
        policy = None
        for kv in kvs:
            if kv.key == POLICY_KEY:
                policy = (kv.value, kv.mod_revision)
            else:
                self._learn(Event("put", kv))
        self.policy = policy if policy is not None else policy_before
        if self.remote != remote_before:
            await self._on_workloads(dict(self.remote))
        if policy is not None and policy != policy_before and self._on_policy:
            await self._on_policy(*policy)

    async def _apply(self, events: list[Event]) -> None:
        before = dict(self.remote)
        policy = None
        for ev in events:
            if ev.kv.key == POLICY_KEY:
                if ev.kind == "put":
                    policy = (ev.kv.value, ev.kv.mod_revision)
                else:
                    log.warning("etcd: the cluster policy key was deleted; the last policy "
                                "stays enforced")
            else:
                self._learn(ev)
        if self.remote != before:
            await self._on_workloads(dict(self.remote))
        if policy is not None and policy != self.policy:
            self.policy = policy
            if self._on_policy:
                await self._on_policy(*policy)

    def _learn(self, ev: Event) -> None:
        key = ev.kv.key
        if key.startswith(NODES):
            node = key[len(NODES):]
            if ev.kind == "delete":
                self.nodes.pop(node, None)
            else:
                info = self._parse_node(node, ev.kv.value)
                if info is not None:
                    self.nodes[node] = info
        elif key.startswith(WORKLOADS):
            node, _, name = key[len(WORKLOADS):].partition("/")
            if node == self.node:  # our own, as published
                if ev.kind == "delete" and self._published.pop(key, None) is not None:
                    self._dirty.set()  # deleted by someone else: put back
                return
            if ev.kind == "delete":
                self.remote.pop(key, None)
                return
            w = self._parse_workload(node, name, ev.kv.value)
            if w is None:
                self.remote.pop(key, None)
            else:
                self.remote[key] = w

    def _warn(self, text: str) -> None:
        """A bad value in the store: said once, skipped."""
        if text not in self.warnings:
            self.warnings.add(text)
            log.warning("etcd: %s", text)

    def _parse_node(self, node: str, value: bytes) -> dict | None:
        try:
            d = orjson.loads(value)
            if not isinstance(d, dict):
                raise ValueError("not an object")
        except ValueError as e:
            self._warn(f"{NODES}{node}: not a node report ({e}); ignored")
            return None
        def typed(key: str, kind: type) -> object:
            v = d.get(key)
            return v if isinstance(v, kind) and not isinstance(v, bool) else None

        return {"node": node, "heartbeat": typed("heartbeat", str),
                "policy_sha256": typed("policy_sha256", str),
                "policy_generation": typed("policy_generation", int),
                "workloads": typed("workloads", int), "version": typed("version", str)}

    def _parse_workload(self, node: str, name: str, value: bytes
                        ) -> DiscoveredWorkload | None:
        where = f"{WORKLOADS}{node}/{name}"
        try:
            if not NAME.match(node) or not NAME.match(name):
                raise ValueError("node and workload names are letters, digits, '.', '_', '-'")
            d = orjson.loads(value)
            labels = d.get("labels") or {}
            if not isinstance(labels, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
                raise ValueError("labels are not a map of strings")
            addresses = d.get("addresses") or []
            if not isinstance(addresses, list):
                raise ValueError("addresses are not a list")
            w = DiscoveredWorkload.make(name, labels, addresses, SOURCE, f"{node}/{name}",
                                        node=node)
        except (ValueError, AttributeError, TypeError) as e:
            self._warn(f"{where}: {e}; ignored")
            return None
        for a in w.addresses:
            a = getattr(a, "ipv4_mapped", None) or a  # ::ffff:127.0.0.1 is loopback too
            if a.is_loopback or a.is_multicast or a.is_unspecified:
                self._warn(f"{where}: address {a} cannot be a workload's; ignored")
                return None
        return w

    # -- stopping -----------------------------------------------------------------------

    async def leave(self) -> None:
        """A clean stop: revoke the lease, so every node forgets this one's
        workloads now rather than after the TTL."""
        if self.lease:
            try:
                await asyncio.wait_for(self.client.revoke(self.lease), LEAVE_S)
                log.info("etcd: lease %x revoked: this node's workloads are withdrawn",
                         self.lease)
            except (EtcdError, TimeoutError) as e:
                log.warning("etcd: lease %x not revoked (%s): this node's workloads "
                            "vanish elsewhere after its TTL", self.lease, e or "timed out")
        self.lease = 0

    def status(self) -> dict:
        return {"up": self.up, "endpoints": self.client.endpoints,
                "endpoint": self.client.endpoint, "prefix": self.client.prefix,
                "node": self.node, "since": _rfc3339(self.since),
                "last_error": self.last_error, "lease_ttl_s": self.ttl,
                "revision": self.revision, "resyncs": self.resyncs, "errors": self.errors,
                "nodes": len(self.nodes), "remote_workloads": len(self.remote)}


def _settled(report: dict) -> dict:
    return {k: v for k, v in report.items() if k != "policy_generation"}


def _rfc3339(t: float) -> str:
    return rfc3339(int(t * 1e9))
