"""The staged candidate's bookkeeping (microseg/policy/staging.py) where the
real daemon cannot be made to fail on cue: a promote whose reload is refused
or races an edit, state files that are corrupt or not ours, a re-stage when
the workloads change. The datapath and the manager are stand-ins with the
few calls the stager makes; the real ones are tests/datapath/test_staged.py
and tests/e2e/test_lifecycle.py."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from microseg.kernel import abi
from microseg.policy.parse import parse_policy
from microseg.policy.result import ReloadResult
from microseg.policy.staging import STATE_META, STATE_POLICY, Stager

ACTIVE = b"version: 1\nmode: audit\ndefault: deny\n"
CANDIDATE = (b"version: 1\ndefault: deny\nworkloads:\n  web: {addresses: [10.0.0.1]}\n"
             b"rules:\n  - {name: r, from: any, to: {workload: web}, action: allow}\n")


class Datapath:
    def __init__(self) -> None:
        self.staged = 0
        self.n = 0
        self.emptied = 0

    def stage_policy(self, compiled) -> int:
        self.n += 1
        self.staged = abi.STAGED_GENERATION | self.n
        return self.staged

    def clear_staged(self) -> None:
        self.staged = 0

    def staged_generation(self) -> int:
        return self.staged

    def read_staged_stats(self) -> dict:
        return {}

    def reset_staged_rule_stats(self) -> None:
        pass

    def empty_staged(self) -> None:
        self.emptied += 1


class Active:
    def __init__(self, data: bytes) -> None:
        self.loaded = parse_policy(data, "active.yaml")


class Manager:
    def __init__(self, path: Path) -> None:
        self.datapath = Datapath()
        self.path = str(path)
        path.write_bytes(ACTIVE)
        self.active = Active(ACTIVE)
        self.discovered: dict = {}
        self.known: dict = {}
        self.lock = asyncio.Lock()
        self.answer = "applied"       # what the next reload says
        self.edit_before_reload: bytes | None = None
        self.from_cluster = False     # a policy file's, not etcd's
        self.generation = 1

    async def reload(self, reason: str, *, force: bool = False) -> ReloadResult:
        if self.edit_before_reload is not None:  # someone else writes the file
            Path(self.path).write_bytes(self.edit_before_reload)
        data = Path(self.path).read_bytes()
        loaded = parse_policy(data, self.path)
        if self.answer == "rejected":
            return ReloadResult("rejected", 1, self.path, None, errors=["cannot apply: full"])
        self.active = Active(data)
        return ReloadResult("applied", 2, self.path, loaded.sha256)


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Manager, Stager]:
    m = Manager(tmp_path / "policy.yaml")
    return m, Stager(m, str(tmp_path / ".ms.sock.state"))


def run(coro):
    return asyncio.run(coro)


def test_promote_refused_restores_the_file(setup) -> None:
    m, st = setup
    assert run(st.stage(CANDIDATE, "cand.yaml")).result == "staged"
    m.answer = "rejected"
    res = run(st.promote())
    assert res.result == "rejected"
    assert Path(m.path).read_bytes() == ACTIVE         # the file says what runs
    assert any("restored" in e for e in res.errors)
    assert st.staged is not None                       # still staged


def test_promote_racing_an_edit_is_not_a_promote(setup) -> None:
    m, st = setup
    run(st.stage(CANDIDATE, "cand.yaml"))
    m.edit_before_reload = ACTIVE + b"# someone's edit\n"
    res = run(st.promote())
    assert res.result == "rejected" and any("changed while" in e for e in res.errors)
    assert st.staged is not None


def test_promote_clears_and_frees_the_slots(setup) -> None:
    m, st = setup
    run(st.stage(CANDIDATE, "cand.yaml"))
    assert run(st.promote()).result == "applied"
    assert st.staged is None and m.datapath.staged == 0 and m.datapath.emptied == 1
    assert Path(m.path).read_bytes() == CANDIDATE


def test_state_is_private_and_restored(setup, tmp_path: Path) -> None:
    m, st = setup
    run(st.stage(CANDIDATE, "cand.yaml"))
    d = tmp_path / ".ms.sock.state"
    assert d.stat().st_mode & 0o777 == 0o700
    assert {f.name: f.stat().st_mode & 0o777 for f in d.iterdir()} == {
        STATE_POLICY: 0o600, STATE_META: 0o600}
    again = Stager(m, str(d))
    m.datapath.staged = 0  # new pins: counts start anew
    run(again.restore())
    assert again.staged is not None and again.staged.loaded.data == CANDIDATE
    assert again.staged.since_ns == st.staged.since_ns


@pytest.mark.parametrize("meta", [
    '{"source": "c.yaml", "since_ns": 1e400, "baseline": []}',
    '{"source": "c.yaml", "since_ns": 1e30, "baseline": []}',
    '{"source": null, "since_ns": 5, "baseline": []}',
    "[" * 100_000 + "]" * 100_000,
    "not json",
    '{"source": "c.yaml", "since_ns": 5, "baseline": [[99, 1, 2]]}',
])
def test_a_corrupt_state_is_dropped_not_fatal(setup, tmp_path: Path, meta: str,
                                              caplog: pytest.LogCaptureFixture) -> None:
    m, st = setup
    run(st.stage(CANDIDATE, "cand.yaml"))
    (tmp_path / ".ms.sock.state" / STATE_META).write_text(meta)
    again = Stager(m, str(tmp_path / ".ms.sock.state"))
    run(again.restore())
    assert again.staged is None and m.datapath.staged == 0
    assert "staged policy of an earlier daemon" in caplog.text


@pytest.mark.parametrize("how", ["open to others", "a symlink"])
def test_a_state_directory_others_could_write_is_not_used(setup, tmp_path: Path, how: str,
                                                          caplog) -> None:
    m, st = setup
    d = tmp_path / ".ms.sock.state"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    if how == "a symlink":
        os.symlink(elsewhere, d)
    else:
        d.mkdir()
        os.chmod(d, 0o777)
    assert run(st.stage(CANDIDATE, "cand.yaml")).result == "staged"  # staged all the same
    assert not list(elsewhere.iterdir())
    if how == "open to others":
        assert not list(d.iterdir())
    (elsewhere / STATE_POLICY).write_bytes(CANDIDATE)  # planted
    (elsewhere / STATE_META).write_text(json.dumps({"source": "x", "since_ns": 5,
                                                    "baseline": []}))
    again = Stager(m, str(d))
    run(again.restore())
    assert again.staged is None
    assert "not a directory only this daemon's user may enter" in caplog.text


def test_follows_the_workloads_of_the_active_policy(setup) -> None:
    m, st = setup
    run(st.stage(CANDIDATE, "cand.yaml"))
    first = st.staged.generation

    async def apply_with(known: dict) -> None:
        async with m.lock:
            m.known = known
            await st.follow()

    run(apply_with({}))                       # unchanged: not staged again
    assert st.staged.generation == first
    run(apply_with({"db1": object()}))        # a container came: compiled again
    assert st.staged.generation != first and st.staged.since_ns > 0
    assert st.compiled_for(first) is not None
