"""The policy manager's reloads of an edited file, without a kernel: a rule
edit is re-read and compiled as an edit (what the datapath then writes is
the delta), and whatever the path, what is applied is what a full parse
and compile of the file give; a file that becomes invalid keeps the policy
that runs."""

from __future__ import annotations

import asyncio
from pathlib import Path

from microseg.policy.compile import CompiledPolicy, _compile_full
from microseg.policy.manager import PolicyManager
from microseg.policy.parse import parse_policy

from .test_policy_reparse import HEAD, HEAD_ALLOW, _file, _rule, _text


class FakeDatapath:
    def __init__(self) -> None:
        self.applied: list[CompiledPolicy] = []

    def apply_policy(self, compiled: CompiledPolicy, *, converge: bool = True) -> int:
        self.applied.append(compiled)
        return len(self.applied)

    def converge(self) -> None:
        pass


def _full(path: Path, previous: CompiledPolicy) -> dict:
    """A full parse and a full compile of the file (ids kept from previous)."""
    policy = parse_policy(path.read_bytes(), str(path)).policy
    return _compile_full(policy, previous).map_contents()


def test_edits_apply_what_a_full_read_gives(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    items = _file(60)
    path.write_bytes(_text(items))
    dp = FakeDatapath()
    pm = PolicyManager(dp, str(path), insecure_permissions=True)

    async def reload() -> str:
        before = pm.active.compiled
        res = await pm.reload("file changed")
        if res.result == "applied":
            assert pm.active.compiled.map_contents() == _full(path, before)
        return res.result

    async def go() -> None:
        assert (await pm.reload("start", force=True)).result == "applied"
        # A rule changed, then one appended: read and compiled as edits.
        items[30] = _rule(777, 0, "db", "cache", 9000)
        path.write_bytes(_text(items))
        assert await reload() == "applied"
        items.append(_rule(778, 2))
        path.write_bytes(_text(items))
        assert await reload() == "applied"
        assert pm._reparser.shortcuts == 2
        assert all(c.delta is not None for c in dp.applied[1:])

        # Invalid: rejected, the running policy and generation stay.
        gen, running = pm.generation, pm.active
        broken = _text([*items[:5], "  - name: broken\n    from: any\n", *items[5:]])
        path.write_bytes(broken)
        line = broken.split(b"\n").index(b"  - name: broken") + 1
        res = await pm.reload("file changed")
        assert res.result == "rejected" and res.generation == gen
        assert res.errors == [f"{path}:{line}:5: rules[5] (broken): missing 'to' (any, or "
                              "selectors)",
                              f"{path}:{line}:5: rules[5] (broken): missing 'action' (allow "
                              "or deny)"]
        assert pm.active is running and len(dp.applied) == gen

        # Mended, with another rule edit: applied as an edit of what runs.
        items[7] = _rule(779, 1)
        path.write_bytes(_text(items))
        assert await reload() == "applied"
        assert dp.applied[-1].delta is not None

        # The default (one line: read alone), then the workloads (read and
        # compiled in full): the same maps.
        path.write_bytes(_text(items, HEAD_ALLOW))
        assert await reload() == "applied"
        fewer = HEAD_ALLOW.replace("  cache: {addresses: [10.0.0.3, 10.0.1.0/24]}\n",
                                   "  cache: {addresses: [10.0.0.3]}\n")
        path.write_bytes(_text(items, fewer))
        assert await reload() == "applied"
        assert pm.active.loaded.policy == parse_policy(path.read_bytes(), str(path)).policy

    asyncio.run(go())
    assert HEAD in _text(items).decode()
