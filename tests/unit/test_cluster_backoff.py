"""The node's retry policy (microseg/cluster/node.py run): back-off doubles
while etcd stays away, up to 10 s, and starts small again after a
connection that worked — a new outage is not met with the last one's
longest wait. (The reconnections themselves run against a real etcd in
tests/cluster and tests/e2e.)"""

from __future__ import annotations

import asyncio

import pytest

from microseg.cluster import node as node_module
from microseg.cluster.etcd import EtcdClient, EtcdError
from microseg.cluster.node import BACKOFF_S, ClusterNode


class Scripted(ClusterNode):
    """_session follows a script: "fail", or "connect" (a list that worked,
    then the connection broke)."""

    def __init__(self, script: list[str]) -> None:
        async def nothing(*_: object) -> None:
            return None

        super().__init__(EtcdClient(["http://127.0.0.1:1"], "/t/"), "n", 5, version="t",
                         on_workloads=nothing)
        self.script = script

    async def _session(self) -> None:
        step = self.script.pop(0)
        if step == "connect":
            self.up, self.resyncs = True, self.resyncs + 1
        raise EtcdError("gone")


async def test_back_off_doubles_then_starts_over_after_a_connection(monkeypatch) -> None:
    waits: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(node_module.random, "uniform", lambda a, b: 1.0)
    monkeypatch.setattr(node_module.asyncio, "sleep", sleep)
    script = ["fail"] * 8 + ["connect", "fail", "fail"]
    n = Scripted(list(script))
    task = asyncio.create_task(n.run())
    while n.script:
        await real_sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    lo, hi = BACKOFF_S
    assert waits[:8] == [min(lo * 2 ** i, hi) for i in range(8)]
    assert waits[8:10] == [lo, lo * 2]  # after the connection: small again
    assert n.errors >= 10 and not n.up
    await n.client.close()
