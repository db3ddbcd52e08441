"""The flows a staged candidate would judge otherwise, as `stage status`
lists them (microseg/flow/staging.py)."""

from __future__ import annotations

from microseg.flow.staging import StagedChanges


def _event(src: str, dst: str, port: int | None, verdict: str, staged: dict | None,
           count: int = 1, t: str = "2026-12-06T10:00:00.000000Z") -> dict:
    return {"time": t, "type": "verdict", "verdict": verdict, "rule": None,
            "protocol": "tcp", "count": count, "staged": staged,
            "src": {"ip": "10.0.0.1", "port": 40000, "workload": src},
            "dst": {"ip": "10.0.0.2", "port": port, "workload": dst}}


def test_counts_only_what_would_change_denials_first() -> None:
    c = StagedChanges()
    c.observe([
        _event("web", "db", 5432, "audit", {"verdict": "allowed", "rule": "w-d"}, 3),
        _event("web", "db", 5432, "audit", {"verdict": "allowed", "rule": "w-d"}, 2,
               t="2026-12-06T10:00:05.000000Z"),
        _event("client", "db", 5432, "audit", {"verdict": "denied", "rule": None}),
        _event("client", "web", 80, "allowed", None, 7),        # agrees: not a change
        {"time": "x", "type": "session", "staged": None},       # not a verdict
    ])
    rows = c.rows()
    assert [(r["from"], r["to"], r["staged_verdict"], r["count"]) for r in rows] == [
        ("client", "db", "denied", 1), ("web", "db", "allowed", 5)]
    assert rows[1]["first_seen"] < rows[1]["last_seen"]
    assert c.overflow == 0


def test_bounded_but_every_change_counted() -> None:
    c = StagedChanges(capacity=2)
    c.observe(_event(f"w{i}", "db", 5432, "audit", {"verdict": "denied", "rule": None}, 2)
              for i in range(5))
    assert len(c.rows()) == 2 and c.overflow == 6
    c.clear()
    assert c.rows() == [] and c.overflow == 0
