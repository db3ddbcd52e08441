"""The README's benchmark section, generated from bench/results.json.

    python -m bench.readme      # rewrite the section from bench/results.json

`make bench` (the full mode, writing bench/results.json) calls it too, so
the README never shows a figure that is not in the results file. A test
checks the two agree.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .report import (
    DATAPATH_TARGETS,
    STAGED_TARGET,
    discovery_verdict,
    soak_verdicts,
    traffic_verdicts,
    tui_verdict,
)

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = Path(__file__).with_name("results.json")
START = "<!-- bench:start — generated from bench/results.json by `python -m bench.readme` -->"
END = "<!-- bench:end -->"


def _met(ok: bool) -> str:
    return "met" if ok else "**not met**"


def _n(x: float, digits: int = 0) -> str:
    return f"{x:,.{digits}f}"


def _secs(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f} s"


def _staged_rows(big: dict, small: dict) -> list[str]:
    """With the same policy staged as a candidate (docs/policy.md
    "Staging"): what it adds to a new flow, and that established packets
    do not pay for it."""
    if "new_flow_staged_v4" not in big:
        return []
    out = []
    for fam, name in (("v4", "IPv4"), ("v6", "IPv6")):
        b, s = big[f"new_flow_staged_{fam}"], small[f"new_flow_staged_{fam}"]
        cells = [f"{r['median_ns']:.0f} (+{r['over_unstaged_ns']:.0f} over unstaged)"
                 for r in (b, s)]
        ok = _met(max(b["over_unstaged_ns"], s["over_unstaged_ns"]) <= STAGED_TARGET)
        out.append(f"| new allowed flow, a candidate staged, {name} | {cells[0]} | {cells[1]} "
                   f"| ≤ unstaged + {STAGED_TARGET} | {ok} |")
    if "new_flow_staged_empty_v4" in big:
        for fam, name in (("v4", "IPv4"), ("v6", "IPv6")):
            b, s = big[f"new_flow_staged_empty_{fam}"], small[f"new_flow_staged_empty_{fam}"]
            out.append(f"| … an empty candidate staged (the stage's own cost), {name} | "
                       f"{b['median_ns']:.0f} (+{b['over_unstaged_ns']:.0f} over unstaged) | "
                       f"{s['median_ns']:.0f} (+{s['over_unstaged_ns']:.0f} over unstaged) | "
                       "| |")
    b, s = big["established_staged_v4"], small["established_staged_v4"]
    limit = DATAPATH_TARGETS["established_v4"]
    out.append(f"| established TCP, a candidate staged, IPv4 | {b['median_ns']:.0f} "
               f"(+{b['over_floor_ns']:.0f}) | {s['median_ns']:.0f} (+{s['over_floor_ns']:.0f}) "
               f"| ≤ floor + {limit} | {_met(b['over_floor_ns'] <= limit)} |")
    return out


def _datapath(res: dict) -> list[str]:
    p = res["params"]
    big, small = res["scenarios"]["rules_10000"], res["scenarios"]["rules_10"]
    out = [
        f"**Datapath** — BPF_PROG_TEST_RUN ns per packet, median of {p['runs']} runs of "
        f"{p['repeat']:,} repeats (new flows: {p['runs']} runs of {p['new_flows']:,}, each "
        "repetition a new session through the benchmark harness, over the harness's own "
        f"floor), {big['sessions']:,} sessions loaded. Large policy: {p['big_rules']:,} rules "
        f"over {p['workloads']:,} workloads ({big['policy_entries']:,} map entries); small: "
        "10 rules over the same workloads.",
        "",
        "| packet | large policy | 10 rules | target | |",
        "|---|---|---|---|---|",
    ]
    rows = (("empty TC program (the floor)", "floor"),
            ("established TCP, IPv4", "established_v4"),
            ("established TCP, IPv6", "established_v6"),
            ("denied, with its event, IPv4", "denied_v4"),
            ("denied, with its event, IPv6", "denied_v6"),
            ("new allowed flow, IPv4", "new_flow_v4"),
            ("new allowed flow, IPv6", "new_flow_v6"),
            ("… the first flow of its pair (decision not cached), IPv4", "new_flow_uncached_v4"),
            ("… the first flow of its pair (decision not cached), IPv6", "new_flow_uncached_v6"))
    for label, key in rows:
        if key not in big:  # a results file from before the row existed
            continue
        b, s = big[key], small[key]

        def cell(r: dict) -> str:
            over = r.get("over_floor_ns")
            return f"{r['median_ns']:.0f}" + (f" (+{over:.0f})" if over is not None else "")

        limit = DATAPATH_TARGETS.get(key)
        target = f"≤ floor + {limit}" if limit else ""
        verdict = _met(b["over_floor_ns"] <= limit) if limit else ""
        out.append(f"| {label} | {cell(b)} | {cell(s)} | {target} | {verdict} |")
    out += _staged_rows(big, small)
    est = big["established_v4"]["median_ns"]
    out += ["", f"BCC compiles the program with the benchmark's harness (and creates its "
            f"maps) in {res['compile_s']:.1f} s; the verifier loads its entry points in "
            f"{res['load_s']:.1f} s (a daemon's own start: below). The established "
            f"path runs at {1e3 / est:.1f} Mpps per core (10⁹ / ns per packet). The cost does "
            "not follow the rule count: the policy lookup is a few hash lookups, never a walk "
            "over rules. A new flow's policy decision comes from this CPU's cache of recent "
            "decisions when the same pair was judged before under the same policy (a client's "
            "next connection to a service: the new-flow rows, each repetition a new source "
            "port); the first flow of a pair takes the lookups — two identities, then for "
            "this pair three group headers and two port exceptions: seven hash lookups, "
            "~215 ns — and fills the cache (its rows: the harness forgets the pair's decision "
            "before each repetition, over a floor that does the same). Where the rest of a "
            "new flow's time goes, profiled during development (the program with one part "
            "compiled out at a time, paired runs): the session tables' lookups, which miss, "
            "~225 / 185 ns (IPv4 / IPv6) — nearly all of it `session_map`'s, whose 16 MiB of "
            "buckets a new tuple meets out of cache; the insert into the LRU hash of one-way "
            "sessions ~290 / 210 ns; its one ring record ~50 ns (the verdict, carrying the "
            "session's `new` event, which the daemon expands into both); the rest (parsing, "
            "counters, one clock read) ~65 ns."]
    prim = res.get("primitives")
    if prim:
        miss, ins = prim["miss"]["over_floor_ns"], prim["insert"]["over_floor_ns"]
        out[-1] += (f" The kernel's own map operations, measured in the same run apart from "
                    f"any of microseg's code (bench/bpf/primitives.bpf.c, microseg's key and "
                    f"value, a new key each repetition): a lookup that misses in a table of "
                    f"2²⁰ sessions holding {big['sessions']:,} costs {miss:.0f} ns, an insert "
                    f"into an LRU hash {ins:.0f} ns. A stateful firewall that keeps its "
                    f"sessions in a hash table pays both for every new flow: {miss + ins:.0f} "
                    "ns, above the new-flow target on this machine before any parsing or "
                    "policy.")
    if prim and "hit" in prim:
        hit, hit4 = prim["hit"]["over_floor_ns"], prim["hit4"]["over_floor_ns"]
        out[-1] += (f" An established packet's lookup of its session, the kernel's part, "
                    f"costs {hit:.0f} ns measured the same way (the session found, in cache; "
                    f"with the 16-byte key a table of IPv4 sessions alone could use, "
                    f"{hit4:.0f} ns).")
    out[-1] += (" Parsing costs ~13 / 17 ns (IPv4 / IPv6; profiled during development: the "
                "program cut short after parsing, paired runs); the session key, the "
                "session's and the packet's counters ~15 ns.")
    if "new_flow_staged_empty_v4" in big:
        out[-1] += (" With a candidate staged (the same policy again), a new flow is judged "
                    "twice: the stage itself (a tail call, the staged counters) costs what the "
                    "empty candidate's row shows, the rest is the candidate's decision, from "
                    "the same cache.")
    if res.get("verifier"):
        out += ["", "The verifier's figures for each program on this kernel (limits: 1,000,000 "
                "instructions processed, 512 bytes of stack):", "",
                "| program | instructions processed | stack depth |", "|---|---|---|"]
        out += [f"| `{name}` | {v['instructions']:,} | "
                f"{'+'.join(map(str, v['stack_depth'] or [])) or '—'} bytes |"
                for name, v in res["verifier"].items()]
    return out


def _traffic(res: dict | None) -> list[str]:
    if res is None:
        return ["**Real traffic** — not measured yet."]
    p = res["params"]
    out = [
        "**Real traffic** — two lab namespaces on a bridge (as containers are), "
        f"{p['rounds']} rounds, the configurations interleaved and rotated each round, "
        f"{p['seconds']} s per test; min / median / max over the rounds. microseg and "
        f"nftables enforce the same default-deny policy of {p['rules']:,} rules, the "
        "benchmark's flows allowed by the last ones; nftables with conntrack "
        "(`ct state established,related accept` first), as a linear rule list and as one "
        "rule over a concatenated set; the bridge's netfilter hooks on only for nftables "
        "(the host-wide switches a container engine turns on are off while measuring, "
        "else every configuration would pass iptables and conntrack). Client and server "
        "are pinned to one CPU (a "
        "cross-CPU wake-up costs ~40 µs on this VM and made latencies bimodal). "
        "Request/response: sockperf ping-pong over TCP, "
        "64 bytes, one request in flight, full round-trip latency. UDP: iperf3, 64-byte "
        "datagrams as fast as one sender can, received per second. Stream: iperf3, one TCP "
        "connection.",
        "",
        "| configuration | requests/s | p50 µs | p99 µs | UDP 64 B received/s "
        "| TCP stream Gbit/s |",
        "|---|---|---|---|---|---|",
    ]

    def cell(r: dict, digits: int) -> str:
        return " / ".join(_n(r[k], digits) for k in ("min", "median", "max"))

    for r in res["configs"].values():
        out.append(f"| {r['label']} | {cell(r['rr_per_s'], 0)} | {cell(r['p50_us'], 1)} | "
                   f"{cell(r['p99_us'], 1)} | {cell(r['udp_pps'], 0)} | "
                   f"{cell(r['stream_gbps'], 2)} |")
    out += ["", "| target ([docs/performance.md](docs/performance.md)) | measured | |",
            "|---|---|---|"]
    out += [f"| {what} | {measured} | {_met(ok)} |" for what, measured, ok in
            traffic_verdicts(res)]
    return out + _traffic_breakdown(res)


def _traffic_breakdown(res: dict) -> list[str]:
    """Where microseg's request/response overhead goes: configurations
    measured with sockperf alone, interleaved with the ones above."""
    b = res.get("breakdown")
    if not b:
        return []
    c = res["configs"]
    base = c["none"]["p50_us"]["median"]
    rows = [("no firewall", c["none"]), ("a TC program returning `TC_ACT_OK` at once, "
                                         "where microseg attaches", b.get("tc_ok")),
            ("microseg's programs and policy, the daemon stopped (`--keep-on-exit`)",
             b.get("microseg_kept")),
            ("the same, the kernel's BPF run-time statistics on",
             b.get("microseg_kept_stats")),
            ("microseg, the daemon running", c["microseg"])]
    out = ["", "Where the request/response overhead goes (p50, medians over the same rounds; "
           "each packet passes two hooks, ingress of one veth and egress of the other; "
           "[docs/performance.md](docs/performance.md#real-traffic) has the analysis):", "",
           "| request/response | p50 µs | over no firewall |", "|---|---|---|"]
    for label, r in rows:
        if r is None:
            continue
        p50 = r["p50_us"]["median"]
        out.append(f"| {label} | {p50:.2f} | "
                   f"{'' if r is c['none'] else f'{p50 - base:+.2f}'} |")
    return out


def _policy(res: dict) -> list[str]:
    out = ["**Policy** — compile and apply (map writes until the one-word switch), and a "
           "one-rule edit of the same policy; then a policy file rewritten with one rule "
           "changed, through a running daemon, until `/v1/status` reports the new "
           "generation.",
           "",
           "| rules | workloads | map entries | compile | apply | one-rule edit: compile + "
           "apply | target |",
           "|---|---|---|---|---|---|---|"]
    for r in res["compile_apply"].values():
        target = ""
        if r["rules"] >= 10_000:
            target = f"≤ 2 s: {_met(r['compile_apply_s'] <= 2)} ({r['compile_apply_s']:.2f} s)"
        out.append(f"| {r['rules']:,} | {r['workloads']:,} | {r['entries']:,} | "
                   f"{r['compile_s']:.3f} s | {r['apply_s']:.3f} s | "
                   f"{r['edit_compile_s']:.3f} + {r['edit_apply_s']:.3f} s | {target} |")
    out += ["", "| file written → enforced | samples | median | p90 | max | target ≤ 250 ms |",
            "|---|---|---|---|---|---|"]
    for r in res["write_to_enforced"].values():
        note = "" if r["median_ms"] <= 250 else \
            " (where the time goes: docs/performance.md, Reloads)"
        out.append(f"| {r['rules']:,} rules, {r['workloads']:,} workloads | {r['samples']} | "
                   f"{r['median_ms']:,.0f} ms | {r['p90_ms']:,.0f} ms | {r['max_ms']:,.0f} ms | "
                   f"{_met(r['median_ms'] <= 250)}{note} |")
    return out


def _events(res: dict) -> list[str]:
    d = res["decode"]
    only, both = res["flow_log_only"], res["flow_log_and_watch"]
    out = ["**Events** — decode: records/s from a full ring buffer into tuples, and into "
           "enriched event dicts. Daemon: events produced by the daemon's own ingress program "
           "through BPF_PROG_TEST_RUN (its maps, its ring), into its flow log; first with a "
           "ring that holds the burst (the pipeline's pace), then with the default 16 MiB "
           "ring and a `watch --json` client, fed faster than they drain: losses at every "
           "stage, each one counted.",
           "",
           "| | events/s | target | |",
           "|---|---|---|---|",
           f"| ring buffer → decoded records | {d['decode']['per_s']:,} | ≥ 1,000,000 | "
           f"{_met(d['decode']['per_s'] >= 1e6)} |",
           f"| ring buffer → enriched events | {d['decode_enrich']['per_s']:,} | | |",
           f"| daemon → flow log ({only['produced']:,} events, "
           f"{only['ringbuf_lost'] + only['flow_log_lost']:,} lost) | "
           f"{only['flow_log_per_s']:,} | ≥ 300,000 | {_met(only['flow_log_per_s'] >= 3e5)} |",
           f"| daemon → flow log, overloaded, with a `watch` client | "
           f"{both['flow_log_per_s']:,} | ≥ 300,000 | {_met(both['flow_log_per_s'] >= 3e5)} |"]
    if "watch_per_s" in both:
        out.append(f"| … to the `watch --json` client at the same time | "
                   f"{both['watch_per_s']:,} | | |")
        out += ["", f"In the overloaded run, of {both['produced']:,} events produced "
                f"{both['ringbuf_lost']:,} found the ring buffer full (counted by the kernel, "
                f"reported as `lost` events totalling {both['ringbuf_lost_reported']:,}), "
                f"{both['published']:,} were published, the flow log lost "
                f"{both['flow_log_lost']:,}, and the `watch` client received "
                f"{both['watch_received']:,} and was told of the {both['watch_lost']:,} it "
                "missed: produced = delivered + lost, "
                + ("exactly, at every stage." if both["accounted"] and only["accounted"]
                   else "**not exactly** (a bug).")]
    return out


def _sessions(res: dict) -> list[str]:
    out = ["**Sessions** — sessions opened in a running daemon through its own ingress "
           "program, a SYN and its SYN-ACK each by BPF_PROG_TEST_RUN (session insert, "
           "verdict, promotion on the answer, events, as "
           "on the wire); then `microseg stats`, a Prometheus "
           "scrape, `microseg sessions --json` to the end, and the daemon's own sweep after "
           "they all went idle. Stall: the worst `/v1/status` round trip, probed every 10 ms, "
           "while listing / sweeping.",
           "",
           "| sessions | opened in | map memory | daemon RSS | `stats` | scrape | "
           "`sessions --json` | rows/s "
           "| client peak RSS | sweep | their `expired` events | stall | target |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res.values():
        target = f"sweep ≤ 200 ms: {_met(r['sweep_s'] <= 0.2)}" \
            if r["sessions"] == 100_000 else ""
        rss = r.get("daemon_rss_mib", {})
        out.append(f"| {r['sessions']:,} | {r['fill_s']:.1f} s | "
                   f"{r['session_map_memlock_mib']:.0f} MiB | "
                   f"{rss.get('peak', 0):.0f} MiB | {r['stats_s']:.2f} s | "
                   f"{_secs(r.get('scrape_s'))} | {r['list_s']:.2f} s | "
                   f"{r['list_rows_per_s']:,} | {r['list_client_peak_rss_mib']:.0f} MiB | "
                   f"{r['sweep_s']:.3f} s | {r['sweep_publish_s']:.2f} s | "
                   f"{r['list_loop_stall_ms']:.0f} / {r['sweep_loop_stall_ms']:.0f} ms | "
                   f"{target} |")
    out += ["", "The table's memory is allocated up front for its capacity; daemon RSS is its "
            "peak during the run. The sweep is the read, the judgement and the batch delete; "
            "the `expired` events are then made on the loop in slices and written to the flow "
            "log. Listing streams: the client's memory does not grow with the table."]
    return out


def _tui(res: dict | None) -> list[str]:
    if res is None:
        return ["**TUI** — not measured yet."]
    out = ["**TUI** — `microseg top` at 160x50 fed by a synthetic source; view, sort, pause, "
           "filter and help keys sent a quarter second apart, as a terminal would, in rounds; "
           "a key's latency is from the key event to the first frame painted after its "
           "action.",
           "",
           "| events/s | ingested/s | keys | median | p95 | max | target < 100 ms per key |",
           "|---|---|---|---|---|---|---|"]
    for r in res.values():
        target = tui_verdict(r).replace("not met", "**not met**") \
            .replace("not at max", "**not at max**")
        out.append(f"| {int(r['rate']):,} | {r['ingested_per_s']:,} | {r['keys']} | "
                   f"{r['median_ms']:.0f} ms | {r['p95_ms']:.0f} ms | {r['max_ms']:.0f} ms | "
                   f"{target} |")
    return out


def _soak(res: dict | None) -> list[str]:
    if res is None:
        return ["**Soak** — not measured yet."]
    out = [f"**Soak** — {res['seconds']} s of connection churn through a running daemon "
           f"({res['cycles']:,} TCP connections and as many UDP flows, {res['cycles_per_s']:,}"
           "/s, a `watch --json` client and the flow log on), sampled every 5 s; the first "
           f"{res['warmup_s']} s are warm-up (the table and the daemon's heap reaching their "
           "working size).",
           "",
           "| check | measured | |",
           "|---|---|---|"]
    judged = res.get("judged", True)
    out += [f"| {what} | {measured} | "
            f"{('held' if ok else '**not held**') if judged else 'too short to judge'} |"
            for what, measured, ok in soak_verdicts(res)]
    return out


def _discovery(res: dict | None) -> list[str]:
    if res is None:
        return ["**Discovery** — not measured yet."]
    s, lost = res["start_to_enforced"], res["wait_when_lost"]
    out = ["**Discovery** — a private dockerd with a user network and a `microseg run -i "
           "'veth*'` following it. Start → enforced: from the engine's own time (`docker "
           "events`) of the container joining its network, the first event of a start (the "
           "daemon names the container from it, before its process runs), to the daemon's "
           "`workload` `added` event, published once the generation holding the container is "
           "active. The first-packet race: containers "
           "whose command connects to a web container at its first instant; lost when the "
           "flow log holds a denial from the container's address before its first allowed "
           "verdict.",
           "",
           "| figure | measured | target |",
           "|---|---|---|",
           f"| start (the network `connect` that begins it) → labels enforced, "
           f"{s.get('n', 0)} starts | p50 {s.get('p50_ms')} ms, "
           f"p99 {s.get('p99_ms')} ms, max {s.get('max_ms')} ms | p99 ≤ 100 ms: "
           f"{_met(discovery_verdict(res))} |",
           f"| the same, relative to the engine's `start` event | p50 "
           f"{res.get('relative_to_start_event', {}).get('p50_ms')} ms, p99 "
           f"{res.get('relative_to_start_event', {}).get('p99_ms')} ms (negative: enforced "
           "before it) | — |",
           f"| first packet judged before the container's identity was known | "
           f"{res['race_lost']} of {res['racers']} | — |",
           f"| containers that got their page in the end | {res['race_served']} of "
           f"{res['racers']} | — |"]
    if lost.get("n"):
        out.append(f"| engine start → first allowed packet, when the race was lost | "
                   f"p50 {lost['p50_ms']} ms, max {lost['max_ms']} ms | — |")
    out += ["", "A container's process runs a few ms before the engine reports `start`, but "
            "some 0.4 s after it joins its network; the daemon names it from that `connect` "
            "(see [On a Docker host](#on-a-docker-host)). A race lost means the first SYN "
            "was denied and the kernel's retransmit one second later allowed."]
    return out


def _cluster(res: dict | None) -> list[str]:
    """The many-hosts section (bench/cluster.py); nothing until a full `make
    bench` has measured it, so the README always equals results.json."""
    if res is None:
        return []
    from .cluster import enforced_text, lat_text, verdicts

    p, pub, s = res["params"], res["publish"], res["scale"]
    load, start, burst, churn, inv = s["load"], s["start"], s["burst"], s["churn"], \
        s["inventory"]
    rss, target = churn["rss_mib"], f"p99 ≤ {res['target_p99_s']:g} s"
    published, under_churn = verdicts(res)
    idle = f"idle {s['idle']['cpu_pct']} %, " if "idle" in s else ""
    return [
        "**Many hosts** — a hosts lab (simulated hosts in namespaces on one wire) with one "
        "etcd member; a `microseg run --etcd … --node a` on host a, whose rule allows "
        "`{app: bench}`; the other nodes are lightweight publishers in host b's namespace "
        "writing what a daemon writes (a lease kept alive, `nodes/NODE` every TTL/3, "
        "`workloads/NODE/NAME`, one address each, all labelled `app: bench`). Enforced: the "
        "daemon's `workload` event, published once the generation holding the change is "
        "switched in, its own timestamp; measured from just before the put (or delete) "
        "request, so etcd's commit, the watch, the compile and the apply are all in it. "
        f"Publish: one workload at a time into a quiet cluster. Scale: {p['nodes']} nodes x "
        f"{p['workloads']} workloads published while daemon a is stopped, then its cold "
        "start into them; a node joining with its workloads at once; "
        f"{churn['seconds']:g} s of churn at {churn['changes_per_s']:g} changes/s over random "
        "nodes (a workload moving to a new address, or replaced by another), RSS and CPU "
        f"sampled every {p['sample_every']:g} s. A change not enforced within "
        f"{p['drain_s']:g} s of its phase's end is counted as not enforced.",
        "",
        "| figure | measured | target |",
        "|---|---|---|",
        f"| published → enforced on another host, {pub['publish_to_enforced'].get('n', 0)} "
        f"workloads | {lat_text(pub['publish_to_enforced'])} | {target}: {_met(published)} |",
        f"| {load['workloads']:,} workloads of {p['nodes']} nodes written to etcd | "
        f"{load['published_s']:.2f} s ({load['puts_per_s']:,} puts/s) | — |",
        f"| daemon cold start → ready (enforcing) | alone {start['alone_ready_s']:.2f} s; "
        f"into the {p['nodes']} nodes {start['ready_s']:.2f} s, "
        f"{start['remote_at_ready']:,} remote workloads at ready | — |",
        f"| a node joins with {burst['workloads']} workloads at once | "
        f"{enforced_text(burst, p)}: {lat_text(burst['to_enforced'])}; "
        f"{burst['generations']} generations, {burst['daemon_cpu_ms_per_generation']} ms of "
        "CPU each | — |",
        f"| update → enforced under churn, {churn['changes']} changes | "
        f"{lat_text(churn['update_to_enforced'])}; {churn['generations']} generations, "
        f"{churn['daemon_cpu_ms_per_generation']} ms of CPU each | {target}: "
        f"{_met(under_churn)} |",
        f"| daemon CPU | {idle}churn {churn['cpu_pct']} % (samples "
        f"{churn['cpu_pct_samples']['min']} to {churn['cpu_pct_samples']['max']} %) | — |",
        f"| daemon RSS | empty {s['rss_empty_mib']} MiB, loaded {s['rss_loaded_mib']} MiB; "
        f"churn {rss['first']} → {rss['last']} MiB (max {rss['max']}, "
        f"{rss['slope_mib_per_min']:+} MiB/min) | — |",
        f"| inventory at the end (`workloads`, source etcd) | {inv['matching']:,} of "
        f"{inv['expected']:,} as published ({inv['rows']:,} rows), listed in "
        f"{inv['list_s']} s | — |",
    ]


def _start(res: dict | None) -> list[str]:
    if res is None:
        return ["**Start** — not measured yet."]
    c, r = res["cold_s"], res["restart_s"]
    reused = ", ".join(res["restart_programs"])
    out = [f"**Start** — `microseg run` from exec to `GET /v1/status` answering `ready: true` "
           "(programs loaded and attached to both lab links, the policy applied), polled "
           f"every 5 ms; {res['rounds']} rounds, the two kinds interleaved; min / median / max. "
           "Cold: nothing pinned (a fresh boot). Restart: on the pins of a daemon stopped with "
           "`--keep-on-exit`, the same source.", "",
           "| start | min | median | max | target | |", "|---|---|---|---|---|---|",
           f"| cold (nothing pinned) | {c['min']:.2f} s | {c['median']:.2f} s | "
           f"{c['max']:.2f} s | ≤ {res['target_cold_s']:g} s | "
           f"{_met(c['median'] <= res['target_cold_s'])} |",
           f"| restart on pins (programs {reused}) | {r['min']:.2f} s | {r['median']:.2f} s | "
           f"{r['max']:.2f} s | ≤ {res['target_restart_s']:g} s | "
           f"{_met(r['median'] <= res['target_restart_s'])} |", "",
           f"Inside a cold start (the daemon's log, medians): BCC's compile "
           f"{res['cold_compile_s']['median']:.2f} s, the verifier loading the entry points "
           f"and the stages side by side {res['cold_load_s']['median']:.2f} s; the compile runs "
           "while the daemon imports its modules and checks its configuration, so the rest, "
           f"{c['median'] - res['cold_compile_s']['median'] - res['cold_load_s']['median']:.2f}"
           " s, is the interpreter's start before it, then the maps, the policy, attaching "
           "and the socket after it. A restart compiles "
           "nothing: the pinned programs are reused (docs/how-it-works.md, \"Start and "
           "restart\")."]
    return out


def _lifecycle(res: dict | None) -> list[str]:
    if res is None:
        return ["**Policy lifecycle** — not measured yet."]
    out = [f"**Policy lifecycle** — `policy suggest` and `policy diff` over "
           f"{res['lines']:,} flow-log lines ({res['files']} files, one of them gzipped, "
           f"{res['bytes'] / 1e6:,.0f} MB, a few thousand distinct flows and some lines that "
           "are not events), each command in a process of its own, offline "
           "(`--flow-log`); peak RSS from the kernel (VmHWM).",
           "",
           "| command | seconds | lines/s | peak RSS | target | |",
           "|---|---|---|---|---|---|"]
    for name in ("suggest", "diff"):
        r = res[name]
        out.append(f"| `policy {name}` | {r['seconds']:.1f} | {r['lines_per_s']:,} | "
                   f"{r['peak_rss_mib']:.0f} MiB | ≤ {res['target_s']:g} s | "
                   f"{_met(r['seconds'] <= res['target_s'])} |")
    out += ["", f"The suggested policy has {res['rules']:,} rules. The daemon's flow "
            f"aggregate takes {res['add_ns']:,} ns per verdict event (`FlowAggregate.add`)."]
    return out


def _stress(res: dict | None) -> list[str]:
    """The stress section (bench/stress.py); nothing until a full `make
    bench` has measured it, so the README always equals results.json."""
    if res is None:
        return []
    from .stress import offered_met, verdicts

    p, g = res["params"], res["generator"]

    def pps(r: dict) -> str:
        return f"{r['median']:,.0f} ({r['min']:,.0f} to {r['max']:,.0f})"

    out = [f"**Stress** — an XDP program in live-frames mode (BPF_PROG_TEST_RUN) sends "
           f"{p['frame_bytes']}-byte UDP frames (64 on a wire) into a lab veth from one CPU, "
           "millions per second; the host end receives them in a NAPI thread pinned to the "
           f"other CPU (cpu{p['cpu']}), the path's: microseg's TC programs on the host side of "
           "the veths, a bridge, a receiver namespace. The generator offers more than that CPU "
           "can carry (the rest drops at the veth's full ring, counted), so what is compared is "
           "what the path's CPU carries. "
           f"{p['rounds']} rounds, the configurations interleaved and rotated each round, "
           f"{p['seconds']} s each after {p['warmup']} s of warm-up; medians (min to max). "
           "Allowed, established: one UDP flow made a session by a datagram and its answer, "
           "then flooded; nftables as in the real-traffic table (a set, conntrack). Denied "
           "flood: the same frames from a workload the policy denies, its events aggregated "
           "per flow (`--event-window` 1 s). Per CPU-second: packets delivered to the "
           "receiver, or, for the denied flood, taken in and judged by the host (delivered "
           "with a firewall: 0), per second of the path CPU's busy time (on a shared VM others "
           "can take part of it). ns/packet: that busy time per packet; BPF ns: microseg's "
           "programs, both hooks, from the kernel's run-time statistics.",
           "",
           "| configuration | offered/s | delivered/s | per CPU-second (denied: taken) "
           "| % of no firewall | target ≥ 95 % | ns/packet | BPF ns/packet |",
           "|---|---|---|---|---|---|---|---|"]
    rows = verdicts(res)
    for r in rows:
        met = "" if r["met"] is None else _met(r["met"])
        bpf = f"{r['bpf_ns']['median']:,.0f}" if r["bpf_ns"] else ""
        out.append(f"| {r['label']} | {pps(r['offered'])} | {pps(r['delivered'])} | "
                   f"{pps(r['compared'])} | {100 * r['share']:.0f} % | {met} | "
                   f"{r['ns']['median']:,.0f} | {bpf} |")
    out += ["", f"The generator alone, into a veth whose frames the host drops at once, offers "
            f"{pps(g['offered_pps'])} frames/s (the host takes "
            f"{g['taken_per_cpu_s']['median']:,.0f} per second of the path's CPU); with no "
            f"firewall, {pps(res['configs']['none']['floods']['allowed']['offered_pps'])}: "
            f"≥ 1,000,000/s offered: {_met(offered_met(res))}."]
    ok = {r["flood"]: r for r in rows if r["kind"] == "tc_ok"}
    ms = {r["flood"]: r for r in rows if r["kind"] == "microseg"}
    if "allowed" in ok and "allowed" in ms:
        out[-1] += (f" A TC program that returns `TC_ACT_OK` at once, on the hooks microseg "
                    f"uses, already delivers {100 * ok['allowed']['share']:.0f} % of no "
                    f"firewall's allowed traffic: on this path the kernel's TC hooks alone "
                    f"leave less than the target, whatever the program; microseg's own work "
                    f"takes it from there to {100 * ms['allowed']['share']:.0f} %.")
    events = [r["events"] for r in rows if r["events"] and r["flood"] == "denied"]
    if events:
        out[-1] += (f" During a denied flood's {p['seconds']} s the daemon published "
                    f"{events[0][0]:,.0f} events (median) and lost {events[0][1]:,.0f} (max).")
    return out


def render(res: dict) -> str:
    m = res["machine"]
    out = [START, "",
           f"`make bench` on {res['date'][:10]} (mode {res['mode']}; `bench/results.json` "
           f"holds every figure): Linux {m['kernel']}, {m['cpu']}, {m['cpus']} vCPUs, "
           f"{m['memory_gib']:.0f} GiB, Python {m['python']}, a shared VM. Every figure and "
           "its baseline come from the same run. "
           "Targets: [docs/performance.md](docs/performance.md).", ""]
    again = res.get("remeasured") or []
    if again:  # sections measured again later (same bench functions, full sizes)
        out[-1:] = [" ".join(f"Measured again on {a['date'][:16].replace('T', ' ')} UTC: "
                             f"{', '.join(a['sections'])} — {a['why']}." for a in again), ""]
    for part in (_datapath(res["datapath"]), _start(res.get("start")),
                 _traffic(res.get("traffic")),
                 _events(res["events"]), _sessions(res["sessions"]),
                 _policy(res["policy"]), _tui(res.get("tui")), _soak(res.get("soak")),
                 _discovery(res.get("discovery")), _cluster(res.get("cluster")),
                 _lifecycle(res.get("lifecycle")),
                 _stress(res.get("stress"))):
        if part:  # a section not measured yet may render nothing
            out += [*part, ""]
    out.append(END)
    return "\n".join(out)


def update(readme: Path = README, results: Path = RESULTS) -> None:
    text = readme.read_text(encoding="utf-8")
    i, j = text.find(START), text.find(END)
    if i < 0 or j < i:
        raise SystemExit(f"{readme}: no generated benchmark section ({START!r} … {END!r})")
    section = render(json.loads(results.read_text(encoding="utf-8")))
    readme.write_text(text[:i] + section + text[j + len(END):], encoding="utf-8")


if __name__ == "__main__":
    update()
    print(f"{README}: benchmark section rewritten from {RESULTS}", file=sys.stderr)
