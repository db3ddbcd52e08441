"""A staged candidate policy beside the active one (docs/policy.md "Staging").

`stage` validates a candidate, merges it with the discovered workloads like
the active policy, compiles it and loads it into the datapath's staged slots
(Datapath.stage_policy): from then on every new flow is judged by both and
the active policy decides. `promote` writes the candidate over the policy
file and reloads — the same one-write switch as any reload — then drops the
staged one; `clear` drops it.

The candidate survives a daemon restart: its text and when it was staged are
kept in a state directory of the daemon's own (beside its control socket,
0700, root's, checked before every use: a directory others could write is
not used), and re-staged at start. A candidate invalid for any reason
changes nothing: the one staged before (or none) stays.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from microseg.inventory.model import DiscoveredWorkload
from microseg.kernel import abi
from microseg.policy.compile import CompiledPolicy
from microseg.policy.edit import write_atomically
from microseg.policy.inventory import merge
from microseg.policy.parse import (
    MAX_FILE_BYTES,
    Issue,
    LoadedPolicy,
    PolicyError,
    open_policy_file,
    parse_policy,
)
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

    datapath: Any
    path: str
    active: Any
    discovered: Mapping[str, Mapping[str, DiscoveredWorkload]]
    known: Mapping[str, object]

    @property
    def lock(self) -> asyncio.Lock: ...

    @property
    def generation(self) -> int: ...

    @property
    def from_cluster(self) -> bool: ...

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
    known: object = None     # the manager's workloads it was compiled with

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
        """Rule ids are kept across re-stages of one candidate: a generation
        older than the history is named with the current compile."""
        found = self.history.get(generation)
        if found is None and self.staged is not None:
            return self.staged.compiled
        return found

    # -- changing it --------------------------------------------------------------

    async def stage(self, data: bytes, source: str) -> ReloadResult:
        """Validate and load a candidate; on any error the previous state stays."""
        m = self.manager
        started = time.perf_counter()
        loop = asyncio.get_running_loop()
        try:
            # Parsed before the lock: a large candidate must not hold up
            # reloads and container changes meanwhile.
            loaded = await loop.run_in_executor(None, parse_policy, data, source)
            async with m.lock:
                if m.active is None:
                    raise PolicyError(source, [Issue(1, 1, "no active policy to stage beside")])
                staged = await self._load(loaded, time.time_ns(), None, reset=True)
                self._save(staged)
        except PolicyError as e:
            errors = [i.format(e.filename) for i in e.errors] or [str(e)]
            log.error("staged policy refused, %s: %d error(s), first: %s",
                      "the staged one stays" if self.staged else "nothing staged",
                      len(errors), errors[0])
            return ReloadResult("rejected", self.staged.generation if self.staged else 0,
                                source, None, errors=errors, at_ns=time.time_ns())
        ms = (time.perf_counter() - started) * 1000
        log.info("policy staged generation=%#x rules=%d source=%s stage_ms=%.1f",
                 staged.generation, len(loaded.policy.rules), source, ms)
        warnings = [w.format(source) for w in loaded.warnings]
        active = m.active.loaded.policy.discover if m.active else None
        if active is not None and loaded.policy.discover != active:
            warnings.append(
                f"{source}: its discover section differs from the active policy's: it is "
                "judged with the active policy's workloads; promoting it changes what is "
                "discovered")
        for w in warnings:
            log.warning("staged policy %s", w)
        return ReloadResult("staged", staged.generation, source, loaded.sha256,
                            warnings=warnings, rules=len(loaded.policy.rules),
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
        # The candidate is judged with the workloads the active policy has
        # (docs/policy.md "Staging"): the active policy's discover section.
        assert m.active is not None
        active = m.active.loaded.policy
        known = m.known
        merged = merge(replace(loaded.policy, discover=active.discover), m.discovered)
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
                                   now if baseline is None else baseline, known)
        return self.staged

    async def follow(self) -> None:
        """After any apply (the manager's lock held): if the workloads the
        active policy is compiled with changed, the candidate is compiled
        with them too — the same candidate for status."""
        s = self.staged
        if s is None or s.known == self.manager.known:
            return
        try:
            await self._load(s.loaded, s.since_ns, s.baseline)
        except PolicyError as e:
            log.error("staged policy not updated with the inventory: %s", e)

    async def clear(self) -> StagedPolicy:
        async with self.manager.lock:
            return await self._clear()

    async def _clear(self) -> StagedPolicy:
        """(the manager's lock held, so that no stage writes the slots
        while they are emptied)"""
        s = self.staged
        if s is None:
            raise NothingStaged("nothing is staged")
        dp = self.manager.datapath
        dp.clear_staged()
        self.staged = None
        self._forget()
        # Its entries share the maps' capacity with the active policy.
        await asyncio.get_running_loop().run_in_executor(None, dp.empty_staged)
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
        if m.from_cluster:
            return ReloadResult("rejected", m.generation, m.path, None, errors=[
                "the active policy is the cluster's (etcd): `microseg policy apply --cluster "
                "FILE` makes a candidate every node's policy"], at_ns=time.time_ns())
        loop = asyncio.get_running_loop()
        try:
            with open_policy_file(m.path) as f:
                before: bytes | None = f.read(MAX_FILE_BYTES + 1)
        except OSError:
            before = None  # no file yet (`--policy-default audit`)
        await loop.run_in_executor(None, write_atomically, m.path, s.loaded.data)
        res = await m.reload("promote", force=True)
        if res.result == "applied" and res.sha256 == s.loaded.sha256:
            async with m.lock:
                if self.staged is s:
                    await self._clear()
            log.info("staged policy promoted: generation %d", res.generation)
            return res
        if res.result == "rejected" and before is not None:
            # The file must say what runs: the policy it held comes back.
            await loop.run_in_executor(None, write_atomically, m.path, before)
            res.errors.append(f"{m.path}: the file was restored to the policy still enforced")
        elif res.result == "applied":
            # Someone wrote the file between our write and the reload.
            res.result = "rejected"
            res.errors.append(f"{m.path} changed while the candidate was promoted: "
                              f"generation {res.generation} enforces that file, not the "
                              "candidate, which stays staged")
        log.error("staged policy not promoted: %s", "; ".join(res.errors) or res.result)
        return res

    # -- kept across restarts -----------------------------------------------------

    def _trusted_dir(self, create: bool) -> Path | None:
        return trusted_state_dir(self.state_dir, create, "staged policy")

    def _save(self, s: StagedPolicy) -> None:
        d = self._trusted_dir(create=True)
        if d is None:
            return
        meta = {"source": s.loaded.source, "since_ns": s.since_ns,
                "baseline": [[v, dif, n] for (v, dif), n in s.baseline.items()]}
        try:
            # 0600, in a directory only we may write: no one plants a link.
            write_atomically(d / STATE_POLICY, s.loaded.data, mode=0o600)
            write_atomically(d / STATE_META, json.dumps(meta).encode(), mode=0o600)
        except OSError as e:
            log.warning("staged policy not kept for a restart: %s", e)

    def _forget(self) -> None:
        d = self._trusted_dir(create=False)
        if d is None:
            return
        for name in (STATE_POLICY, STATE_META):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(d / name)

    def _read_state(self) -> tuple[LoadedPolicy, int, dict | None] | None:
        """The candidate an earlier daemon kept: (policy, since, baseline).
        Anything wrong with it is logged and it is dropped."""
        d = self._trusted_dir(create=False)
        if d is None:
            return None
        try:
            with open_policy_file(d / STATE_POLICY) as f:
                data = f.read(MAX_FILE_BYTES + 1)
            with open_policy_file(d / STATE_META) as f:
                meta = json.loads(f.read(1 << 20))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, RecursionError) as e:
            log.warning("staged policy of an earlier daemon not read: %s", e)
            return None
        try:
            source, since = meta["source"], meta["since_ns"]
            if not isinstance(source, str) or not isinstance(since, int) \
                    or not 0 < since < 1 << 62:
                raise ValueError("source or since_ns out of shape")
            baseline = {(abi.Verdict(v), bool(dif)): int(n) for v, dif, n in meta["baseline"]}
            return parse_policy(data, source), since, baseline
        except (PolicyError, KeyError, TypeError, ValueError) as e:
            log.warning("staged policy of an earlier daemon dropped: %s", e)
            return None

    async def restore(self) -> None:
        """At start, after the first policy applied: the candidate an earlier
        daemon staged is staged again; without one, a staged generation
        left in the pins is switched off (its rules cannot be named)."""
        m = self.manager
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(None, self._read_state)
        async with m.lock:
            if found is None:
                if m.datapath.staged_generation():
                    m.datapath.clear_staged()
                self._forget()
                return
            loaded, since, baseline = found
            # Pins that still carry the stage kept its counters; new pins
            # (a clean stop removes them) count from zero.
            kept = bool(m.datapath.staged_generation())
            try:
                await self._load(loaded, since, baseline if kept else None, reset=not kept)
            except PolicyError as e:
                log.warning("staged policy of an earlier daemon dropped: %s", e)
                m.datapath.clear_staged()
                self._forget()
                return
        log.info("staged policy restored: %s, staged generation %#x", loaded.source,
                 self.staged.generation if self.staged else 0)


def trusted_state_dir(d: Path | None, create: bool, what: str) -> Path | None:
    """A daemon state directory, if it is ours alone: a real directory (no
    symlink), owned by this user, nobody else may enter. None: not used
    (said once per call)."""
    if d is None:
        return None
    try:
        if create:
            d.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):
                d.mkdir(mode=0o700)
        st = os.lstat(d)
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("%s state %s: %s; not kept for a restart", what, d, e)
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o077:
        log.warning("%s state %s is not a directory only this daemon's user may enter; "
                    "not used", what, d)
        return None
    return d
