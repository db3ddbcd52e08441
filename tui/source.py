"""Where `microseg top` gets its data: the daemon, or a synthetic source.

Both hand events over as NDJSON lines, exactly as the daemon streams them,
so the app parses the same bytes whichever it talks to. The synthetic source
(workloads, rules, flows and sessions, events at a chosen rate, seeded) is
for tests and for the benchmark that measures key latency under load.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import AsyncIterator

import orjson

from microseg.control.client import Client, DaemonError, DaemonPolicy, fetch_policy

SESSIONS_CAP = 20_000  # session rows read per poll: flows are the top of these


class DaemonSource:
    def __init__(self, socket_path: str | None = None) -> None:
        self._client = Client(socket_path, timeout=10)
        self.name = self._client.socket_path
        self._open = False

    async def _c(self) -> Client:
        if not self._open:
            await self._client.__aenter__()
            self._open = True
        return self._client

    async def status(self) -> dict:
        return await (await self._c()).get("/v1/status")

    async def stats(self) -> dict:
        return await (await self._c()).get("/v1/stats")

    async def policy(self) -> dict:
        return await (await self._c()).get("/v1/policy")

    async def staged(self) -> dict | None:
        """The staged candidate with its rules' hits (GET /v1/policy/staged),
        None when nothing is staged."""
        return (await (await self._c()).get("/v1/policy/staged")).get("staged")

    async def active_policy(self) -> DaemonPolicy:
        """The active policy as `policy trace` evaluates it: the file and every
        discovered workload, merged (microseg/control/client.py)."""
        return await fetch_policy(await self._c())

    async def sessions(self) -> list[dict]:
        rows: list[dict] = []
        async for lines in (await self._c()).stream_lines("/v1/sessions"):
            rows.extend(orjson.loads(x) for x in lines)
            if len(rows) >= SESSIONS_CAP:
                break  # closing the stream stops the daemon's side
        return rows[:SESSIONS_CAP]

    async def events(self, last: int) -> AsyncIterator[list[bytes]]:
        async for lines in (await self._c()).stream_lines("/v1/events", last=last or None):
            yield lines

    async def close(self) -> None:
        if self._open:
            self._open = False
            await self._client.__aexit__(None, None, None)


# The synthetic policy as a file: what `active_policy()` parses and a trace
# walks. (name, workloads it names, from, to, protocol, ports, action); a
# rule naming a workload the source leaves out is left out too.
_RULES_YAML = [
    ("client-to-web", ("client", "web"), "{workload: client}", "{workload: web}", "tcp",
     "[80, 443]", "allow"),
    ("web-to-api", ("web", "api"), "{workload: web}", "{workload: api}", "tcp", "[443]",
     "allow"),
    ("api-to-db", ("api", "db"), "{workload: api}", "{workload: db}", "tcp", "[5432]", "allow"),
    ("no-ssh", (), "any", "any", "tcp", "[22]", "deny"),
    ("dns", (), "any", "any", "udp", "[53]", "allow"),
    ("legacy", ("web",), "{cidr: 192.0.2.0/24}", "{workload: web}", "tcp", "[8080]", "allow"),
]
# The candidate `stage()` stages: no-ssh and legacy gone, ssh-admin new, db
# no longer in audit mode. What it decides about the synthetic flows:
# `_staged_decision`.
STAGED_RULES = [("client-to-web", "allow"), ("web-to-api", "allow"), ("api-to-db", "allow"),
                ("ssh-admin", "allow"), ("dns", "allow")]


def _policy_text(ips: dict[str, str]) -> str:
    lines = ["version: 1", "default: deny", "workloads:"]
    for name, ip in ips.items():
        audit = ", mode: audit" if name == "db" else ""  # the audit verdicts' destination
        lines.append(f"  {name}: {{addresses: [{ip}]{audit}}}")
    lines.append("rules:")
    for name, needs, frm, to, proto, ports, action in _RULES_YAML:
        if all(w in ips for w in needs):
            lines.append(f"  - {{name: {name}, from: {frm}, to: {to}, protocol: {proto}, "
                         f"ports: {ports}, action: {action}}}")
    return "\n".join(lines) + "\n"


def _staged_decision(e: dict) -> tuple[str | None, dict | None]:
    """The candidate's rule for a synthetic event, and the event's `staged`
    (docs/events.md): null unless its verdict differs from the active one."""
    verdict, rule = e["verdict"], e["rule"]
    if e["dst"]["port"] == 22:  # no-ssh is gone: ssh-admin lets the client in
        if e["src"]["workload"] == "client":
            return "ssh-admin", {"verdict": "allowed", "rule": "ssh-admin"}
        return None, None  # denied by the default instead: the same verdict
    if verdict == "audit":  # db is enforced: what the audit mode let pass breaks
        return None, {"verdict": "denied", "rule": None}
    return rule, None


class SyntheticSource:
    """A made-up daemon: `workloads` talking over a few ports under a small
    policy, `rate` events per second. rate=0 gives one fixed burst of events
    (deterministic screens for snapshot tests). `stage()` stages a candidate
    policy: from then on events carry its verdicts; call it before the events
    are read (a burst is read once)."""

    name = "synthetic"

    def __init__(self, rate: float = 1000, *, seed: int = 1, workloads: int = 6,
                 burst: int = 200) -> None:
        self.rate = rate
        self.burst = burst
        self.rng = random.Random(seed)
        self.names = ["client", "web", "api", "db", "cache", "queue", "auth", "search"][:workloads]
        self.ips = {n: f"10.203.0.{10 * (i + 1)}" for i, n in enumerate(self.names)}
        self.rules = [("client-to-web", "allow", "tcp"), ("web-to-api", "allow", "tcp"),
                      ("api-to-db", "allow", "tcp"), ("no-ssh", "deny", "tcp"),
                      ("dns", "allow", "udp"), ("legacy", "allow", "tcp")]
        self.hits = dict.fromkeys((r[0] for r in self.rules), 0)
        self.totals = {"allowed": 0, "denied": 0, "audit": 0, "dropped": 0}
        self.new_sessions = 0
        self.published = 0
        self.started = time.monotonic()
        self._pool = [self._line(i) for i in range(4096)]  # (line, verdict, rule)
        self._sessions = [self._session(i) for i in range(300)]
        self.fail = False  # set: every call raises, as if the daemon went away
        # The active policy: tests may replace the text and bump the generation
        # (a reload); active_policy() counts its calls.
        self.generation = 1
        self.policy_text = _policy_text(self.ips)
        self.policy_fetches = 0
        self._staged: dict | None = None  # the candidate: GET /v1/policy/staged's
        self._staged_pool: list[tuple[str | None, bool]] | None = None  # per pool line
        self.staged_hits: dict[str, int] = {}
        self.judged = self.would_change = 0

    # -- made-up data ----------------------------------------------------------

    def _flow(self, i: int) -> tuple[str, str, str, int, str, str]:
        rng = self.rng
        src, dst = rng.sample(self.names, 2)
        kind = rng.random()
        if kind < 0.7:
            rule, _, proto = self.rules[rng.randrange(3)]
            return src, dst, proto, rng.choice((80, 443, 5432)), rule, "allowed"
        if kind < 0.85:
            return src, dst, "tcp", 22, "no-ssh", "denied"
        if kind < 0.95:
            return src, dst, "udp", 53, "dns", "allowed"
        return src, "db", "tcp", 6379, None, "audit"

    def _line(self, i: int) -> tuple[bytes, str, str | None]:
        src, dst, proto, port, rule, verdict = self._flow(i)
        event = {"time": "2026-11-27T09:00:00.000000Z", "seq": i + 1, "type": "verdict",
                 "verdict": verdict, "reason": "rule" if rule else "default", "rule": rule,
                 "policy_generation": 1, "direction": "ingress", "interface": f"msd-{src}",
                 "family": "ipv4", "protocol": proto,
                 "src": {"ip": self.ips[src], "port": 30000 + i % 30000, "workload": src},
                 "dst": {"ip": self.ips[dst], "port": port, "workload": dst},
                 "tcp_flags": ["SYN"] if proto == "tcp" else [], "bytes": 74, "staged": None}
        return orjson.dumps(event) + b"\n", verdict, rule

    def _session(self, i: int) -> dict:
        src, dst, proto, port, rule, verdict = self._flow(i)
        pk = self.rng.randrange(2, 5000)
        return {"family": "ipv4", "protocol": proto,
                "state": self.rng.choice(("established", "established", "new", "closing")),
                "src": {"ip": self.ips[src], "port": 30000 + i, "workload": src},
                "dst": {"ip": self.ips[dst], "port": port, "workload": dst},
                "packets": {"orig": pk, "reply": pk // 2},
                "bytes": {"orig": pk * 100, "reply": pk * 700},
                "age_s": float(i), "idle_s": float(i % 7), "expires_in_s": 100.0 - i % 7,
                "rule": rule, "verdict": verdict, "policy_generation": 1,
                "interface": f"msd-{src}"}

    def _check(self) -> None:
        if self.fail:
            raise DaemonError("daemon not reachable at synthetic (connection refused)")

    # -- the Source interface -----------------------------------------------------

    # -- staging ----------------------------------------------------------------

    def stage(self, source: str = "candidate.yaml") -> None:
        """Stage the candidate (STAGED_RULES): the events read from now on carry
        its verdicts, and its rules count hits."""
        self._set_staged(source)
        self.staged_hits = dict.fromkeys((n for n, _ in STAGED_RULES), 0)
        self.judged = self.would_change = 0
        self._staged = {
            "source": source, "sha256": hashlib.sha256(source.encode()).hexdigest(),
            "generation": 0x80000000 | self.generation, "since": "2026-11-27T09:00:00.000000Z",
            "mode": "enforce", "default": "deny", "rules_count": len(STAGED_RULES),
            "workloads_count": len(self.names)}

    def unstage(self) -> None:
        """`policy stage clear`: events carry `staged: null` again."""
        self._set_staged(None)
        self._staged = None

    def _set_staged(self, source: str | None) -> None:
        pool, staged_pool = [], []
        for line, verdict, rule in self._pool:
            e = orjson.loads(line)
            srule, staged = _staged_decision(e) if source else (None, None)
            e["staged"] = staged
            pool.append((orjson.dumps(e) + b"\n", verdict, rule))
            staged_pool.append((srule, staged is not None))
        self._pool = pool
        self._staged_pool = staged_pool if source else None

    # -- the Source interface -----------------------------------------------------

    async def status(self) -> dict:
        self._check()
        st = self._staged
        return {"pid": 4242, "uptime_s": round(time.monotonic() - self.started, 1),
                "policy": {"generation": self.generation, "mode": "enforce",
                           "default": "deny", "last_reload": {"result": "applied"},
                           "staged": None if st is None else {
                               "source": st["source"], "sha256": st["sha256"],
                               "since": st["since"], "rules": st["rules_count"],
                               "would_change": self.would_change}}}

    async def staged(self) -> dict | None:
        self._check()
        st = self._staged
        if st is None:
            return None
        hits = self.staged_hits
        rules = [{"name": n, "action": a, "hits": hits[n],
                  "last_hit": "2026-11-27T09:00:00.000000Z" if hits[n] else None}
                 for n, a in STAGED_RULES]
        return {**st, "active_generation": self.generation, "judged": self.judged,
                "verdicts": {}, "would_change": self.would_change, "changes": [],
                "changes_not_listed": 0, "rules": rules,
                "never_hit": [r["name"] for r in rules if not r["hits"]]}

    async def active_policy(self) -> DaemonPolicy:
        from microseg.policy.parse import parse_policy

        self._check()
        self.policy_fetches += 1
        loaded = parse_policy(self.policy_text.encode(), "synthetic.yaml")
        return DaemonPolicy(loaded, loaded.policy, self.generation, self.policy_text)

    async def stats(self) -> dict:
        self._check()
        by_state: dict[str, int] = {}
        for s in self._sessions:
            k = f"{s['protocol']}/{s['state']}"
            by_state[k] = by_state.get(k, 0) + 1
        return {"packets": dict(self.totals),
                "counters": [{"direction": "ingress", "verdict": "allowed", "reason": "rule",
                              "packets": self.new_sessions, "bytes": 0}],
                "sessions": {"entries": len(self._sessions), "capacity": 1 << 20,
                             "by_state": by_state},
                "events": {"published": {"verdict": self.published},
                           "lost": {"ringbuf": 0, "subscriber": 0}}}

    async def policy(self) -> dict:
        self._check()
        return {"generation": 1, "workloads": [{"name": n} for n in self.names],
                "rules": [{"name": n, "action": a, "protocol": p, "hits": self.hits[n],
                           "last_hit": "2026-11-27T09:00:00.000000Z" if self.hits[n] else None}
                          for n, a, p in self.rules]}

    async def sessions(self) -> list[dict]:
        self._check()
        for s in self._sessions:  # traffic keeps flowing
            s["packets"]["orig"] += 10
            s["bytes"]["orig"] += 1000
        return [dict(s) for s in self._sessions]

    async def events(self, last: int) -> AsyncIterator[list[bytes]]:
        self._check()
        pool = self._pool
        if self.rate <= 0:
            yield self._take(0, self.burst)
            while True:
                await asyncio.sleep(3600)
        tick = 0.01
        per_tick = max(1, int(self.rate * tick))
        i = 0
        next_t = time.monotonic()
        while True:
            self._check()
            yield self._take(i, per_tick)
            i = (i + per_tick) % len(pool)
            next_t += tick
            await asyncio.sleep(max(0.0, next_t - time.monotonic()))

    def _take(self, start: int, n: int) -> list[bytes]:
        """n events from the pool, counted as the daemon would count them."""
        pool = self._pool
        out = []
        totals, hits = self.totals, self.hits
        staged_pool, staged_hits = self._staged_pool, self.staged_hits
        for k in range(start, start + n):
            line, verdict, rule = pool[k % len(pool)]
            out.append(line)
            totals[verdict] += 1
            if rule is not None:
                hits[rule] += 1
            if verdict != "denied":
                self.new_sessions += 1
            if staged_pool is not None:  # every synthetic event is a new flow or a denial
                srule, differs = staged_pool[k % len(pool)]
                self.judged += 1
                self.would_change += differs
                if srule is not None:
                    staged_hits[srule] += 1
        self.published += n
        return out

    async def close(self) -> None:
        pass
