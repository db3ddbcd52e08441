"""What `microseg top` shows, computed outside the widgets.

The model takes what the daemon sends — events as they stream, and stats,
status, the policy and the session table as they are polled — and keeps
aggregates: rates and their history, the verdict tail, the workload matrix,
flows (sessions grouped by endpoints, protocol and port), rules with hit
rates, recent events for drilling in, and what a staged candidate policy
would change (docs/policy.md "Staging"). The app renders snapshots of it
at a fixed rate; nothing here knows about Textual.

The tail and the recent events are kept as the raw lines, parsed again when
shown. At 50,000 events/s an event lives ~0.1 s in them: as parsed dicts
they would all outlive two young collections, fill the oldest generation
and make Python's full collections — 100+ ms pauses a key press waits
behind — frequent. Bytes are not tracked by the garbage collector at all.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import orjson

HISTORY = 60          # samples kept for sparklines (one per stats poll)
TAIL = 1000           # verdict tail length
RECENT = 5000         # recent events kept for drilling in
WORLD = "(world)"     # the matrix's name for addresses no workload owns
STAGED_FLOWS = 10_000  # flows marked with a staged verdict (as many as the daemon lists)

VERDICTS = ("allowed", "denied", "audit", "dropped")


def endpoint_label(ep: dict | None) -> str:
    if not ep:
        return "?"
    return ep.get("workload") or ep.get("ip") or "?"


def flow_key(src: dict, dst: dict, protocol: object) -> str:
    """A flow of the Flows view: endpoints (workload, else address), protocol
    and destination port."""
    return f"{endpoint_label(src)}>{endpoint_label(dst)}/{protocol}/{dst.get('port')}"


@dataclass
class Header:
    connected: bool = False
    error: str = ""
    daemon: str = ""
    generation: int = 0
    mode: str = ""
    default: str = ""
    last_reload: str = ""
    pps: dict[str, float] = field(default_factory=lambda: dict.fromkeys(VERDICTS, 0.0))
    new_sessions_ps: float = 0.0
    sessions: int = 0
    capacity: int = 0
    lost: int = 0
    events_ps: float = 0.0
    # GET /v1/status policy.staged: {source, sha256, since, rules, would_change}
    staged: dict | None = None


@dataclass
class FlowRow:
    key: str
    src: dict
    dst: dict
    protocol: str | int
    port: int | None
    sessions: int
    packets: int
    bytes: int
    pps: float
    bps: float
    rule: str | None
    verdict: str | None

    def as_filter_row(self) -> dict:
        return {"type": "verdict", "src": self.src, "dst": self.dst, "protocol": self.protocol,
                "rule": self.rule, "verdict": self.verdict}


@dataclass
class RuleRow:
    name: str
    action: str
    protocol: str
    hits: int
    rate: float
    last_hit: str | None

    def as_filter_row(self) -> dict:
        return {"type": "verdict", "rule": self.name, "protocol": self.protocol}


class Model:
    def __init__(self) -> None:
        self.header = Header()
        self.history: dict[str, deque[float]] = {
            k: deque([0.0] * HISTORY, maxlen=HISTORY) for k in (*VERDICTS, "new_sessions")}
        self.tail: deque[bytes] = deque(maxlen=TAIL)       # verdict and drop events
        self.recent: deque[bytes] = deque(maxlen=RECENT)   # every flow event, for drill-in
        self.matrix: dict[tuple[str, str], Counter[str]] = {}
        self.workloads: list[str] = []
        self.flows: dict[str, FlowRow] = {}
        self.sessions: list[dict] = []
        self.by_state: dict[str, int] = {}
        self.rules: dict[str, RuleRow] = {}
        # A staged candidate: the latest differing `staged` of each flow's
        # verdict events (flow_key; the oldest marked flow goes first past
        # STAGED_FLOWS), and its rules (GET /v1/policy/staged).
        self.staged_flows: dict[str, dict] = {}
        self.staged_rules: dict[str, RuleRow] = {}
        self.events_seen = 0
        self.lost_seen = 0
        self._prev_stats: tuple[float, dict[str, int], int, int] | None = None
        self._prev_flows: tuple[float, dict[tuple, tuple[int, int]]] | None = None
        self._prev_rules: tuple[float, dict[str, int]] | None = None
        self._prev_staged: tuple[str, float, dict[str, int]] | None = None
        self._staged_sha: str | bool | None = False  # False: no status read yet

    # -- the event stream ------------------------------------------------------

    def on_lines(self, lines: Sequence[bytes]) -> None:
        """Events as the daemon streams them: one JSON document per line."""
        tail, recent, matrix = self.tail, self.recent, self.matrix
        loads = orjson.loads
        for line in lines:
            e = loads(line)
            t = e.get("type")
            if t == "verdict" or t == "drop":
                tail.append(line)
                recent.append(line)
                key = (endpoint_label_or_world(e.get("src")), endpoint_label_or_world(e.get("dst")))
                c = matrix.get(key)
                if c is None:
                    c = matrix[key] = Counter()
                # packets, not events: a denial event stands for `count` of them
                c[e.get("verdict") or "dropped"] += e.get("count") or 1
                staged = e.get("staged")
                if staged is not None:  # only while a candidate would decide otherwise
                    self._mark_staged(e, staged)
            elif t == "session":
                recent.append(line)
            elif t == "lost":
                self.lost_seen += e.get("count", 0)
        self.events_seen += len(lines)

    def _mark_staged(self, e: dict, staged: dict) -> None:
        marks = self.staged_flows
        key = flow_key(e.get("src") or {}, e.get("dst") or {}, e.get("protocol"))
        marks.pop(key, None)  # the newest last: the first one is the oldest
        marks[key] = staged
        if len(marks) > STAGED_FLOWS:
            del marks[next(iter(marks))]

    def tail_newest_first(self) -> Iterator[dict]:
        return map(orjson.loads, reversed(self.tail))

    def tail_events(self) -> list[dict]:
        return [orjson.loads(x) for x in self.tail]

    def recent_events(self) -> list[dict]:
        return [orjson.loads(x) for x in self.recent]

    # -- polls ---------------------------------------------------------------

    def on_status(self, st: dict) -> None:
        h = self.header
        pol = st.get("policy", {})
        h.daemon = f"pid {st.get('pid')}, up {_duration(st.get('uptime_s', 0))}"
        h.generation = pol.get("generation", 0)
        h.mode = pol.get("mode") or ""
        h.default = pol.get("default") or ""
        last = pol.get("last_reload") or {}
        if last:
            h.last_reload = last.get("result", "")
            if last.get("result") == "rejected" and last.get("errors"):
                h.last_reload += f": {last['errors'][0]}"
        h.staged = pol.get("staged")
        sha = h.staged.get("sha256") if h.staged else None
        if sha != self._staged_sha:
            if self._staged_sha is not False:
                # Another candidate, or none: the marks and rules were the old
                # one's. (Not at the first status: the marks of the events
                # replayed at start are of the candidate it names.)
                self.staged_flows.clear()
            self.on_staged(None)
            self._staged_sha = sha

    def on_stats(self, st: dict, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        h = self.header
        totals = {v: int(st.get("packets", {}).get(v, 0)) for v in VERDICTS}
        new = sum(c["packets"] for c in st.get("counters", [])
                  if c["verdict"] in ("allowed", "audit") and c["reason"] in ("rule", "default"))
        published = sum(st.get("events", {}).get("published", {}).values())
        if self._prev_stats is not None:
            t0, prev, prev_new, prev_pub = self._prev_stats
            dt = max(now - t0, 1e-6)
            for v in VERDICTS:
                h.pps[v] = max(0.0, (totals[v] - prev[v]) / dt)
                self.history[v].append(h.pps[v])
            h.new_sessions_ps = max(0.0, (new - prev_new) / dt)
            self.history["new_sessions"].append(h.new_sessions_ps)
            h.events_ps = max(0.0, (published - prev_pub) / dt)
        self._prev_stats = (now, totals, new, published)
        se = st.get("sessions", {})
        h.sessions = se.get("entries", 0)
        h.capacity = se.get("capacity", 0)
        self.by_state = dict(se.get("by_state", {}))
        lost = st.get("events", {}).get("lost", {})
        h.lost = int(lost.get("ringbuf", 0)) + int(lost.get("subscriber", 0))

    def on_policy(self, pol: dict, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.workloads = [w["name"] for w in pol.get("workloads", [])]
        prev_t, prev = self._prev_rules or (now, {})
        dt = max(now - prev_t, 1e-6)
        rules = {}
        for r in pol.get("rules", []):
            hits = r.get("hits", 0)
            rate = max(0.0, (hits - prev[r["name"]]) / dt) if r["name"] in prev else 0.0
            rules[r["name"]] = RuleRow(r["name"], r.get("action", ""), r.get("protocol", "any"),
                                       hits, rate, r.get("last_hit"))
        self.rules = rules
        self._prev_rules = (now, {name: r.hits for name, r in rules.items()})

    def on_staged(self, st: dict | None, now: float | None = None) -> None:
        """GET /v1/policy/staged's `staged`: the candidate's rules and their
        hits (rates: between two reads of the same candidate)."""
        if st is None:
            self.staged_rules, self._prev_staged = {}, None
            return
        now = time.monotonic() if now is None else now
        sha = st.get("sha256") or ""
        prev_sha, prev_t, prev = self._prev_staged or ("", now, {})
        if prev_sha != sha:
            prev_t, prev = now, {}
        dt = max(now - prev_t, 1e-6)
        rules = {}
        for r in st.get("rules", []):
            name, hits = r["name"], r.get("hits", 0)
            rate = max(0.0, (hits - prev[name]) / dt) if name in prev else 0.0
            rules[name] = RuleRow(name, r.get("action", ""), "", hits, rate, r.get("last_hit"))
        self.staged_rules = rules
        self._prev_staged = (sha, now, {name: r.hits for name, r in rules.items()})

    def on_sessions(self, rows: list[dict], now: float | None = None) -> None:
        """The session table: flows and the Sessions view."""
        now = time.monotonic() if now is None else now
        # A flow's rate is the sum of its sessions' deltas since the last poll,
        # a session born since then counting whole: short connections (most
        # of them) come and go between polls and would otherwise never show.
        prev = self._prev_flows
        dt = max(now - prev[0], 1e-6) if prev else 1.0
        seen: dict[tuple, tuple[int, int]] = {}
        flows: dict[str, list] = {}
        for s in rows:
            src, dst = s.get("src") or {}, s.get("dst") or {}
            key = flow_key(src, dst, s.get("protocol"))
            pk = s["packets"]["orig"] + s["packets"]["reply"]
            by = s["bytes"]["orig"] + s["bytes"]["reply"]
            sid = (s.get("protocol"), src.get("ip"), src.get("port"), dst.get("ip"),
                   dst.get("port"))
            seen[sid] = (pk, by)
            dpk = dby = 0
            if prev:
                p0, b0 = prev[1].get(sid, (0, 0))
                if pk < p0:  # the same 5-tuple, a new session
                    p0 = b0 = 0
                dpk, dby = pk - p0, by - b0
            f = flows.get(key)
            if f is None:
                flows[key] = [s, 1, pk, by, dpk, dby]
            else:
                f[1] += 1
                f[2] += pk
                f[3] += by
                f[4] += dpk
                f[5] += dby
        out = {}
        for key, (s, n, pk, by, dpk, dby) in flows.items():
            src, dst = s.get("src") or {}, s.get("dst") or {}
            out[key] = FlowRow(key, {"ip": src.get("ip"), "workload": src.get("workload"),
                                     "port": None},
                               {"ip": dst.get("ip"), "workload": dst.get("workload"),
                                "port": dst.get("port")},
                               s.get("protocol"), dst.get("port"), n, pk, by,
                               max(0.0, dpk / dt), max(0.0, dby / dt),
                               s.get("rule"), s.get("verdict"))
        self.flows = out
        self._prev_flows = (now, seen)
        self.sessions = rows

    def set_connected(self, connected: bool, error: str = "") -> None:
        self.header.connected = connected
        self.header.error = error

    # -- drilling in -----------------------------------------------------------

    def events_of_flow(self, flow: FlowRow, limit: int = 200) -> list[dict]:
        return self.events_between(flow.src, flow.dst, flow.protocol, flow.port, limit)

    def events_between(self, src: dict, dst: dict, protocol: object, port: int | None,
                       limit: int = 200) -> list[dict]:
        """Recent events of one flow: endpoints (workload, else address),
        protocol and destination port."""
        s, d = endpoint_label(src), endpoint_label(dst)
        out = [e for e in self.recent_events()
               if endpoint_label(e.get("src")) == s and endpoint_label(e.get("dst")) == d
               and e.get("protocol") == protocol
               and (e.get("dst") or {}).get("port") == port]
        return out[-limit:]

    def events_of_rule(self, rule: str, limit: int = 200) -> list[dict]:
        return [e for e in self.recent_events() if e.get("rule") == rule][-limit:]

    def events_of_staged_rule(self, rule: str, limit: int = 200) -> list[dict]:
        """The recent verdicts the candidate's `rule` would decide otherwise
        (events carry `staged` only then: docs/events.md)."""
        return [e for e in self.recent_events()
                if (e.get("staged") or {}).get("rule") == rule][-limit:]


def endpoint_label_or_world(ep: dict | None) -> str:
    return (ep or {}).get("workload") or WORLD


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d"
