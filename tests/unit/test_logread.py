"""Reading flow logs (microseg/flow/logread.py): the live file, its rotations,
gzip told by its first bytes, junk lines counted by reason, a clear error for
a file that cannot be read, and a million lines in flat memory."""

from __future__ import annotations

import gzip
import os
import tracemalloc
from pathlib import Path

import orjson
import pytest

from microseg.flow.logread import (
    BAD_VERDICT,
    NOT_EVENT,
    NOT_JSON,
    TOO_LONG,
    TRUNCATED_GZIP,
    FlowLogError,
    ReadStats,
    WorkloadLog,
    check_paths,
    read_events,
)
from microseg.flow.observed import FlowAggregate

from .test_observed import verdict_event


def session_event(i: int) -> dict:
    e = verdict_event("10.0.0.1", "web", "10.0.0.9", "db", sport=30000 + i)
    for k in ("verdict", "reason", "tcp_flags", "count", "staged"):
        del e[k]
    e.update(type="session", state="new", prev_state=None, packets=None, bytes=None,
             duration_s=None)
    return e


def workload_event(name: str, labels: dict, addresses: list[str], action: str = "added",
                   time: str = "2026-11-27T09:00:00.000000Z", source: str = "docker") -> dict:
    return {"time": time, "seq": 1, "type": "workload", "action": action, "workload": name,
            "source": source, "labels": labels, "addresses": addresses}


def lines(*events: dict) -> bytes:
    return b"".join(orjson.dumps(e) + b"\n" for e in events)


def read(paths: list[Path]) -> tuple[list[dict], ReadStats]:
    st = ReadStats()
    return list(read_events([str(p) for p in paths], st)), st


def test_rotated_and_gzipped_files_are_read_whatever_their_names(tmp_path: Path) -> None:
    live, one, two, three = (tmp_path / n for n in ("flows.json", "flows.json.1",
                                                    "flows.json.2", "flows.json.3.gz"))
    live.write_bytes(lines(verdict_event("10.0.0.1", "a", "10.0.0.2", "b", port=1),
                           session_event(1)))
    one.write_bytes(lines(verdict_event("10.0.0.1", "a", "10.0.0.2", "b", port=2)))
    # gzip without .gz in the name, and a plain file named .gz.
    two.write_bytes(gzip.compress(lines(verdict_event("10.0.0.1", "a", "10.0.0.2", "b",
                                                      port=3))))
    three.write_bytes(lines(verdict_event("10.0.0.1", "a", "10.0.0.2", "b", port=4)))
    # A gzip of several members (`cat a.gz b.gz`) is one stream.
    four = tmp_path / "flows.json.4"
    four.write_bytes(gzip.compress(lines(verdict_event("10.0.0.1", "a", "10.0.0.2", "b",
                                                       port=5)))
                     + gzip.compress(lines(verdict_event("10.0.0.1", "a", "10.0.0.2", "b",
                                                         port=6))))
    events, st = read([live, one, two, three, four])
    assert [e["dst"]["port"] for e in events] == [1, 2, 3, 4, 5, 6]
    assert (st.files, st.lines, st.verdicts, st.other, sum(st.skipped.values())) == (
        5, 7, 6, 1, 0)


def test_lines_that_are_not_events_are_counted_by_reason(tmp_path: Path) -> None:
    good = verdict_event("10.0.0.1", "a", "10.0.0.2", "b")
    f = tmp_path / "flows.json"
    f.write_bytes(
        lines(good)
        + b"\n   \n"                                      # blank: nothing
        + b"microseg started\n"                           # not JSON
        + b'{"time":"2026-11-27T09:14:03.512907Z","seq":7,"type":"verd\n'  # cut short
        + b"[1, 2]\n" + b'{"type": "verdict"}\n'
        + b'{"time": "x", "verdict": "allowed"}\n'     # not events
        + lines({**good, "count": "many"}, {**good, "src": {"ip": "nowhere"}})  # malformed
        + lines(session_event(1), {"time": "t", "seq": 9, "type": "lost", "count": 1,
                                   "source": "ringbuf"})
        + orjson.dumps(good).replace(b'{"time":', b'{ "time" :')  # another writer's spacing
        + b"\r\n"
        + lines({**good, "type": "drop", "verdict": "dropped", "reason": "state"}))
    events, st = read([f])
    assert len(events) == 2 and st.verdicts == 2
    assert st.skipped == {NOT_JSON: 2, NOT_EVENT: 3, BAD_VERDICT: 2}
    assert st.other == 3  # session, lost, drop: events, just not flows
    assert st.lines == 14
    assert st.skipped_line() == ("flow logs: skipped 7 of 14 lines that are not events "
                                 "(3 not an event, 2 malformed verdict event, 2 not JSON)")


def test_a_gzip_cut_short_and_an_endless_line_are_skipped(tmp_path: Path) -> None:
    body = lines(*(verdict_event("10.0.0.1", "a", "10.0.0.2", "b", port=p)
                   for p in range(1, 2001)))
    cut = tmp_path / "cut.gz"
    cut.write_bytes(gzip.compress(body)[:-20])  # still being written when copied
    events, st = read([cut])
    assert 1990 < len(events) < 2000 and st.skipped[TRUNCATED_GZIP] == 1
    long = tmp_path / "long"
    long.write_bytes(b"x" * (3 << 20) + b"\n" + lines(verdict_event("10.0.0.1", "a",
                                                                    "10.0.0.2", "b"))
                     + b"y" * (2 << 20))
    events, st = read([long])
    assert len(events) == 1 and st.skipped[TOO_LONG] == 2


def test_a_file_that_cannot_be_read_is_one_clear_line(tmp_path: Path) -> None:
    with pytest.raises(FlowLogError, match=r"^flow log .*/missing: No such file or directory$"):
        check_paths([str(tmp_path / "missing")])
    with pytest.raises(FlowLogError, match="is a directory"):
        check_paths([str(tmp_path)])
    bad = tmp_path / "bad.gz"
    bad.write_bytes(b"\x1f\x8b" + os.urandom(64))
    with pytest.raises(FlowLogError, match=f"^flow log {bad}: "):
        read([bad])
    one = tmp_path / "flows.json"
    one.write_bytes(b"")
    link = tmp_path / "same"
    link.symlink_to(one)
    assert check_paths([str(one), str(link), str(one)]) == [str(one)]  # each file once


def test_workload_events_name_discovered_workloads(tmp_path: Path) -> None:
    f = tmp_path / "flows.json"
    f.write_bytes(lines(
        workload_event("web-1", {"tier": "web"}, ["172.30.0.4", "fd00:30::4"]),
        workload_event("static-db", {"tier": "db"}, ["10.0.0.0/24"], source="static"),
        workload_event("web-1", {"tier": "web"}, ["172.30.0.4", "fd00:30::4"], "removed",
                       time="2026-11-27T10:00:00.000000Z"),
        workload_event("web-2", {"tier": "web"}, ["172.30.0.4"],  # got web-1's address
                       time="2026-11-27T11:00:00.000000Z"),
        {**workload_event("x", {}, []), "labels": {"a": 1}}))  # malformed
    wl = WorkloadLog()
    events, st = read([f])
    for e in events:
        wl.add(e)
    assert st.workloads == 4 and st.skipped == {"malformed workload event": 1}
    flow = {"src": {"workload": "api", "ip": "172.30.0.9"},
            "dst": {"workload": "static-db", "ip": "10.0.0.5"}, "last_seen": "2026"}
    assert wl.workloads([flow], static={"static-db"}) == [
        ("api", {}, ["172.30.0.9"]),                  # named by a flow only
        ("web-1", {"tier": "web"}, ["fd00:30::4"]),   # gone, labels kept
        ("web-2", {"tier": "web"}, ["172.30.0.4"]),   # the address's last holder
    ]


def test_a_large_log_streams_in_flat_memory(tmp_path: Path) -> None:
    """400,000 lines (144 MB; a quarter of them verdicts, as in a log of
    TCP sessions) read into the aggregate: the reader holds a chunk, never
    the file — peak Python allocation (tracemalloc) a tenth of the file.
    `make bench` reads 1,000,000 lines (peak RSS in the README)."""
    block = []
    for i in range(10_000):
        if i % 4 == 0:
            block.append(verdict_event(f"10.0.{i % 40}.1", f"w{i % 40}", f"10.1.{i % 50}.1",
                                       None, port=80 + i % 7, sport=30000 + i))
        else:
            block.append(session_event(i))
    data = lines(*block)
    f = tmp_path / "flows.json"
    with f.open("wb") as out:
        for _ in range(40):
            out.write(data)
    assert f.stat().st_size > 120 << 20
    st = ReadStats()
    agg = FlowAggregate()
    tracemalloc.start()
    try:
        for e in read_events([str(f)], st):
            agg.add(e)
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (st.lines, st.verdicts, st.other) == (400_000, 100_000, 300_000)
    assert len(agg) == len({(i % 40, i % 50, i % 7) for i in range(0, 10_000, 4)})
    assert sum(r["sessions"] for r in agg.records()) == 100_000
    assert peak < 16 << 20, f"peak {peak / 1e6:.1f} MB"
