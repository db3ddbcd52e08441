"""Discovered workloads through the real program: the policy manager merges
a source's inventory with the policy file and applies it as a generation;
packets from a container's address are judged by its labels at once, and by
nothing once it is gone (docs/policy.md "Discovery")."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

from microseg.inventory.model import DiscoveredWorkload
from microseg.kernel.abi import Reason, Verdict
from microseg.policy.manager import PolicyManager

from .harness import TC_ACT_SHOT, Harness, tcp

POLICY = """\
version: 1
default: deny
discover:
  docker: {socket: /run/test-docker.sock}
workloads:
  client: {addresses: [10.77.0.2, "fd00:77::2"], labels: {role: client}}
  # A static workload wins over a container of its name.
  pinned: {addresses: [10.77.0.200], labels: {tier: web}}
rules:
  - {name: to-web, from: [{labels: {role: client}}], to: [{labels: {tier: web}}],
     protocol: tcp, ports: [80], action: allow}
  - {name: to-api, from: [{labels: {role: client}}], to: [{workload: api}],
     protocol: tcp, ports: [8080], action: allow}
"""

CLIENT4, CLIENT6 = "10.77.0.2", "fd00:77::2"


def container(name: str, addresses: list[str], **labels: str) -> DiscoveredWorkload:
    return DiscoveredWorkload.make(name, labels, addresses, "docker", f"id-{name}")


class Manager:
    """A PolicyManager on the loaded datapath, driven from a private loop;
    what it publishes is kept."""

    def __init__(self, dp: Harness, path: Path) -> None:
        self.events: list[dict] = []
        self.loop = asyncio.new_event_loop()
        self.pm = PolicyManager(dp.dp, str(path), publish=self.events.append)
        self.dp = dp

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def reload(self) -> None:
        res = self.run(self.pm.reload("test", force=True))
        assert res.result == "applied", res.errors
        self.dp.compiled = self.pm.active.compiled

    def discovered(self, *workloads: DiscoveredWorkload) -> int:
        gen = self.run(self.pm.update_discovered("docker", {w.name: w for w in workloads}))
        self.dp.compiled = self.pm.active.compiled
        return gen

    def close(self) -> None:
        self.run(self.pm.converge_now())
        self.loop.close()
        gc.unfreeze()

    def workload_events(self) -> list[tuple[str, str, str]]:
        out = [(e["action"], e["workload"], e["source"]) for e in self.events
               if e["type"] == "workload"]
        self.events.clear()
        return out


@pytest.fixture
def manager(dp: Harness, tmp_path: Path) -> Iterator[Manager]:
    tmp_path.chmod(0o755)
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY)
    m = Manager(dp, path)
    try:
        yield m
    finally:
        m.close()


def verdict(dp: Harness, src: str, dst: str, port: int, sport: int = 40000):
    out = dp.send(tcp(src, dst, sport, port))
    return out.verdict


def test_a_container_is_judged_by_its_labels(dp: Harness, manager: Manager) -> None:
    manager.reload()
    assert verdict(dp, CLIENT4, "172.30.0.5", 80).verdict == Verdict.DENIED  # nobody's yet
    gen = manager.discovered(container("shop-web-1", ["172.30.0.5", "fd00:30::5"], tier="web"))
    assert gen == dp.dp.active_generation()
    v = verdict(dp, CLIENT4, "172.30.0.5", 80, sport=40001)
    assert (v.verdict, v.reason, dp.rule_name(v.rule_id)) == (Verdict.ALLOWED, Reason.RULE,
                                                               "to-web")
    v6 = verdict(dp, CLIENT6, "fd00:30::5", 80)
    assert v6.verdict == Verdict.ALLOWED
    # By name, once a container of that name runs.
    assert verdict(dp, CLIENT4, "172.30.0.9", 8080).verdict == Verdict.DENIED
    manager.discovered(container("shop-web-1", ["172.30.0.5", "fd00:30::5"], tier="web"),
                       container("api", ["172.30.0.9"]))
    assert verdict(dp, CLIENT4, "172.30.0.9", 8080, sport=40002).verdict == Verdict.ALLOWED


def test_a_stopped_containers_address_is_forgotten_and_reused_by_its_own_labels(
        dp: Harness, manager: Manager) -> None:
    manager.reload()
    manager.discovered(container("web", ["172.30.0.5"], tier="web"))
    assert dp.send(tcp(CLIENT4, "172.30.0.5", 40000, 80)).passed
    est = dp.session(CLIENT4, "172.30.0.5")
    assert est.rule_id
    # It stops; another container is given its address, with other labels.
    manager.discovered()
    manager.discovered(container("intruder", ["172.30.0.5"], tier="batch"))
    # The session of the old one is judged again on its next packet: revoked.
    out = dp.send(tcp(CLIENT4, "172.30.0.5", 40000, 80, flags="A"))
    assert out.action == TC_ACT_SHOT
    assert out.verdict.reason == Reason.REVOKED
    # And a new connection to the address meets the new labels.
    out = dp.send(tcp(CLIENT4, "172.30.0.5", 40001, 80))
    assert out.action == TC_ACT_SHOT and out.verdict.verdict == Verdict.DENIED


def test_static_wins_and_events_say_what_changed(dp: Harness, manager: Manager) -> None:
    manager.reload()
    assert sorted(manager.workload_events()) == [("added", "client", "static"),
                                                 ("added", "pinned", "static")]
    manager.discovered(container("pinned", ["172.30.0.66"], tier="db"),
                       container("db", ["172.30.0.7"], tier="db"))
    assert manager.workload_events() == [("added", "db", "docker")]
    assert manager.pm.known["pinned"].source == "static"
    # The container named like the static workload has no identity of its own.
    assert verdict(dp, CLIENT4, "172.30.0.66", 80).verdict == Verdict.DENIED
    assert verdict(dp, CLIENT4, "10.77.0.200", 80).verdict == Verdict.ALLOWED
    manager.discovered(container("db", ["172.30.0.8"], tier="db"))
    assert manager.workload_events() == [("changed", "db", "docker")]
    manager.discovered()
    assert manager.workload_events() == [("removed", "db", "docker")]


def test_reports_that_arrive_during_an_apply_are_applied_together(
        dp: Harness, manager: Manager) -> None:
    """A burst of engine events is not a burst of generations: what
    arrives while one apply runs is compiled in by the next, once."""
    manager.reload()
    before = dp.dp.active_generation()
    pm = manager.pm

    async def burst() -> list[int | None]:
        return await asyncio.gather(*(
            pm.update_discovered("docker", {f"c{j}": container(f"c{j}", [f"172.30.1.{j}"])
                                            for j in range(1, i + 1)})
            for i in range(1, 21)))

    gens = manager.run(burst())
    after = dp.dp.active_generation()
    assert after - before < 20, (before, after)
    assert set(gens) <= set(range(before + 1, after + 1))
    assert len(pm.known) == 2 + 20
    dp.compiled = pm.active.compiled
    assert {e.workload for e in pm.active.compiled.identities} >= {f"c{j}" for j in range(1, 21)}
