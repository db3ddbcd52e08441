"""A staged candidate policy beside the active one (docs/policy.md "Staging").

`stage` validates a candidate, merges it with the discovered workloads like
the active policy, compiles it and loads it into the datapath's staged slots
(Datapath.stage_policy): from then on every new flow is judged by both and
the active policy decides. `promote` writes the candidate over the policy
file and reloads — the same one-write switch as any reload — then drops the
staged one; `clear` drops it.

The candidate survives a daemon restart: its text and when it was staged are
kept in the state directory (the control socket's), and re-staged at start.
A candidate invalid for any reason changes nothing: the one staged before
(or none) stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from microseg.inventory.model import DiscoveredWorkload
from microseg.kernel import abi
from microseg.policy.compile import CompiledPolicy
from microseg.policy.edit import write_atomically
from microseg.policy.inventory import merge
from microseg.policy.parse import Issue, LoadedPolicy, PolicyError, parse_policy
from microseg.policy.result import ReloadResult, compile_quietly

log = logging.getLogger("microseg.policy")

STATE_POLICY = "staged.yaml"
STATE_META = "staged.json"
# Staged generations whose compiled policy is kept to name the rules events
# judged under them mention (a re-stage after each inventory change).
HISTORY = 4


class NothingStaged(Exception):
    """promote/clear with no candidate staged."""


class Manager(Protocol):
    """What the stager needs of the policy manager (microseg/policy/manager.py)."""

    datapath: object
    path: str
    active: object | None
    discovered: Mapping[str, Mapping[str, DiscoveredWorkload]]

    @property
    def lock(self) -> asyncio.Lock: ...

    async def reload(self, reason: str, *, force: bool = False) -> ReloadResult: ...


@dataclass
class StagedPolicy:
    loaded: LoadedPolicy
    compiled: CompiledPolicy
    generation: int          # STAGED_GENERATION set
    since_ns: int            # wall clock, when it was staged
    # staged_stats_map when it was staged: the counters are the kernel's,
    # monotonic for the metrics; status shows what this candidate added.
    baseline: dict[tuple[int, bool], int]

    def judged(self, now: dict[tuple[int, bool], int]) -> dict[tuple[int, bool], int]:
        return {k: n - self.baseline.get(k, 0) for k, n in now.items()
                if n - self.baseline.get(k, 0) > 0}


class Stager:
    """The staged candidate of one PolicyManager."""

    def __init__(self, manager: Manager, state_dir: str | None) -> None:
        self.manager = manager
        self.state_dir = Path(state_dir) if state_dir else None
        self.staged: StagedPolicy | None = None
        self.history: dict[int, CompiledPolicy] = {}

    # -- what events and status read ---------------------------------------------

    def compiled_for(self, generation: int) -> CompiledPolicy | None:
        return self.history.get(generation)

    # -- changing it --------------------------------------------------------------

    async def stage(self, data: bytes, source: str) -> ReloadResult:
        """Validate and load a candidate; on any error the previous state stays."""
        m = self.manager
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        async with m.lock:
            try:
                loaded = await loop.run_in_executor(None, parse_policy, data, source)
                if m.active is None:
                    raise PolicyError(source, [Issue(1, 1, "no active policy to stage beside")])
                staged = await self._load(loaded, time.time_ns(), None, reset=True)
            except PolicyError as e:
                errors = [i.format(e.filename) for i in e.errors] or [str(e)]
                log.error("staged policy refused, %s: %d error(s), first: %s",
                          "the staged one stays" if self.staged else "nothing staged",
                          len(errors), errors[0])
                return ReloadResult("rejected", self.staged.generation if self.staged else 0,
                                    source, None, errors=errors, at_ns=time.time_ns())
            self._save(staged)
        ms = (time.perf_counter() - started) * 1000
        log.info("policy staged generation=%#x rules=%d source=%s stage_ms=%.1f",
                 staged.generation, len(loaded.policy.rules), source, ms)
        return ReloadResult("staged", staged.generation, source, loaded.sha256,
                            warnings=[w.format(source) for w in loaded.warnings],
                            rules=len(loaded.policy.rules),
                            workloads=len(loaded.policy.workloads), apply_ms=ms,
                            at_ns=time.time_ns())

    async def _load(self, loaded: LoadedPolicy, since_ns: int,
                    baseline: dict[tuple[int, bool], int] | None, *,
                    reset: bool = False) -> StagedPolicy:
        """Compile loaded with the discovered workloads and switch it in
        (the manager's lock held). reset: a new candidate, whose rules'
        hits count from zero."""
        m = self.manager
        loop = asyncio.get_running_loop()
        previous = self.staged.compiled if self.staged and not reset else None
        merged = merge(loaded.policy, m.discovered)
        compiled = await loop.run_in_executor(None, compile_quietly, merged.policy, previous)
        dp = m.datapath

        def switch() -> tuple[int, dict[tuple[int, bool], int]]:
            if reset:
                dp.reset_staged_rule_stats()
            return dp.stage_policy(compiled), dp.read_staged_stats()

        try:
            gen, now = await loop.run_in_executor(None, switch)
        except (OSError, ValueError) as e:
            raise PolicyError(loaded.source, [Issue(1, 1, f"cannot stage: {e}")]) from None
        self.history[gen] = compiled
        for old in sorted(self.history)[:-HISTORY]:
            del self.history[old]
        self.staged = StagedPolicy(loaded, compiled, gen, since_ns,
                                   now if baseline is None else baseline)
        return self.staged

    async def restage(self) -> None:
        """The discovered workloads changed: the candidate is compiled with
        them too (the manager's lock held), the same candidate for status."""
        s = self.staged
        if s is None:
            return
        try:
            await self._load(s.loaded, s.since_ns, s.baseline)
        except PolicyError as e:
            log.error("staged policy not updated with the inventory: %s", e)

    async def clear(self) -> StagedPolicy:
        async with self.manager.lock:
            return self._clear()

    def _clear(self) -> StagedPolicy:
        s = self.staged
        if s is None:
            raise NothingStaged("nothing is staged")
        self.manager.datapath.clear_staged()
        self.staged = None
        self._forget()
        log.info("staged policy cleared (was %s, staged %.0f s ago)", s.loaded.source,
                 (time.time_ns() - s.since_ns) / 1e9)
        return s

    async def promote(self) -> ReloadResult:
        """The candidate becomes the policy file and the active policy (a
        reload: one write switches it in); then nothing is staged."""
        m = self.manager
        s = self.staged
        if s is None:
            raise NothingStaged("nothing is staged")
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, write_atomically, m.path, s.loaded.data)
        res = await m.reload("promote", force=True)
        if res.result == "applied" and res.sha256 == s.loaded.sha256:
            async with m.lock:
                if self.staged is s:
                    self._clear()
            log.info("staged policy promoted: generation %d", res.generation)
        return res

    # -- kept across restarts -----------------------------------------------------

    def _save(self, s: StagedPolicy) -> None:
        if self.state_dir is None:
            return
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomically(self.state_dir / STATE_POLICY, s.loaded.data)
            meta = {"source": s.loaded.source, "since_ns": s.since_ns,
                    "baseline": [[v, d, n] for (v, d), n in s.baseline.items()]}
            write_atomically(self.state_dir / STATE_META, json.dumps(meta).encode())
        except OSError as e:
            log.warning("staged policy not kept for a restart: %s", e)

    def _forget(self) -> None:
        if self.state_dir is None:
            return
        for name in (STATE_POLICY, STATE_META):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.state_dir / name)

    async def restore(self) -> None:
        """At start, after the first policy applied: the candidate an earlier
        daemon staged is staged again; without one, a staged generation
        left in the pins is switched off (its rules cannot be named)."""
        m = self.manager
        found = None
        if self.state_dir is not None:
            try:
                data = (self.state_dir / STATE_POLICY).read_bytes()
                meta = json.loads((self.state_dir / STATE_META).read_text())
                found = (data, meta)
            except FileNotFoundError:
                pass
            except (OSError, ValueError) as e:
                log.warning("staged policy of an earlier daemon not read: %s", e)
        async with m.lock:
            if found is None:
                if m.datapath.staged_generation():
                    m.datapath.clear_staged()
                return
            data, meta = found
            try:
                loaded = parse_policy(data, meta["source"])
                # Pins that still carry the stage kept its counters; new pins
                # (a clean stop removes them) count from zero.
                kept = bool(m.datapath.staged_generation())
                baseline = {(abi.Verdict(v), bool(d)): n for v, d, n in meta["baseline"]} \
                    if kept else None
                await self._load(loaded, int(meta["since_ns"]), baseline, reset=not kept)
            except (PolicyError, KeyError, TypeError, ValueError) as e:
                log.warning("staged policy of an earlier daemon dropped: %s", e)
                m.datapath.clear_staged()
                self._forget()
                return
        log.info("staged policy restored: %s, staged generation %#x", meta["source"],
                 self.staged.generation if self.staged else 0)
