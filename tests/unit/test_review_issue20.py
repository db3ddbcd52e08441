"""Review of issue 20's performance work: cases the shortcuts must send to
the full path (docs/policy.md "Applying changes")."""

from __future__ import annotations

import dataclasses
import errno

import pytest

from microseg.kernel import abi
from microseg.kernel.datapath import Datapath
from microseg.policy.compile import compile_policy
from microseg.policy.parse import PolicyError, parse_policy
from microseg.policy.reparse import Reparser

from .test_compile_edit import _big
from .test_slot_writes import _slot
from .test_slot_writes import dp as dp  # the fixture: maps kept in Python

FILE = "policy.yaml"

HEAD = """version: 1
default: deny
workloads:
  web: {addresses: [10.0.0.1]}
  db: {addresses: [10.0.0.2]}
rules:
"""


def _outcome(parse, data: bytes) -> tuple:
    try:
        loaded = parse(data, FILE)
    except PolicyError as e:
        return ("error", str(e), e.issues, e.hidden)
    return ("ok", loaded.policy, loaded.warnings, loaded.sha256, loaded.data)


def _rule(i: int, extra: str = "") -> str:
    return (f"  - name: r{i}\n    from: {{workload: web}}\n    to: {{workload: db}}\n"
            f"    protocol: tcp\n    ports: [{80 + i}]\n    action: allow\n{extra}")


def test_removing_an_anchor_that_an_unchanged_rule_aliases_is_an_error() -> None:
    # Rule 2 defines an anchor, rule 6 (outside the edit) uses it: the edit
    # of rule 2 alone no longer defines it, so the file does not parse.
    items = [_rule(i) for i in range(8)]
    items[2] = ("  - name: r2\n    from: &src {workload: web}\n    to: {workload: db}\n"
                "    action: allow\n")
    items[6] = "  - name: r6\n    from: *src\n    to: any\n    action: deny\n"
    reader = Reparser()
    data = (HEAD + "".join(items)).encode()
    assert _outcome(reader.parse, data) == _outcome(parse_policy, data)
    items[2] = "  - name: r2\n    from: {workload: web}\n    to: {workload: db}\n" \
               "    action: allow\n"
    edited = (HEAD + "".join(items)).encode()
    full = _outcome(parse_policy, edited)
    assert full[0] == "error"
    assert _outcome(reader.parse, edited) == full


# -- policy slots after a failed write ---------------------------------------


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
