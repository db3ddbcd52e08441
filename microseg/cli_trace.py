"""`microseg policy trace`: what would happen to this connection?

The verdict and the deciding rule come from the compiled policy, answered
as the datapath answers (microseg/policy/evaluate.py); the explanation from
a literal walk over the rules. Against the daemon's active policy (with its
discovered workloads) or, with --file, offline (docs/policy.md "Tracing a
connection").
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace

import orjson

from microseg.cli import EXIT_FAILED, EXIT_USAGE, CommandError, _daemon, use_colour
from microseg.control.client import Client, fetch_policy
from microseg.control.render import VERDICT_COLOUR, paint
from microseg.policy.evaluate import (
    Endpoint,
    Trace,
    TraceError,
    check_port,
    parse_protocol,
    protocol_name,
    resolve,
    trace,
)
from microseg.policy.model import Policy, Workload

# Rules listed that would match but for the destination, in the human
# output (the JSON has the contract's keys only: docs/policy.md).
_NEAR_MISSES_SHOWN = 5


def cmd_policy_trace(args: argparse.Namespace) -> int:
    try:
        proto = parse_protocol(args.protocol)
        port = check_port(proto, args.port)
        if args.file is not None:
            from microseg.policy.parse import PolicyError, load_policy_file

            try:
                policy = load_policy_file(args.file).policy
            except PolicyError as e:  # as `policy check` reports it
                for issue in e.issues:
                    print(issue.format(args.file), file=sys.stderr)
                n = e.error_count
                print(f"{args.file}: {n:,} error{'s' if n != 1 else ''}", file=sys.stderr)
                return EXIT_FAILED
            src, dst = resolve(policy, args.src, args.dst)
        else:
            got = _daemon(args, lambda c: _from_daemon(c, args.src, args.dst))
            assert isinstance(got, tuple)
            policy, (src, dst) = got
        _check_family(proto, src)
        t = trace(policy, src.ip, dst.ip, proto, port)
    except TraceError as e:
        raise CommandError(str(e), EXIT_USAGE if e.usage else EXIT_FAILED) from None
    if t.inconsistency:
        print(f"microseg: warning: {t.inconsistency}", file=sys.stderr)
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(t.as_dict()) + b"\n")
    else:
        sys.stdout.write(render(t, policy, src, dst, use_colour()))
    return 0


async def _from_daemon(c: Client, src: str, dst: str
                       ) -> tuple[Policy, tuple[Endpoint, Endpoint]]:
    """The daemon's merged policy and the two ends resolved in it. The merged
    policy leaves out workloads without addresses; when a name does not
    resolve, the daemon's workload list tells such a workload from a typo."""
    active = (await fetch_policy(c)).policy
    try:
        return active, resolve(active, src, dst)
    except TraceError:
        known = {w.name for w in active.workloads}
        missing = {src, dst} - known
        if not missing:
            raise
        empty: list[Workload] = []
        async for lines in c.stream_lines("/v1/workloads"):
            for line in lines:
                row = orjson.loads(line)
                if row["workload"] in missing and not row["addresses"]:
                    empty.append(Workload(row["workload"], (),
                                          tuple(sorted(row["labels"].items()))))
        if not empty:
            raise
        # Raises again, now saying that the workload has no addresses.
        resolve(replace(active, workloads=active.workloads + tuple(empty)), src, dst)
        raise


def _check_family(proto: int, src: Endpoint) -> None:
    """icmp is IPv4's ICMP and icmpv6 IPv6's (docs/policy.md "Rules")."""
    v6 = ":" in src.ip
    if proto == 1 and v6:
        raise TraceError("protocol icmp is IPv4's: use --protocol icmpv6 between IPv6 "
                         "addresses", usage=True)
    if proto == 58 and not v6:
        raise TraceError("protocol icmpv6 is IPv6's: use --protocol icmp between IPv4 "
                         "addresses", usage=True)


def _end(e: Endpoint) -> str:
    return f"{e.workload} {e.ip}" if e.workload else f"{e.ip} (no workload)"


def _rows(items: list[dict[str, str]], key: str) -> list[str]:
    width = min(max(len(i["rule"]) for i in items), 32)
    return [f"  {i['rule']:<{width}}  {i[key]}" for i in items]


def render(t: Trace, policy: Policy, src: Endpoint, dst: Endpoint, colour: bool) -> str:
    """The human answer: the flow, the verdict and who decided, what matched,
    and why the rules naming the destination did not."""
    what = protocol_name(t.protocol)
    if t.port is not None:
        what += f" port {t.port}"
    elif what.isdigit():
        what = f"protocol {what}"
    lines = [f"{_end(src)} -> {_end(dst)}, {what}"]
    lines += [f"  ({e.note})" for e in (src, dst) if e.note]

    word = paint(t.verdict.upper(), VERDICT_COLOUR.get(t.verdict), colour)
    by = f"rule {t.rule}" if t.rule else f"the default (no rule matches; default: {policy.default})"
    if t.verdict == "audit":
        lines.append(f"verdict: {word}: denied by {by}, but passes: {t.mode_from} is in "
                     "audit mode")
    elif t.verdict == "denied" and policy.mode == "audit":
        lines.append(f"verdict: {word} by {by} ({t.mode_from} is in enforce mode)")
    else:
        lines.append(f"verdict: {word} by {by}")

    if t.matched:
        lines.append("matched:")
        width = min(max(len(m["rule"]) for m in t.matched), 32)
        lines += [f"  {m['rule']:<{width}}  {m['action']}"
                  + ("  <- decides" if m["rule"] == t.rule else "") for m in t.matched]
    else:
        lines.append("matched: no rule")
    if t.not_matched:
        lines.append(f"not matched, naming {t.dst} as destination:")
        lines += _rows(t.not_matched, "why")
    elif not t.matched:
        lines.append(f"no rule names {t.dst} as destination")
    if t.near_misses:
        lines.append("would match but for the destination:")
        lines += _rows(t.near_misses[:_NEAR_MISSES_SHOWN], "why")
        more = len(t.near_misses) - _NEAR_MISSES_SHOWN
        if more > 0:
            lines.append(f"  … and {more} more")
    return "\n".join(lines) + "\n"
