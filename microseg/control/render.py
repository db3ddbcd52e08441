"""Human-readable renderings of events, sessions and stats for the CLI:
one line per event (`watch -o compact`), one per session. Colour only when
asked (a TTY without NO_COLOR)."""

from __future__ import annotations

from collections.abc import Mapping

RESET = "\033[0m"
COLOURS = {"red": "\033[31m", "green": "\033[32m", "yellow": "\033[33m",
           "blue": "\033[34m", "cyan": "\033[36m", "magenta": "\033[35m", "dim": "\033[2m",
           "bold": "\033[1m"}
VERDICT_COLOUR = {"allowed": "green", "denied": "red", "dropped": "red", "audit": "yellow"}


def paint(text: str, colour: str | None, on: bool) -> str:
    return f"{COLOURS[colour]}{text}{RESET}" if on and colour else text


def endpoint(e: Mapping | None) -> str:
    if not e:
        return "?"
    ip = e.get("ip") or "?"
    host = f"[{ip}]" if ":" in ip and e.get("port") is not None else ip
    s = f"{host}:{e['port']}" if e.get("port") is not None else host
    return f"{s} ({e['workload']})" if e.get("workload") else s


def human_bytes(n: int) -> str:
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def duration(s: float | None) -> str:
    if s is None:
        return "-"
    s = float(s)
    if s < 60:
        return f"{s:.0f}s" if s >= 10 else f"{s:.1f}s"
    m, sec = divmod(int(s), 60)
    if m < 60:
        return f"{m}m{sec:02d}s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def event_line(e: Mapping, colour: bool = False) -> str:
    """One line per event, like `hubble observe`."""
    t = str(e.get("time", ""))[11:26]
    kind = e.get("type")
    if kind in ("verdict", "drop"):
        verdict = str(e.get("verdict", "?"))
        label = paint(f"{verdict.upper():8s}", VERDICT_COLOUR.get(verdict), colour)
        rule, reason = e.get("rule"), e.get("reason")
        why = f"rule={rule}" if reason == "rule" else f"{reason} rule={rule}" if rule \
            else str(reason)
        flags = ",".join(e.get("tcp_flags") or [])
        extra = f" [{flags}]" if flags else ""
        return (f"{t} {label} {e.get('protocol')} {endpoint(e.get('src'))} -> "
                f"{endpoint(e.get('dst'))}{extra} {why} "
                f"{e.get('direction')} {e.get('interface') or '-'}")
    if kind == "session":
        prev = e.get("prev_state")
        change = f"{prev}->{e.get('state')}" if prev else str(e.get("state"))
        label = paint(f"{'SESSION':8s}", "cyan", colour)
        tail = ""
        if e.get("packets"):
            p, b = e["packets"], e["bytes"]
            tail = (f" pkts {p['orig']}/{p['reply']} bytes {human_bytes(b['orig'])}/"
                    f"{human_bytes(b['reply'])} {duration(e.get('duration_s'))}")
        return (f"{t} {label} {change} {e.get('protocol')} {endpoint(e.get('src'))} -> "
                f"{endpoint(e.get('dst'))} rule={e.get('rule') or 'default'}{tail}")
    if kind == "policy":
        label = paint(f"{'POLICY':8s}", "bold", colour)
        if e.get("result") == "rejected":
            errs = e.get("errors") or []
            return (f"{t} {label} rejected ({len(errs)} errors), generation "
                    f"{e.get('generation')} stays: {errs[0] if errs else ''}")
        return (f"{t} {label} {e.get('result')} generation {e.get('generation')}: "
                f"{e.get('rules')} rules, {e.get('workloads')} workloads, "
                f"{e.get('apply_ms')} ms")
    if kind == "workload":
        label = paint(f"{'WORKLOAD':8s}", "blue", colour)
        labels = ",".join(f"{k}={v}" for k, v in sorted((e.get("labels") or {}).items()))
        return (f"{t} {label} {e.get('action')} {e.get('workload')} ({e.get('source')}) "
                f"{','.join(e.get('addresses') or []) or '-'} {labels or '-'}")
    if kind == "lost":
        label = paint(f"{'LOST':8s}", "magenta", colour)
        return f"{t} {label} {e.get('count')} events ({e.get('source')})"
    return f"{t} {kind}"


def session_line(s: Mapping) -> str:
    p, b = s["packets"], s["bytes"]
    state = str(s.get("state") or "?").upper()
    return (f"{s['protocol']!s:6s} {state:11s} {endpoint(s['src'])} -> {endpoint(s['dst'])}  "
            f"pkts {p['orig']}/{p['reply']} bytes {human_bytes(b['orig'])}/"
            f"{human_bytes(b['reply'])}  age {duration(s['age_s'])} idle "
            f"{duration(s['idle_s'])} expires {duration(s['expires_in_s'])}  "
            f"rule {s.get('rule') or 'default'}")


def staged_status_lines(s: Mapping | None, colour: bool = False) -> list[str]:
    """`policy stage status`: the candidate, what it judged, the flows whose
    verdict it would change, and its rules' hits."""
    if s is None:
        return ["nothing staged (`microseg policy stage FILE` loads a candidate)"]
    v = s["verdicts"]
    out = [f"staged     {s['source']}  ({s['rules_count']} rules, {s['mode']}, default "
           f"{s['default']})",
           f"sha256     {s['sha256']}",
           f"since      {s['since']}",
           f"judged     {s['judged']:,} new flows and denied packets: "
           + (", ".join(f"{n:,} {k}" for k, n in sorted(v.items())) or "none yet"),
           f"differ     {s['would_change']:,} judged otherwise by the candidate"
           + ("" if not s["would_change"] else ": " + ", ".join(
               f"{n:,} {k}" for k, n in sorted(s["would_change_to"].items())))]
    changes = s["changes"]
    if changes:
        rows = [("FROM", "TO", "PROTO", "PORT", "ACTIVE", "STAGED", "COUNT")]
        for c in changes:
            rows.append((str(c["from"]), str(c["to"]), str(c["protocol"]),
                         "-" if c["port"] is None else str(c["port"]),
                         f"{c['verdict']} ({c['rule'] or 'default'})",
                         f"{c['staged_verdict']} ({c['staged_rule'] or 'default'})",
                         f"{c['count']:,}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        out.append("")
        for i, r in enumerate(rows):
            cells = [c.ljust(w) for c, w in zip(r, widths, strict=True)]
            if i:
                cells[5] = paint(cells[5], VERDICT_COLOUR.get(r[5].split()[0]), colour)
            out.append("  ".join(cells).rstrip())
        if s["changes_not_listed"]:
            out.append(f"(+{s['changes_not_listed']:,} more in flows not listed)")
    out.append("")
    out.append("staged rules: " + ", ".join(f"{r['name']} {r['hits']:,}" for r in s["rules"])
               if s["rules"] else "staged rules: none")
    if s["never_hit"]:
        out.append("never hit:    " + ", ".join(s["never_hit"]))
    return out
