"""Writing generations into the policy slots, against maps kept in Python:
an edit compiled from the generation a slot holds writes only its delta,
and every slot ends up holding exactly the full contents of what it was
given (the same as comparing all entries would write)."""

from __future__ import annotations

import dataclasses
import errno

import pytest

from microseg.kernel import abi, maps
from microseg.kernel.datapath import Datapath
from microseg.policy.compile import compile_policy
from microseg.policy.model import Rule
from microseg.policy.model import Selector as S

from .test_compile_edit import _big

POLICY_MAPS = Datapath._POLICY_MAPS


class FakeMap:
    type = 1  # a hash map: read back with batch lookups

    def __init__(self, key_size: int, value_size: int) -> None:
        self.key_size, self.value_size = key_size, value_size
        self.data: dict[bytes, bytes] = {}
        self.writes = 0
        self.reads = 0

    def lookup_batch(self) -> list[tuple[bytes, bytes]]:
        self.reads += len(self.data)
        return list(self.data.items())

    def update(self, key: bytes, value: bytes) -> None:
        self.data[key] = value

    def lookup(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def update_batch(self, keys: bytes, values: bytes, count: int) -> None:
        k, v = self.key_size, self.value_size
        assert len(keys) == k * count and len(values) == v * count
        for i in range(count):
            self.data[keys[i * k:(i + 1) * k]] = values[i * v:(i + 1) * v]
        self.writes += count

    def array_u32(self) -> memoryview:
        """port_class_map as mapped memory: element i at [2 * i]."""
        if not hasattr(self, "_memory"):
            self._memory = memoryview(bytearray(8 * abi.PORT_CLASS_SLOTS)).cast("I")
        return self._memory

    def delete_batch(self, keys: bytes, count: int) -> int:
        k = self.key_size
        for i in range(count):
            del self.data[keys[i * k:(i + 1) * k]]
        self.writes += count
        return count


@pytest.fixture
def dp(monkeypatch: pytest.MonkeyPatch) -> Datapath:
    monkeypatch.setattr(Datapath, "_wait_for_runs", staticmethod(lambda: None))
    d = Datapath()
    defs = {m.name: m for m in maps.MAPS}
    for name in (*POLICY_MAPS, "port_class_map", "config_map", "active_map"):
        d.maps[name] = FakeMap(defs[name].key.size, defs[name].value.size)  # type: ignore[assignment]
    empty = ({name: {} for name in POLICY_MAPS}, bytes(abi.PORT_CLASS_SLOTS // abi.POLICY_SLOTS
                                                       * 4))
    d._slots = dict.fromkeys(range(abi.POLICY_SLOTS), empty)  # all empty, as loaded
    return d


def _slot(dp: Datapath, slot: int) -> dict[str, dict[bytes, bytes]]:
    """A slot's entries, keys without the slot field (as map_contents)."""
    out: dict[str, dict[bytes, bytes]] = {}
    for name in POLICY_MAPS:
        off = 4 if name in Datapath._LPM_MAPS else 0
        out[name] = {k[:off] + k[off + 4:]: v for k, v in dp.maps[name].data.items()
                     if int.from_bytes(k[off:off + 4], "little") == slot}
    return out


def _writes(dp: Datapath) -> int:
    return sum(dp.maps[name].writes for name in POLICY_MAPS)


def test_edits_write_their_delta_and_slots_hold_full_contents(dp: Datapath) -> None:
    pol = _big()
    toggle = Rule.make("toggle", S.any(), S.any(), "allow", "tcp", [65001])
    versions = [pol, dataclasses.replace(pol, rules=(*pol.rules, toggle)), pol,
                dataclasses.replace(pol, default="allow"),
                dataclasses.replace(pol, rules=pol.rules[1:])]
    compiled = None
    for i, version in enumerate(versions):
        before = _writes(dp)
        compiled = compile_policy(version, compiled)
        gen = dp.apply_policy(compiled)  # both slots written (converge)
        want = compiled.map_contents()
        assert _slot(dp, abi.policy_slot(gen)) == want
        assert _slot(dp, abi.policy_slot(gen) ^ 1) == want
        if i and compiled.delta is not None:
            delta = sum(len(d) for d in compiled.delta[1].values())
            assert _writes(dp) - before == 2 * delta  # the delta, once per slot
    # The staged slots are written the same way, apart from the active ones.
    staged = compile_policy(versions[1])
    gen = dp.stage_policy(staged)
    assert _slot(dp, abi.policy_slot(gen)) == staged.map_contents()
    assert _slot(dp, 0) == _slot(dp, 1) == compiled.map_contents()


def test_a_slot_not_holding_the_edited_compile_is_compared_in_full(dp: Datapath) -> None:
    pol = _big()
    first = compile_policy(pol)
    dp.apply_policy(first)
    # Compiled from `first`, but `first` is not what the slots hold any more.
    other = compile_policy(dataclasses.replace(pol, rules=pol.rules[:-3]), first)
    dp.apply_policy(other)
    edit = compile_policy(dataclasses.replace(pol, rules=pol.rules[:-1]), first)
    assert edit.delta is not None and edit.delta[0] == first.serial
    gen = dp.apply_policy(edit)
    assert _slot(dp, abi.policy_slot(gen)) == edit.map_contents()
    assert _slot(dp, abi.policy_slot(gen) ^ 1) == edit.map_contents()


def test_a_restart_on_pins_reads_the_slots_back_once(dp: Datapath,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A daemon restarted on existing pins knows nothing of what the slots
    hold: it reads the maps back once (all slots), and the converge after
    its first apply does not read back what that apply wrote."""
    first = compile_policy(_big())
    dp.apply_policy(first)  # both slots hold it
    again = Datapath()
    again.maps = dp.maps
    edited = compile_policy(dataclasses.replace(_big(), default="allow",
                                                rules=_big().rules[5:]))
    gen = again.apply_policy(edited)
    held = sum(len(m) for m in first.map_contents().values())
    assert sum(again.maps[name].reads for name in POLICY_MAPS) == 2 * held  # read once
    assert _slot(again, abi.policy_slot(gen)) == edited.map_contents()
    assert _slot(again, abi.policy_slot(gen) ^ 1) == edited.map_contents()


# -- a slot after a failed write --------------------------------------------


def _fail_once(m, method: str) -> None:
    real = getattr(m, method)
    state = {"armed": True}

    def failing(*args):
        if state["armed"]:
            state["armed"] = False
            raise OSError(errno.ENOSPC, "map full")
        return real(*args)
    setattr(m, method, failing)


@pytest.mark.parametrize("edit", [False, True], ids=["full", "delta"])
def test_a_write_that_failed_half_way_is_not_taken_for_done(dp: Datapath, edit: bool) -> None:
    """A slot write that fails after some of its batches (a map full) leaves
    the idle slot half written; the next write into it must not compare
    against what it held before, or entries the failed write deleted or
    changed stay so — a policy enforced that nobody applied."""
    pol = _big()
    first = compile_policy(pol)
    dp.apply_policy(first)
    other = dataclasses.replace(pol, rules=pol.rules[:-40])
    second = compile_policy(other, first if edit else None)
    assert (second.delta is not None) == edit
    _fail_once(dp.maps["policy_map"], "update_batch")
    with pytest.raises(OSError):
        dp.apply_policy(second)
    again = compile_policy(pol)
    gen = dp.apply_policy(again)
    assert _slot(dp, abi.policy_slot(gen)) == again.map_contents()
    assert _slot(dp, abi.policy_slot(gen) ^ 1) == again.map_contents()
