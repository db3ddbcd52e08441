"""`make bench`: measure, compare with the targets of docs/performance.md, print a table,
write bench/results.json.

    python -m bench                 # full: 5 runs x 1M repeats
    python -m bench --mode quick    # smoke: seconds, same code paths
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path

from . import (
    cluster,
    datapath,
    discovery,
    events,
    lifecycle,
    policy,
    readme,
    sessions,
    soak,
    start,
    stress,
    traffic,
    tui,
)
from .report import (
    datapath_table,
    discovery_table,
    events_table,
    policy_table,
    sessions_table,
    soak_table,
    traffic_table,
    tui_table,
)

RESULTS = Path(__file__).with_name("results.json")

MODES = {
    "full": {"runs": 5, "repeat": 1_000_000, "new_flows": 60_000, "sessions": 100_000,
             "big_rules": 10_000, "workloads": 1_000},
    "quick": {"runs": 2, "repeat": 20_000, "new_flows": 5_000, "sessions": 5_000,
              "big_rules": 500, "workloads": 100},
}
POLICY_MODES = {
    "full": {"sizes": (10, 1_000, 10_000), "workloads": 1_000, "samples": 15,
             "latency": ((10, 10), (10, 1_000), (1_000, 1_000), (10_000, 1_000))},
    "quick": {"sizes": (10, 200), "workloads": 50, "samples": 3,
              "latency": ((10, 10),)},
}

EVENT_MODES = {
    "full": {"records": 2_000_000, "events": 1_000_000, "burst": 100_000},
    "quick": {"records": 50_000, "events": 50_000, "burst": 10_000},
}
SESSION_SIZES = {"full": (100_000, 1_000_000), "quick": (5_000,)}
# The stress section (bench/stress.py): rounds of every configuration and
# flood, seconds counted after a warm-up; rules as in TRAFFIC_MODES.
STRESS_MODES = {"full": {"rounds": 5, "seconds": 3, "warmup": 1.0, "rules": 1_000},
                "quick": {"rounds": 1, "seconds": 0.5, "warmup": 0.3, "rules": 10}}
TRAFFIC_MODES = {"full": {"rounds": 5, "seconds": 4, "rules": 1_000},
                 "quick": {"rounds": 1, "seconds": 1, "rules": 10}}
SOAK_SECONDS = {"full": 600, "quick": 4}
DISCOVERY_MODES = {"full": {"starts": 60, "racers": 50}, "quick": {"starts": 3, "racers": 2}}
# The many-hosts section (bench/cluster.py): publish → enforced samples, the
# simulated cluster (nodes x workloads), its churn (seconds, changes/s).
CLUSTER_MODES = {"full": {"samples": 60, "nodes": 100, "workloads": 100, "churn_s": 180,
                          "churn_per_s": 10, "idle_s": 10, "sample_every": 2.0},
                 "quick": {"samples": 20, "nodes": 10, "workloads": 20, "churn_s": 4,
                           "churn_per_s": 5, "idle_s": 0, "sample_every": 1.0}}
START_ROUNDS = {"full": 7, "quick": 1}
LIFECYCLE_LINES = {"full": 1_000_000, "quick": 20_000}
TUI_MODES = {"full": {"rates": (10_000, 50_000), "rounds": 4},
             "quick": {"rates": (50_000,), "rounds": 1}}

def machine() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"kernel": platform.release(), "cpu": cpu, "cpus": os.cpu_count(),
            "memory_gib": round(mem_gib, 1), "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=sorted(MODES), default="full")
    ap.add_argument("--output", type=Path, default=RESULTS,
                    help="where to write the JSON results (default: %(default)s)")
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (BPF)", file=sys.stderr)
        return 3
    params = MODES[args.mode]
    started = dt.datetime.now(dt.UTC)
    res = datapath.measure(**params)
    res["params"] = params
    began = start.measure(START_ROUNDS[args.mode])
    pp = POLICY_MODES[args.mode]
    pol = policy.measure(pp["sizes"], pp["workloads"], pp["samples"], pp["latency"])
    ev = events.measure(**EVENT_MODES[args.mode])
    sess = sessions.measure(SESSION_SIZES[args.mode])
    top = tui.measure(**TUI_MODES[args.mode])
    real = traffic.measure(**TRAFFIC_MODES[args.mode])
    flood = stress.measure(**STRESS_MODES[args.mode])
    soaked = soak.measure(SOAK_SECONDS[args.mode])
    found = discovery.measure(**DISCOVERY_MODES[args.mode])
    clustered = cluster.measure(**CLUSTER_MODES[args.mode])
    learned = lifecycle.measure(LIFECYCLE_LINES[args.mode])
    out = {"date": started.isoformat(timespec="seconds"), "mode": args.mode,
           "machine": machine(), "datapath": res, "start": began, "policy": pol, "events": ev,
           "sessions": sess, "tui": top, "traffic": real, "stress": flood, "soak": soaked,
           "discovery": found, "cluster": clustered, "lifecycle": learned}
    m = out["machine"]
    print(f"microseg benchmarks — {out['date']} — Linux {m['kernel']}, {m['cpu']}, "
          f"{m['cpus']} CPUs, {m['memory_gib']} GiB — mode {args.mode}")
    print()
    print("\n".join(datapath_table(res)))
    print()
    print(start.table(began))
    print()
    print("\n".join(traffic_table(real)))
    print()
    print(stress.table(flood))
    print()
    print("\n".join(policy_table(pol)))
    print()
    print("\n".join(events_table(ev)))
    print()
    print("\n".join(sessions_table(sess)))
    print()
    print("\n".join(tui_table(top)))
    print()
    print("\n".join(soak_table(soaked)))
    print()
    print("\n".join(discovery_table(found)))
    print()
    print(cluster.table(clustered))
    print()
    print(lifecycle.table(learned))
    tmp = args.output.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(args.output)
    print(f"\nresults: {args.output}")
    if args.mode == "full" and args.output == RESULTS:
        readme.update(results=args.output)
        print(f"README.md: benchmark section regenerated from {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
