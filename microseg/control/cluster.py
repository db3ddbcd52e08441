"""The daemon's side of many hosts (`run --etcd`, docs/many-hosts.md): what
this node publishes comes from each applied generation; what other nodes
publish, and the cluster policy, go to the policy manager like a discovery
source's inventory and a policy file's text.

etcd going away never stops enforcement: the node keeps what it knew, and
status, `nodes` and `microseg_etcd_up` say that it is cut off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from pathlib import Path

import orjson

from microseg import __version__
from microseg.cluster.etcd import EtcdClient, TLSFiles
from microseg.cluster.node import SOURCE, ClusterNode, LocalWorkload
from microseg.control.config import EtcdConfig
from microseg.inventory.model import DiscoveredWorkload
from microseg.policy.edit import write_atomically
from microseg.policy.inventory import STATIC, Merged
from microseg.policy.manager import CLUSTER, ActivePolicy, PolicyManager
from microseg.policy.staging import trusted_state_dir

log = logging.getLogger("microseg.cluster")

# How long a start with `--policy etcd` waits for etcd's first answer before
# it settles for the policy cached from the last run (or refuses).
FIRST_CONTACT_WAIT_S = 5.0
# The last cluster policy applied, kept beside the control socket: a host
# that restarts while etcd is unreachable enforces it rather than nothing.
POLICY_CACHE = "cluster-policy.json"


def _hosts(addresses: tuple[str, ...]) -> tuple[str, ...]:
    """What other nodes learn of a workload's addresses: its host addresses.
    A static workload's wider prefix (a CIDR) is this host's to judge by;
    other nodes learn workloads, not networks."""
    return tuple(a for a in addresses if "/" not in a)


class Cluster:
    def __init__(self, cfg: EtcdConfig, policy: PolicyManager, state_dir: str | None) -> None:
        self.cfg = cfg
        self.policy = policy
        self.state_dir = Path(state_dir) if state_dir else None
        self._cached_sha: str | None = None
        tls = TLSFiles(cfg.cacert, cfg.cert, cfg.key) if cfg.cacert or cfg.cert else None
        self.client = EtcdClient(cfg.endpoints, cfg.prefix, tls)
        self.node = ClusterNode(
            self.client, cfg.node_name(), cfg.ttl, version=__version__,
            on_workloads=self._on_remote,
            on_policy=self._on_policy if policy.from_cluster else None)
        self._task: asyncio.Task | None = None
        # What the watch handed over and is not applied yet: the newest only.
        self._remote: Mapping[str, DiscoveredWorkload] | None = None
        self._policy: tuple[bytes, int] | None = None
        self._applier: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self.node.run(), name="etcd")

    async def first_contact(self, timeout: float = FIRST_CONTACT_WAIT_S) -> bool:
        """Wait (bounded) until etcd has been listed once."""
        ok = await self.node.wait_connected(timeout)
        if not ok:
            log.warning("etcd: no answer within %.0f s (%s): starting with what is known "
                        "locally", timeout, self.node.last_error or "no answer yet")
        return ok

    async def _on_remote(self, remote: Mapping[str, DiscoveredWorkload]) -> None:
        """The newest inventory wins. The watch goes on reading while a
        generation is applied, and whatever arrived meanwhile is applied
        together next: one generation per watch event would fall ever further
        behind a busy cluster (a generation costs ~0.2 s at 10,000 remote
        workloads)."""
        if self.policy.active is None:
            # Before the first apply: kept for it, before the first list
            # counts as done (a start judges nothing without them).
            await self.policy.update_discovered(SOURCE, remote)
            return
        self._remote = remote
        self._wake_applier()

    async def _on_policy(self, data: bytes, revision: int) -> None:
        """The cluster policy, applied by the same task: never by the watch,
        whose cancellation (a broken connection) must not lose it half-way."""
        if self.policy.active is None:
            await self.policy.set_cluster_policy(data, revision)  # kept for the start
            return
        self._policy = (data, revision)
        self._wake_applier()

    def _wake_applier(self) -> None:
        if self._applier is None or self._applier.done():
            self._applier = asyncio.create_task(self._apply_pending(), name="etcd-apply")

    async def _apply_pending(self) -> None:
        while self._remote is not None or self._policy is not None:
            # Shielded like a discovery source's report: a stop must not
            # cancel an apply half-way.
            if self._policy is not None:
                (data, revision), self._policy = self._policy, None
                await asyncio.shield(self.policy.set_cluster_policy(data, revision))
            if self._remote is not None:
                remote, self._remote = self._remote, None
                await asyncio.shield(self.policy.update_discovered(SOURCE, remote))

    def on_applied(self, active: ActivePolicy, merged: Merged) -> None:
        """Publish this node's workloads and report as of this generation. A
        cluster policy's own workloads are every node's already."""
        skip_static = self.policy.from_cluster
        self.node.set_local({
            k.name: LocalWorkload(k.name, k.source, k.labels, _hosts(k.addresses))
            for k in merged.known.values()
            if k.node is None and not (skip_static and k.source == STATIC)})
        self.node.set_report(active.loaded.sha256, active.generation)
        loaded = active.loaded
        if loaded.source == CLUSTER and loaded.sha256 != self._cached_sha:
            self._cache_policy(loaded.data, loaded.revision or 0)
            self._cached_sha = loaded.sha256

    def _cache_policy(self, data: bytes, revision: int) -> None:
        d = trusted_state_dir(self.state_dir, True, "cluster policy")
        if d is None:
            return
        try:
            write_atomically(d / POLICY_CACHE, orjson.dumps(
                {"revision": revision, "policy": data.decode()}), mode=0o600)
        except (OSError, UnicodeDecodeError) as e:
            log.warning("cluster policy not kept for a restart: %s", e)

    def restore_policy(self) -> bool:
        """etcd unreachable at start: the cluster policy this node last
        applied, if it kept one."""
        d = trusted_state_dir(self.state_dir, False, "cluster policy")
        try:
            if d is None:
                raise FileNotFoundError("no state directory")
            kept = orjson.loads((d / POLICY_CACHE).read_bytes())
            data, revision = kept["policy"].encode(), int(kept["revision"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.error("etcd unreachable and no cluster policy kept from an earlier run (%s)",
                      e)
            return False
        self.policy.cluster_policy = (data, revision)
        log.warning("etcd unreachable: enforcing the cluster policy this node last applied "
                    "(revision %d) until etcd answers", revision)
        return True

    async def put_policy(self, data: bytes) -> int:
        return await self.node.put_policy(data)

    def nodes(self) -> list[dict]:
        """Every node etcd knows of, this one as it is now; sorted by name."""
        me = self.node
        rows = {n: dict(info) for n, info in me.nodes.items()}
        heartbeat = rows.get(me.node, {}).get("heartbeat")  # as etcd last said it
        rows[me.node] = {**me.own(), "heartbeat": heartbeat}
        for name, row in rows.items():
            row["self"] = name == me.node
            row["etcd_up"] = me.up  # False: the last known rows, not fresh
        return [rows[n] for n in sorted(rows)]

    def status(self) -> dict:
        return self.node.status()

    async def stop(self) -> None:
        for task in (self._task, self._applier):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._task = self._applier = None
        await self.node.leave()  # bounded, and says itself if it could not
        await self.client.close()
