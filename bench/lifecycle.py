"""`policy suggest` and `policy diff` over a large flow log, through the
command's own functions, offline — and the cost of FlowAggregate.add, which
the daemon pays for every verdict event.

    python -m bench.lifecycle                  # 1,000,000 lines
    python -m bench.lifecycle --lines 100000   # quicker

The log is what a busy host writes (docs/events.md): TCP sessions (a verdict
and three session events each), UDP exchanges, aggregated denials, drops,
`workload` events of discovered containers, `lost` reports and some lines
that are not events, over a few thousand distinct flows; rotated as
FILE.2.gz (gzipped), FILE.1 and FILE. Each command runs in a process of its
own, so its peak RSS is its own. Targets (docs/performance.md): each command
≤ 10 s over 1,000,000 lines.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

TARGET_S = 10.0
START = 1_795_000_000  # 2026-11-18, seconds


_SECOND: dict[int, str] = {}


def _time_text(us: int) -> str:
    """RFC 3339 as events write it (docs/events.md), the second memoised."""
    sec = us // 1_000_000
    prefix = _SECOND.get(sec)
    if prefix is None:
        _SECOND.clear()
        prefix = _SECOND[sec] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{prefix}.{us % 1_000_000:06d}Z"


class Estate:
    """Static workloads, discovered containers, outside clients and the
    flows between them."""

    def __init__(self, rnd: random.Random, flows: int) -> None:
        apps = [f"app{i}" for i in range(12)]
        tiers = ["web", "api", "db", "cache", "queue"]
        self.static = [(f"vm{i}", f"10.20.{i // 200}.{i % 200 + 1}",
                        {"app": apps[i % 12], "tier": tiers[(i // 12) % 5], "env": "prod"})
                       for i in range(240)]
        self.containers = [(f"{apps[i % 12]}-{tiers[(i // 12) % 5]}-{i // 60 + 1}",
                            f"172.30.{i // 200}.{i % 200 + 2}",
                            {"com.docker.compose.project": apps[i % 12],
                             "com.docker.compose.service": tiers[(i // 12) % 5],
                             "com.docker.compose.container-number": str(i // 60 + 1),
                             "tier": tiers[(i // 12) % 5]})
                           for i in range(180)]
        hosts = self.static + self.containers
        outside = [(None, f"198.51.100.{i}", {}) for i in range(1, 60)]

        def app(h: tuple) -> str:
            return h[2].get("app") or h[2]["com.docker.compose.project"]

        group: dict[tuple[str, str], list[tuple]] = {}
        for h in hosts:
            group.setdefault((app(h), h[2]["tier"]), []).append(h)
        # Who calls whom within an app, and on which service.
        calls = [("web", "api", "tcp", 8080), ("api", "db", "tcp", 5432),
                 ("api", "cache", "tcp", 6379), ("api", "queue", "tcp", 5672),
                 ("queue", "api", "udp", 4789)]
        pairs = []
        for a in apps:
            for src_tier, dst_tier, proto, port in calls:
                pairs += [(s, d, proto, port) for s in group.get((a, src_tier), [])
                          for d in group.get((a, dst_tier), [])]
            pairs += [(o, w, "tcp", 443) for o in rnd.sample(outside, 8)
                      for w in group.get((a, "web"), [])]
        rnd.shuffle(pairs)
        del pairs[flows - flows // 10:]
        while len(pairs) < flows:  # the odd ones: admin access, pings, strays
            src, dst = rnd.choice(hosts), rnd.choice(hosts)
            if src is not dst:
                pairs.append((src, dst, *rnd.choice([("tcp", 22), ("icmp", None),
                                                     ("tcp", rnd.randrange(1024, 65535))])))
        rnd.shuffle(pairs)
        self.flows: list[tuple] = []
        seen = set()
        for src, dst, proto, port in pairs[:flows]:
            key = (src[0] or src[1], dst[0], proto, port)
            if key in seen:
                continue
            seen.add(key)
            # A few flows carry most sessions (Zipf-like); some are denied.
            weight = 1.0 / (len(self.flows) + 1) ** 0.9
            self.flows.append((src, dst, proto, port, weight, rnd.random() < 0.03))
        self.weights = [f[4] for f in self.flows]

    def policy_text(self, rules: str = "") -> str:
        lines = ["version: 1", "mode: audit", "discover: {docker: {}}", "workloads:"]
        for name, ip, labels in self.static:
            lab = ", ".join(f"{k}: {v}" for k, v in labels.items())
            lines.append(f"  {name}: {{addresses: [{ip}], labels: {{{lab}}}}}")
        return "\n".join(lines) + "\n" + (rules or "rules: []\n")


def _endpoint(host: tuple, port: int | None) -> dict:
    return {"ip": host[1], "port": port, "workload": host[0]}


def write_log(directory: Path, lines: int, seed: int = 7) -> tuple[list[Path], Estate]:
    """FILE.2.gz, FILE.1, FILE: `lines` lines in all, the oldest first."""
    rnd = random.Random(seed)
    estate = Estate(rnd, 3000)
    paths = [directory / "flows.json.2.gz", directory / "flows.json.1", directory / "flows.json"]
    # Written as made, a batch at a time: a quarter of the lines to the
    # gzipped oldest part, the rest split between FILE.1 and FILE.
    files = [gzip.open(paths[0], "wb", compresslevel=1), open(paths[1], "wb"),  # noqa: SIM115
             open(paths[2], "wb")]  # noqa: SIM115
    cuts = [lines // 4, lines * 2 // 3, lines]
    out: list[bytes] = []
    written = 0
    part = 0
    us = START * 1_000_000
    seq = 0

    def flush() -> None:
        nonlocal written, part
        del out[lines - written:]  # a session's last events past the end
        while out:
            room = cuts[part] - written
            if room <= 0:
                part += 1
                continue
            take = out[:room]
            files[part].write(b"\n".join(take) + b"\n")
            written += len(take)
            del out[:room]

    def emit(e: dict) -> None:
        out.append(orjson.dumps(e))

    for name, ip, labels in estate.containers:
        seq += 1
        emit({"time": _time_text(us), "seq": seq, "type": "workload", "action": "added",
              "workload": name, "source": "docker", "labels": labels, "addresses": [ip]})

    def sessions():
        while True:  # flows drawn by weight, in batches (choices is per call)
            yield from rnd.choices(estate.flows, estate.weights, k=10_000)

    picks = sessions()
    while written + len(out) < lines:
        if len(out) >= 8192:
            flush()
        us += rnd.randrange(50, 2000)
        t = _time_text(us)
        r = rnd.random()
        if r < 0.001:
            out.append(b"microseg: flow log reopened after a write error")
            continue
        if r < 0.0015:
            seq += 1
            emit({"time": t, "seq": seq, "type": "lost", "count": 12, "source": "subscriber"})
            continue
        src, dst, proto, port, _w, denied = next(picks)
        sport = rnd.randrange(32768, 61000) if proto != "icmp" else None
        s, d = _endpoint(src, sport), _endpoint(dst, port)
        base = {"policy_generation": 3, "direction": "ingress", "interface": "veth1",
                "family": "ipv4", "protocol": proto, "src": s, "dst": d}
        if r < 0.01:  # a drop
            seq += 1
            emit({"time": t, "seq": seq, "type": "drop", "verdict": "dropped", "reason": "state",
                  "rule": None, **base, "tcp_flags": ["SYN", "ACK"], "bytes": 74, "count": 1,
                  "audit": False})
            continue
        seq += 1
        flags = ["SYN"] if proto == "tcp" else []
        if denied:
            n = rnd.randrange(1, 50)
            emit({"time": t, "seq": seq, "type": "verdict", "verdict": "denied",
                  "reason": "default", "rule": None, **base, "tcp_flags": flags,
                  "bytes": 74 * n, "count": n, "staged": None})
            continue
        emit({"time": t, "seq": seq, "type": "verdict", "verdict": "audit", "reason": "default",
              "rule": None, **base, "tcp_flags": flags, "bytes": 74, "count": 1,
              "staged": None})
        states = (("new", None), ("established", "new"), ("closed", "established")) \
            if proto == "tcp" else (("new", None), ("expired", "new"))
        for state, prev in states:
            seq += 1
            us += rnd.randrange(10, 500)
            final = state in ("closed", "expired")
            emit({"time": _time_text(us), "seq": seq, "type": "session", "state": state,
                  "prev_state": prev, "rule": None, **base,
                  "direction": None if state == "expired" else "ingress",
                  "packets": {"orig": 6, "reply": 5} if final else None,
                  "bytes": {"orig": 420, "reply": 1337} if final else None,
                  "duration_s": 1.25 if final else None})
    flush()
    for f in files:
        f.close()
    return paths, estate


def _run(argv: list[str]) -> dict:
    """One command in a process of its own: seconds, exit code, peak RSS."""
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent
    # across fork and exec, VmHWM belongs to the new address space.
    code = ("import json, sys, time\n"
            "from microseg.cli import main\n"
            "t = time.perf_counter()\n"
            f"rc = main({argv!r})\n"
            "s = time.perf_counter() - t\n"
            "hwm = [int(x.split()[1]) for x in open('/proc/self/status')\n"
            "       if x.startswith('VmHWM:')][0]\n"
            "print(json.dumps({'seconds': s, 'rc': rc, 'rss_kib': hwm}), file=sys.stderr)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parent.parent)
    last = r.stderr.strip().splitlines()[-1]
    res = json.loads(last)
    res["stderr"] = "\n".join(r.stderr.strip().splitlines()[:-1])
    res["stdout_bytes"] = len(r.stdout)
    return res


def add_ns(events: int = 200_000, seed: int = 3) -> float:
    """ns per FlowAggregate.add on fresh verdict events of a few thousand
    flows, fed in batches as the daemon's pipeline does."""
    from microseg.flow.observed import FlowAggregate

    rnd = random.Random(seed)
    estate = Estate(rnd, 3000)
    agg = FlowAggregate()
    best = float("inf")
    t_us = START * 1_000_000
    for _ in range(events // 4096):
        batch = []
        for src, dst, proto, port, _w, _d in rnd.choices(estate.flows, estate.weights, k=4096):
            t_us += 97
            batch.append({"time": _time_text(t_us), "seq": 1, "type": "verdict",
                          "verdict": "allowed", "reason": "rule", "rule": "r",
                          "policy_generation": 1, "direction": "ingress", "interface": "x",
                          "family": "ipv4", "protocol": proto,
                          "src": _endpoint(src, 40000), "dst": _endpoint(dst, port),
                          "tcp_flags": [], "bytes": 74, "count": 1, "staged": None})
        add = agg.add
        t = time.perf_counter_ns()
        for e in batch:
            add(e)
        best = min(best, (time.perf_counter_ns() - t) / len(batch))
    return best


def measure(lines: int = 1_000_000, workdir: str | None = None) -> dict:
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        d = Path(tmp)
        t = time.perf_counter()
        paths, estate = write_log(d, lines)
        generated = time.perf_counter() - t
        size = sum(p.stat().st_size for p in paths)
        base = d / "base.yaml"
        base.write_text(estate.policy_text())
        suggested = d / "suggested.yaml"
        logs = [str(p) for p in paths]
        suggest = _run(["policy", "suggest", "--flow-log", *logs, "--file", str(base),
                        "-o", str(suggested)])
        diff = _run(["policy", "diff", str(suggested), "--against", str(base), "--flow-log",
                     *logs, "--json"])
        rules = suggested.read_text().count("\n  - name: ") if suggested.exists() else 0
    return {"lines": lines, "files": len(paths), "bytes": size,
            "generate_s": round(generated, 2), "rules": rules,
            "suggest": {"seconds": round(suggest["seconds"], 2), "rc": suggest["rc"],
                        "lines_per_s": round(lines / suggest["seconds"]),
                        "peak_rss_mib": round(suggest["rss_kib"] / 1024, 1),
                        "stderr": suggest["stderr"]},
            "diff": {"seconds": round(diff["seconds"], 2), "rc": diff["rc"],
                     "lines_per_s": round(lines / diff["seconds"]),
                     "peak_rss_mib": round(diff["rss_kib"] / 1024, 1)},
            "add_ns": round(add_ns()), "target_s": TARGET_S}


def table(res: dict) -> str:
    out = [f"policy suggest / diff over {res['lines']:,} flow-log lines "
           f"({res['files']} files, one gzipped; {res['bytes'] / 1e6:,.0f} MB; "
           f"generated in {res['generate_s']} s)",
           f"{'command':<16}{'seconds':>9}{'lines/s':>12}{'peak RSS':>12}   target",
           ]
    for name in ("suggest", "diff"):
        r = res[name]
        ok = "ok" if r["seconds"] <= res["target_s"] else "MISSED"
        out.append(f"{'policy ' + name:<16}{r['seconds']:>9.2f}{r['lines_per_s']:>12,}"
                   f"{r['peak_rss_mib']:>9.1f} MiB   <= {res['target_s']:g} s {ok}")
    out.append(f"suggested policy: {res['rules']:,} rules; diff exit {res['diff']['rc']} "
               "(1: verdicts change)")
    out.append(f"FlowAggregate.add: {res['add_ns']:,} ns per verdict event")
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.lifecycle", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--json", action="store_true", help="print the results as JSON too")
    args = ap.parse_args()
    res = measure(args.lines, os.environ.get("TMPDIR"))
    print(table(res))
    if res["suggest"]["stderr"]:
        print(res["suggest"]["stderr"])
    if args.json:
        print(json.dumps(res, indent=2))
    return 1 if res["suggest"]["rc"] != 0 or res["diff"]["rc"] not in (0, 1) else 0


if __name__ == "__main__":
    sys.exit(main())
