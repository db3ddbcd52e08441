"""Discovery: a container's start → its labels enforced, and the first-packet
race (docs/policy.md "Discovery").

A private dockerd (microseg.lab.dockerd) with a user network and a web
container; a real `microseg run -i 'veth*'` following it, its flow log on.

- **start → enforced**: containers started one after another; for each, the
  engine's own time (`docker events`, TimeNano) of the start's first event —
  the container joining its network, some 0.4 s before `start` — to the
  daemon's `workload` `added` event, which is published once the generation
  that holds the container is active; and the same relative to `start`
  (negative: enforced before the engine said it started).
- **first-packet race**: containers whose command connects to the web
  container at its first instant (`nc`, 5 s connect timeout). Lost: the
  flow log holds a denial from the container's address before its first
  allowed verdict. For each: whether it got its page, and how long from the
  engine's start to the first allowed verdict.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import orjson

from microseg.lab.dockerd import IMAGE, NETWORKS, Engine, missing_tools
from microseg.lab.topology import wait_for

from .policy import _status

PIN_DIR = "/sys/fs/bpf/msbench-discovery"
NETWORK, SUBNET4, SUBNET6 = NETWORKS[0]
WEB_IP = "10.240.0.250"

POLICY = """\
version: 1
default: deny
discover:
  docker: {{socket: {sock}}}
rules:
  - {{name: clients-to-web, from: {{labels: {{role: client}}}}, to: {{labels: {{tier: web}}}},
     protocol: tcp, ports: [80], action: allow}}
"""


def _ts(text: str) -> float:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


def _summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {"n": len(values), "p50_ms": round(_pct(values, 0.5) * 1000, 1),
            "p99_ms": round(_pct(values, 0.99) * 1000, 1),
            "max_ms": round(max(values) * 1000, 1)}


@contextlib.contextmanager
def _engine() -> Iterator[Engine]:
    engine = Engine()
    try:
        engine.start()
        engine.build_image()
        engine.create_network(NETWORK, SUBNET4, SUBNET6)
        yield engine
    finally:
        problems = engine.teardown()
        if problems:
            print(f"bench discovery: the private engine left {problems}", file=sys.stderr)


@contextlib.contextmanager
def _daemon(engine: Engine, work: str) -> Iterator[str]:
    """A daemon on veth*; yields its flow log's path."""
    policy = os.path.join(work, "policy.yaml")
    with open(policy, "w") as f:
        f.write(POLICY.format(sock=engine.sock))
    sock, flow = os.path.join(work, "ms.sock"), os.path.join(work, "flow.ndjson")
    proc = subprocess.Popen(
        [sys.executable, "-m", "microseg", "run", "--metrics", "off", "-i", "veth*",
         "--policy", policy, "--socket", sock, "--pin-dir", PIN_DIR, "--flow-log", flow],
        stdout=subprocess.DEVNULL, stderr=open(os.path.join(work, "daemon.log"), "wb"))  # noqa: SIM115
    try:
        if not wait_for(lambda: os.path.exists(sock) and _status(sock).get("ready"),
                        timeout=120):
            raise RuntimeError("bench discovery: the daemon did not become ready")
        yield flow
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def _recorder(engine: Engine) -> subprocess.Popen:
    assert engine.cli is not None
    proc = subprocess.Popen(
        [engine.cli, "-H", f"unix://{engine.sock}", "events",
         "--filter", "event=start", "--filter", "event=connect",
         "--format", "{{.TimeNano}} {{.Type}} {{.Actor.ID}} {{.Actor.Attributes.name}} "
                     "{{.Actor.Attributes.container}}"],
        stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)  # subscribed
    return proc


def _engine_times(proc: subprocess.Popen) -> tuple[dict[str, float], dict[str, float]]:
    """By container name: the engine's `start`, and its first network `connect`
    (the first event of a start: the container joins its network, then its
    task is created and its process runs)."""
    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    started: dict[str, float] = {}
    name_of: dict[str, str] = {}
    joined: dict[str, float] = {}  # by container id
    for line in out.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        at = int(parts[0]) / 1e9
        if parts[1] == "container":
            started[parts[3]], name_of[parts[2]] = at, parts[3]
        elif len(parts) == 5:
            joined.setdefault(parts[4], at)
    connected = {name_of[cid]: at for cid, at in joined.items() if cid in name_of}
    return started, connected


def measure(starts: int = 50, racers: int = 50) -> dict:
    missing = list(missing_tools())
    if missing:
        raise RuntimeError("bench discovery: needs " + ", ".join(missing))
    work = tempfile.mkdtemp(prefix="msbench-disc-")
    try:
        with _engine() as engine:
            engine.docker("run", "-d", "--init", "--network", NETWORK, "--ip", WEB_IP,
                          "--name", "web", "--label", "tier=web", IMAGE, "sh", "-c",
                          "echo web > /tmp/index.html && exec httpd -f -p 80 -h /tmp")
            with _daemon(engine, work) as flow:
                recorder = _recorder(engine)
                for i in range(starts):
                    engine.docker("run", "-d", "--init", "--network", NETWORK, "--name",
                                  f"start-{i}", "--label", "role=idle", IMAGE, "sleep", "600")
                request = 'printf "GET / HTTP/1.0\\r\\n\\r\\n"'
                for i in range(racers):
                    engine.docker("run", "-d", "--network", NETWORK, "--name", f"race-{i}",
                                  "--label", "role=client", IMAGE, "sh", "-c",
                                  f"{request} | nc -w 5 {WEB_IP} 80 | grep -q web")
                codes = {f"race-{i}": int(engine.docker("wait", f"race-{i}"))
                         for i in range(racers)}
                time.sleep(1.5)  # the last aggregated denials are reported
                started, connected = _engine_times(recorder)
            with open(flow, "rb") as f:
                events = [orjson.loads(line) for line in f]
            engine.remove_containers()
    finally:
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(PIN_DIR)

    added = {e["workload"]: e for e in events
             if e["type"] == "workload" and e["action"] == "added"}
    removals = [(e["workload"], _ts(e["time"]), set(e["addresses"])) for e in events
                if e["type"] == "workload" and e["action"] == "removed"]
    removed = {name: at for name, at, _ in removals}
    names = [f"start-{i}" for i in range(starts)]
    latency = [_ts(added[n]["time"]) - connected[n] for n in names
               if n in added and n in connected]
    before_start = [_ts(added[n]["time"]) - started[n] for n in names
                    if n in added and n in started]
    lost, waits_lost, waits_won = 0, [], []
    for i in range(racers):
        name = f"race-{i}"
        if name not in added or name not in started:
            continue
        # Racers run one after another and the engine hands a stopped one's
        # address to the next: only packets of this one's lifetime count.
        addresses = set(added[name]["addresses"])
        # From just before its start (its process may send a few ms before
        # the engine says so), and after the last holder of its address went.
        begin = max([started[name] - 0.1] + [at for other, at, held in removals
                                             if other != name and held & addresses
                                             and at <= started[name]])
        end = removed.get(name, float("inf"))
        mine = [e for e in events if e["type"] == "verdict" and e["src"]["ip"] in addresses
                and e["dst"]["ip"] == WEB_IP and begin <= _ts(e["time"]) <= end]
        allowed = [_ts(e["time"]) for e in mine if e["verdict"] == "allowed"]
        denied = [_ts(e["time"]) for e in mine if e["verdict"] == "denied"]
        first_allowed = min(allowed) if allowed else None
        raced = bool(denied) and (first_allowed is None or min(denied) < first_allowed)
        lost += raced
        if first_allowed is not None:
            (waits_lost if raced else waits_won).append(first_allowed - started[name])
    return {"starts": starts, "start_to_enforced": _summary(latency),
            "relative_to_start_event": _summary(before_start),
            "missing": starts - len(latency),
            "racers": racers, "race_lost": lost,
            "race_served": sum(1 for c in codes.values() if c == 0),
            "wait_when_lost": _summary(waits_lost), "wait_when_won": _summary(waits_won)}


if __name__ == "__main__":
    print(orjson.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 10,
                               int(sys.argv[2]) if len(sys.argv) > 2 else 10),
                       option=orjson.OPT_INDENT_2).decode())
