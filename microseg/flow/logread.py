"""Read flow logs (exporters/flowlog.py; docs/events.md): the live file, its
rotations `FILE.1` … `FILE.N`, and any of them gzipped — told apart by their
first bytes, not their names. Streaming: a chunk at a time, never a whole
file, so a million lines take the memory of one chunk.

Only lines that may be flows are parsed. The flow log writes every event as
`{"time":…` on one line (microseg/flow/hub.py `ndjson`): a line that starts so
and holds neither `"verdict"` nor `"action"` is an event of another type — a
session's transitions are most of a log — and is counted, not parsed. A line
that does not look like an event at all is parsed to say why it is skipped.
`verdict` events feed the flow aggregate; `workload` events say which labels
and addresses discovered workloads had (`WorkloadLog`).
"""

from __future__ import annotations

import contextlib
import gzip
import os
import stat
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import orjson

from microseg.flow.observed import check_event, ip_version

CHUNK = 1 << 20
MAX_LINE = 1 << 20  # longer is no event (the longest is a workload's, a few KiB)
_GZIP_MAGIC = b"\x1f\x8b"
_EVENT_START = b'{"time":'

# Why a line is skipped (not an event); other event types are not skipped.
NOT_JSON = "not JSON"
NOT_EVENT = "not an event"
BAD_VERDICT = "malformed verdict event"
BAD_WORKLOAD = "malformed workload event"
TOO_LONG = "longer than 1 MiB"
MAX_SEEN_AT = 4096  # addresses noted per workload name (a CIDR workload's clients)
TRUNCATED_GZIP = "truncated gzip stream"


class FlowLogError(Exception):
    """A flow log that cannot be read; the message is one line."""


def _describe(e: OSError) -> str:
    return e.strerror or str(e)


@dataclass
class ReadStats:
    files: int = 0
    lines: int = 0
    verdicts: int = 0     # verdict events yielded
    workloads: int = 0    # workload events yielded
    other: int = 0        # events of other types: sessions, drops, policy, lost
    skipped: Counter = field(default_factory=Counter)  # reason -> lines

    def skipped_line(self) -> str | None:
        """One line with the skipped lines by reason, or None if none was."""
        n = sum(self.skipped.values())
        if not n:
            return None
        parts = ", ".join(f"{c:,} {why}" for why, c in sorted(self.skipped.items(),
                                                              key=lambda kv: (-kv[1], kv[0])))
        return (f"flow logs: skipped {n:,} of {self.lines:,} lines that are not events "
                f"({parts})")


@contextlib.contextmanager
def open_log(path: str) -> Iterator[BinaryIO]:
    """A binary stream of the file: plain, or gzip by its magic bytes.
    FlowLogError if it cannot be read. FIFOs (`<(zcat …)`) are fine."""
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below)
    except OSError as e:
        raise FlowLogError(f"flow log {path}: {_describe(e)}") from None
    with f:
        try:
            if stat.S_ISDIR(os.fstat(f.fileno()).st_mode):
                raise FlowLogError(f"flow log {path}: is a directory")
            head = f.peek(2)[:2]
        except OSError as e:
            raise FlowLogError(f"flow log {path}: {_describe(e)}") from None
        if head == _GZIP_MAGIC:
            with gzip.GzipFile(fileobj=f, mode="rb") as g:
                yield g  # type: ignore[misc]
        else:
            yield f


def check_paths(paths: Iterable[str]) -> list[str]:
    """The paths, each readable (else FlowLogError naming the first that is
    not), without repeats of one file: checked before anything is read, so
    a typo fails at once."""
    out: list[str] = []
    seen: set[tuple[int, int]] = set()
    for p in paths:
        try:
            st = os.stat(p)
        except OSError as e:
            raise FlowLogError(f"flow log {p}: {_describe(e)}") from None
        if stat.S_ISDIR(st.st_mode):
            raise FlowLogError(f"flow log {p}: is a directory")
        if not os.access(p, os.R_OK):
            raise FlowLogError(f"flow log {p}: permission denied")
        ident = (st.st_dev, st.st_ino)
        if stat.S_ISREG(st.st_mode) and ident in seen:
            continue
        seen.add(ident)
        out.append(p)
    return out


def _lines(f, path: str, stats: ReadStats) -> Iterator[bytes]:
    """Lines of a stream, newline stripped, chunk by chunk; a line longer than
    MAX_LINE is skipped (counted) without being held."""
    rest = b""
    overlong = False
    while True:
        try:
            # read1: one read of the file (or of the gzip stream), so a
            # stream cut short loses only its last piece.
            chunk = f.read1(CHUNK)
        except EOFError:  # a gzip file cut short (still being written, or copied early)
            stats.skipped[TRUNCATED_GZIP] += 1
            chunk = b""
        except (OSError, zlib.error) as e:
            raise FlowLogError(f"flow log {path}: {e}") from None
        if not chunk:
            break
        lines = chunk.split(b"\n")
        if overlong:
            if len(lines) == 1:
                continue
            overlong = False
            lines[0] = b""
            stats.lines += 1
            stats.skipped[TOO_LONG] += 1
            del lines[0]
        else:
            lines[0] = rest + lines[0]
        rest = lines.pop()
        if len(rest) > MAX_LINE:
            rest = b""
            overlong = True
        yield from lines
    if overlong:
        stats.lines += 1
        stats.skipped[TOO_LONG] += 1
    elif rest:
        yield rest


def read_events(paths: Iterable[str], stats: ReadStats | None = None) -> Iterator[dict]:
    """`verdict` and `workload` events of these flow logs, in file order, one
    at a time; every other line counted in `stats`."""
    st = stats if stats is not None else ReadStats()
    loads = orjson.loads
    JSONDecodeError = orjson.JSONDecodeError
    for path in paths:
        st.files += 1
        with open_log(path) as f:
            for line in _lines(f, path, st):
                st.lines += 1
                if line[:8] == _EVENT_START and line[-1:] == b"}":
                    # The daemon's own lines: `{"time":"<27>","seq":N,"type":"…`,
                    # the type read in place; any other writer's, by what a
                    # verdict or workload event must contain.
                    j = line.find(b',"type":"', 44, 72) if line[36:44] == b'","seq":' else -1
                    if j > 0 and line[44:j].isdigit():
                        if line[j + 9:j + 11] not in (b"ve", b"wo"):
                            st.other += 1
                            continue
                    elif b'"verdict"' not in line and b'"action"' not in line:
                        st.other += 1
                        continue
                elif not line.strip():
                    continue  # blank lines separate nothing and mean nothing
                try:
                    e = loads(line)
                except JSONDecodeError:
                    st.skipped[NOT_JSON] += 1
                    continue
                if type(e) is not dict or type(e.get("type")) is not str \
                        or type(e.get("time")) is not str:
                    st.skipped[NOT_EVENT] += 1
                    continue
                t = e["type"]
                if t == "verdict":
                    if check_event(e) is not None:
                        st.skipped[BAD_VERDICT] += 1
                        continue
                    st.verdicts += 1
                    yield e
                elif t == "workload":
                    if _check_workload(e) is not None:
                        st.skipped[BAD_WORKLOAD] += 1
                        continue
                    st.workloads += 1
                    yield e
                else:
                    st.other += 1


def _check_workload(e: dict) -> str | None:
    if e.get("action") not in ("added", "removed", "changed"):
        return "unknown action"
    if type(e.get("workload")) is not str or type(e.get("source")) is not str:
        return "no workload or source"
    labels = e.get("labels")
    if type(labels) is not dict or not all(type(k) is str and type(v) is str
                                           for k, v in labels.items()):
        return "labels are not text"
    addrs = e.get("addresses")
    if type(addrs) is not list or not all(type(a) is str for a in addrs):
        return "addresses are not a list"
    return None


class WorkloadLog:
    """What a log's `workload` events say about discovered workloads (not the
    policy file's: those come from the file itself): for every name, its
    labels and host addresses as last reported, removed or not — a flow of a
    container that has gone since is still that container's."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[str, dict[str, str], tuple[str, ...]]] = {}
        self.seen_at: dict[str, set[str]] = {}  # name -> addresses verdicts saw it on

    def saw(self, e: dict) -> None:
        """Note the addresses a verdict event saw its workloads on (a flow
        record keeps only the last one of each side)."""
        for side in (e["src"], e["dst"]):
            name = side["workload"]
            if name is not None:
                at = self.seen_at.get(name)
                if at is None:
                    at = self.seen_at[name] = set()
                if len(at) < MAX_SEEN_AT:
                    at.add(side["ip"])

    def add(self, e: dict) -> None:
        if e["source"] == "static":
            return
        name, t = e["workload"], e["time"]
        prev = self._last.get(name)
        if prev is not None and prev[0] > t:
            return  # an older report (logs read out of order)
        addrs = tuple(a for a in e["addresses"] if "/" not in a and ip_version(a))
        if e["action"] == "removed" and prev is not None:
            addrs = addrs or prev[2]
        self._last[name] = (t, dict(e["labels"]), addrs)

    def __contains__(self, name: str) -> bool:
        return name in self._last

    def workloads(self, flows: Iterable[dict] = (), static: Iterable[str] = ()
                  ) -> list[tuple[str, dict[str, str], list[str]]]:
        """(name, labels, addresses) of every discovered workload, by name:
        those of the workload events, and those only the flows name (no
        labels known; `static` are the names to leave out). An address
        claimed by several goes to whoever had it last (a workload event's
        time, a flow's last_seen; one only seen on it, to the first claim)."""
        holder: dict[str, tuple[str, str]] = {}  # address -> (time, name)
        labels: dict[str, dict[str, str]] = {}
        skip = set(static)
        for name, (t, lab, addrs) in self._last.items():
            if name in skip:
                continue
            labels[name] = lab
            for a in addrs:
                if a not in holder or holder[a] < (t, name):
                    holder[a] = (t, name)
        for name, at in self.seen_at.items():
            if name in skip:
                continue
            labels.setdefault(name, {})
            for a in at:
                holder.setdefault(a, ("", name))
        for r in flows:
            for side in (r["src"], r["dst"]):
                name = side["workload"]
                if name is None or name in skip:
                    continue
                labels.setdefault(name, {})
                key = (r["last_seen"], name)
                a = side["ip"]
                if a not in holder or holder[a] < key:
                    holder[a] = key
        owned: dict[str, list[str]] = {name: [] for name in labels}
        for a, (_t, name) in holder.items():
            owned[name].append(a)
        return [(name, labels[name], sorted(owned[name], key=_address_order))
                for name in sorted(labels)]


def _address_order(a: str) -> tuple[int, str]:
    return (ip_version(a) or 0, a)


__all__ = ["FlowLogError", "ReadStats", "WorkloadLog", "check_paths", "open_log",
           "read_events"]
