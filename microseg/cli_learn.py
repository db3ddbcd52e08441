"""`microseg policy suggest` and `microseg policy diff` (docs/policy.md,
"Learning a policy: suggest and diff"): learn a policy from the flows
observed, and see which observed flows a policy change would judge otherwise.

Flows come from the daemon's flow aggregate (GET /v1/flows) or, offline, from
flow log files (--flow-log). Exit codes as for every command (microseg/cli.py);
`diff` exits 1 when some flow changes, so that it can gate a change in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson

from microseg.cli import EXIT_FAILED, EXIT_PRIVILEGES, EXIT_USAGE, CommandError
from microseg.control.client import Client, DaemonError, DaemonPolicy, fetch_flows, fetch_policy
from microseg.flow.logread import FlowLogError, ReadStats, WorkloadLog, check_paths, read_events
from microseg.flow.observed import FlowAggregate
from microseg.policy.model import Policy, Workload
from microseg.policy.parse import PolicyError, load_policy_file

# Distinct flows held when reading logs: far beyond an estate's few thousand
# (a record is some hundreds of bytes); past it the aggregate evicts
# (microseg/flow/observed.py) and the output says how many.
OFFLINE_CAPACITY = 1 << 18


@dataclass
class Observed:
    """The flows to learn from or replay, and what is known beside them."""

    records: list[dict]
    origin: str
    discovered: list[Workload] = field(default_factory=list)  # from the logs
    seen_at: dict[str, set[str]] = field(default_factory=dict)  # name -> addresses (logs)
    notes: list[str] = field(default_factory=list)
    stats: ReadStats | None = None


def _load(path: str) -> Policy:
    """A policy file, or exit 2 with every error as FILE:LINE:COL: message."""
    try:
        loaded = load_policy_file(path)
    except PolicyError as e:
        for issue in e.issues:
            print(issue.format(path), file=sys.stderr)
        n = e.error_count
        raise CommandError(f"{path}: {n:,} error{'s' if n != 1 else ''}", EXIT_USAGE,
                           usage=False) from None
    return loaded.policy


def _read_logs(paths: Sequence[str], static: set[str]) -> Observed:
    try:
        paths = check_paths(paths)
    except FlowLogError as e:
        raise CommandError(str(e), EXIT_USAGE, usage=False) from None
    agg = FlowAggregate(OFFLINE_CAPACITY)
    workloads = WorkloadLog()
    stats = ReadStats()
    add, saw, learn = agg.add, workloads.saw, workloads.add
    try:
        for e in read_events(paths, stats):
            if e["type"] == "verdict":
                add(e)
                saw(e)
            else:
                learn(e)
    except FlowLogError as e:
        raise CommandError(str(e), EXIT_USAGE, usage=False) from None
    records = list(agg.records())
    discovered = [Workload.make(name, addrs, labels)
                  for name, labels, addrs in workloads.workloads(records, static)]
    notes = []
    if agg.evicted:
        notes.append(f"{agg.evicted:,} flows ({agg.evicted_sessions:,} sessions) were evicted "
                     f"from the aggregate of {agg.capacity:,} flows while reading: the most "
                     "frequent ones, missing here if they did not recur.")
    if stats.skipped:
        notes.append(f"{sum(stats.skipped.values()):,} lines of the flow logs were not events "
                     "and were skipped.")
    origin = f"{stats.lines:,} lines of flow logs " + ", ".join(paths)
    return Observed(records, origin, discovered, workloads.seen_at, notes, stats)


def _daemon_call(args: argparse.Namespace, want_policy: bool, want_flows: bool,
                 policy_optional: bool = False
                 ) -> tuple[DaemonPolicy | None, Observed | None]:
    """The daemon's policy and/or flows, in one connection (as microseg/cli.py
    `_daemon` does: its errors become the command's)."""

    async def go() -> tuple[DaemonPolicy | None, Observed | None]:
        async with Client(args.socket) as c:
            dp = None
            if want_policy:
                try:
                    dp = await fetch_policy(c)
                except DaemonError as e:
                    if not policy_optional or e.privileges:
                        raise
            if not want_flows:
                return dp, None
            obs = _daemon_records(await fetch_flows(c), c.socket_path)
            try:  # what its aggregate evicted (GET /v1/stats): said, if anything
                st = (await c.get("/v1/stats")).get("flows") or {}
            except DaemonError:
                st = {}
            if st.get("evicted"):
                obs.notes.append(f"The daemon's aggregate of {st.get('capacity', 0):,} flows has "
                                 f"evicted {st['evicted']:,}: the most frequent ones, missing "
                                 "here if they did not recur since.")
            return dp, obs

    try:
        return asyncio.run(go())
    except DaemonError as e:
        raise CommandError(str(e), EXIT_PRIVILEGES if e.privileges else EXIT_FAILED) from None


def _daemon_discovered(dp: DaemonPolicy | None) -> list[Workload]:
    """The workloads the daemon discovered (its merged policy minus its file's)."""
    if dp is None:
        return []
    static = {w.name for w in dp.loaded.policy.workloads}
    return [w for w in dp.policy.workloads if w.name not in static]


def _daemon_records(records: list[dict], socket: str) -> Observed:
    try:
        agg = FlowAggregate.from_records(records)
    except ValueError as e:
        raise DaemonError(f"the daemon's flows: {e}") from None
    return Observed(list(agg.records()), f"the flow aggregate of the daemon at {socket}")


def _report_skipped(obs: Observed) -> None:
    line = obs.stats.skipped_line() if obs.stats else None
    if line:
        print(f"microseg: {line}", file=sys.stderr)


def _write(path: str, text: str) -> None:
    """Replace `path` atomically: a reader never sees half a policy."""
    d = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".suggest-", dir=d)
    except OSError as e:
        raise CommandError(f"cannot write {path}: {e.strerror or e}", EXIT_USAGE) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise CommandError(f"cannot write {path}: {e.strerror or e}") from None


# -- policy suggest -------------------------------------------------------------

def cmd_policy_suggest(args: argparse.Namespace) -> int:
    from microseg.policy.parse import parse_policy
    from microseg.policy.suggest import suggest

    policy = _load(args.file) if args.file else None
    static = {w.name for w in policy.workloads} if policy else set()
    if args.flow_log:
        obs = _read_logs(args.flow_log, static)
        discovered = obs.discovered
    else:
        dp, daemon_obs = _daemon_call(args, True, True, policy_optional=policy is not None)
        assert daemon_obs is not None
        obs = daemon_obs
        if policy is None:
            assert dp is not None
            policy = dp.loaded.policy
        discovered = _daemon_discovered(dp)
    text = suggest(obs.records, policy, args.mode, discovered=discovered, seen_at=obs.seen_at,
                   origin=obs.origin, notes=obs.notes)
    try:  # `policy check` must pass on it: a failure here is a bug, never written
        rules = len(parse_policy(text.encode(), args.output or "<suggestion>").policy.rules)
    except PolicyError as e:
        raise CommandError(f"the suggested policy is not valid (a bug in microseg): "
                           f"{str(e).splitlines()[0]}") from None
    if args.output and args.output != "-":
        _write(args.output, text)
        print(f"{args.output}: {rules:,} rules from {len(obs.records):,} observed flows",
              file=sys.stderr)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    _report_skipped(obs)
    return 0


# -- policy diff ----------------------------------------------------------------

def _endpoint(side: dict, ip: str) -> str:
    return f"{side['workload']} ({ip})" if side["workload"] else ip


def _judged(v: tuple[str, str | None]) -> str:
    return f"{v[0]} ({v[1] if v[1] is not None else 'default'})"


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w) if i in right else c.ljust(w)
                      for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
            for r in rows]


def cmd_policy_diff(args: argparse.Namespace) -> int:
    """Exit 0: no verdict changes; 1: some do; 2: no answer — a usage error,
    an unreadable or invalid file, no daemon — so that a CI gate never takes
    trouble for a change (nor a change for trouble)."""
    try:
        return _policy_diff(args)
    except CommandError as e:
        if e.code == EXIT_FAILED:
            raise CommandError(str(e), EXIT_USAGE, usage=False) from None
        raise


def _policy_diff(args: argparse.Namespace) -> int:
    from microseg.flow.diff import diff

    candidate = _load(args.candidate)
    baseline = _load(args.against) if args.against else None
    static = {w.name for w in candidate.workloads}
    if baseline is not None:
        static |= {w.name for w in baseline.workloads}
    obs = _read_logs(args.flow_log, static) if args.flow_log else None
    if baseline is None or obs is None:
        # The daemon: its policy as the baseline (and, with --against, its
        # discovered workloads if it has a policy), its flows if no logs.
        dp, daemon_obs = _daemon_call(args, True, obs is None,
                                      policy_optional=baseline is not None)
        if baseline is None:
            assert dp is not None
            baseline = dp.loaded.policy
        if obs is None:
            assert daemon_obs is not None
            obs = daemon_obs
        known = {w.name for w in _daemon_discovered(dp)}
        discovered = _daemon_discovered(dp) + [w for w in obs.discovered
                                               if w.name not in known]
    else:
        discovered = obs.discovered
    changes = diff(baseline, candidate, obs.records, discovered=discovered)
    flows = len(obs.records)
    if args.json:
        sys.stdout.buffer.write(orjson.dumps({"changed": [c.as_dict() for c in changes],
                                              "flows": flows, "unchanged": flows - len(changes)})
                                + b"\n")
    else:
        base = args.against or "the active policy"
        if changes:
            rows = [["FROM", "TO", "PROTO", "PORT", "BEFORE", "", "AFTER", "SESSIONS"]]
            for c in changes:
                f = c.flow
                rows.append([_endpoint(f["src"], c.src_ip), _endpoint(f["dst"], c.dst_ip),
                             str(f["protocol"]), "" if f["port"] is None else str(f["port"]),
                             _judged(c.before), "->", _judged(c.after), f"{c.sessions:,}"])
            print("\n".join(_table(rows, {3, 7})))
            kinds = Counter(f"{c.before[0]} -> {c.after[0]}" for c in changes)
            shown = ", ".join(f"{n:,} {k}" for k, n in sorted(kinds.items(),
                                                             key=lambda kv: (-kv[1], kv[0])))
            print(f"{len(changes):,} of {flows:,} observed flows would be judged otherwise by "
                  f"{args.candidate} than by {base} ({sum(c.sessions for c in changes):,} "
                  f"sessions): {shown}")
        else:
            print(f"no change: {args.candidate} judges all {flows:,} observed flows as {base} "
                  "does")
    sys.stdout.flush()
    _report_skipped(obs)
    return 1 if changes else 0


__all__ = ["cmd_policy_diff", "cmd_policy_suggest"]
