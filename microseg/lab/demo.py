"""`microseg demo`: a microsegmented lab, live.

Five workloads in network namespaces on one bridge (client, web, api, db
and a rogue), servers inside them, traffic generators producing a steady mix
of allowed, denied and audited flows over TCP, UDP and ICMP, v4 and v6; a
daemon attached to them by glob under a demo policy written where it can be
edited; then `microseg top`. Without a terminal it runs for --duration
seconds and prints what it saw. Whatever happens — q, Ctrl-C, SIGTERM — it
removes everything it made, and it clears what a crashed run left first.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from microseg.control.client import DEFAULT_SOCKET, Client, DaemonError
from microseg.lab import DEMO_POLICY
from microseg.lab.topology import Lab, WorkloadSpec, wait_for

PREFIX = "msd"
PIN_DIR = "/sys/fs/bpf/microseg-demo"
STATE_DIR = Path("/run/microseg-demo")      # pidfile, socket
DEFAULT_POLICY = Path(DEMO_POLICY)

WORKLOADS = [WorkloadSpec("client", 10, {"role": "client"}),
             WorkloadSpec("web", 20, {"app": "shop", "tier": "web"}),
             WorkloadSpec("api", 30, {"app": "shop", "tier": "api"}),
             WorkloadSpec("db", 40, {"app": "shop", "tier": "db"}),
             WorkloadSpec("rogue", 66, {"role": "unknown"})]
SERVERS = {"web": {"tcp": (80, 443), "udp": (53,)}, "api": {"tcp": (8080,)},
           "db": {"tcp": (5432, 22)}}

POLICY = """\
# The microseg demo policy. Edit me: the daemon applies every save within
# milliseconds (watch the header of `microseg top`, or `microseg watch`).
# Try: allow the rogue to reach the db, deny ICMP, or set `mode: audit`.
version: 1
mode: enforce          # enforce | audit
default: deny          # what happens when no rule matches
workloads:
  client:
    labels: {{role: client}}
    addresses: [{client4}, "{client6}"]
  web:
    labels: {{app: shop, tier: web}}
    addresses: [{web4}, "{web6}"]
  api:
    labels: {{app: shop, tier: api}}
    addresses: [{api4}, "{api6}"]
    mode: audit        # traffic TO api is never dropped, only reported
  db:
    labels: {{app: shop, tier: db}}
    addresses: [{db4}, "{db6}"]
  rogue:
    addresses: [{rogue4}, "{rogue6}"]
rules:
  - name: client-to-web
    from: {{labels: {{role: client}}}}
    to: {{labels: {{tier: web}}}}
    protocol: tcp
    ports: [80, 443]
    action: allow
  - name: web-to-api
    from: {{workload: web}}
    to: {{workload: api}}
    protocol: tcp
    ports: [8080]
    action: allow
  - name: api-to-db
    from: {{workload: api}}
    to: {{workload: db}}
    protocol: tcp
    ports: [5432]
    action: allow
  - name: dns
    from: any
    to: {{workload: web}}
    protocol: udp
    ports: [53]
    action: allow
  - name: no-ssh-to-db
    from: any
    to: {{workload: db}}
    protocol: tcp
    ports: [22]
    action: deny
  - name: ping-inside
    from: {{cidr: {net4}}}
    to: {{cidr: {net4}}}
    protocol: icmp
    action: allow
  - name: ping6-inside
    from: {{cidr: "{net6}"}}
    to: {{cidr: "{net6}"}}
    protocol: icmpv6
    action: allow
"""


# `microseg demo --learn`: the same workloads, no rules, audit mode — nothing
# is dropped and every flow is observed, to learn a policy from
# (docs/policy.md "Policy lifecycle").
LEARN_HEADER = """\
# The microseg demo, learning: audit mode, no rules. Nothing is dropped;
# every flow is a verdict "audit". Learn a policy from what runs:
#   microseg policy suggest -o /tmp/microseg-demo/suggested.yaml
#   microseg policy stage /tmp/microseg-demo/suggested.yaml
#   microseg policy stage status
#   microseg policy stage promote
"""


def policy_text(lab: Lab, learn: bool = False) -> str:
    addrs = {f"{w.name}4": lab.ipv4(w.name) for w in WORKLOADS}
    addrs.update({f"{w.name}6": lab.ipv6(w.name) for w in WORKLOADS})
    text = POLICY.format(net4=str(lab.net4), net6=str(lab.net6), **addrs)
    if not learn:
        return text
    body = text[text.index("version: 1"):text.index("rules:\n")]
    body = body.replace("mode: enforce          # enforce | audit",
                        "mode: audit            # observe: nothing is dropped")
    body = body.replace("    mode: audit        # traffic TO api is never dropped, only reported\n",
                        "")
    return LEARN_HEADER + body + "rules: []              # to be learned\n"


def traffic(lab: Lab) -> dict[str, list[str]]:
    """Per source workload, the targets of its generator (PROTO,HOST,PORT,WEIGHT):
    mostly allowed flows, with denied attempts and audited ones mixed in."""
    ip4, ip6 = lab.ipv4, lab.ipv6
    return {
        "client": [f"tcp,{ip4('web')},80,4", f"tcp,{ip6('web')},443,2",
                   f"udp,{ip4('web')},53,2", f"icmp,{ip4('db')},,2",
                   f"tcp,{ip4('db')},22,1",        # denied: no-ssh-to-db
                   f"tcp,{ip4('api')},8080,1"],    # audit: api is in audit mode
        "web": [f"tcp,{ip4('api')},8080,4", f"tcp,{ip6('api')},8080,1",
                f"icmp,{ip6('api')},,2"],
        "api": [f"tcp,{ip4('db')},5432,4", f"tcp,{ip6('db')},5432,1",
                f"udp,{ip6('web')},53,1", f"icmp,{ip4('web')},,1"],
        "rogue": [f"tcp,{ip4('db')},5432,2",       # denied: default
                  f"tcp,{ip6('web')},80,1",        # denied: default
                  f"tcp,{ip4('db')},22,1",         # denied: no-ssh-to-db
                  f"tcp,{ip4('api')},8080,1"],     # audit
    }


class DaemonLog:
    """A demo's daemon process: its log and pidfile in the state directory,
    so a crashed demo's daemon is found and stopped by the next run."""

    def __init__(self, state: Path, name: str) -> None:
        self.log_path = state / f"{name}.log"
        self.pidfile = state / f"{name}.pid"
        self.proc: subprocess.Popen | None = None
        self.socket = ""
        self._log = None

    def clear_stale(self) -> None:
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            pid = int(self.pidfile.read_text())
            if Path(f"/proc/{pid}/cmdline").read_bytes().find(b"microseg") >= 0:
                os.kill(pid, signal.SIGTERM)
                wait_for(lambda: not Path(f"/proc/{pid}").exists(), timeout=10)
        self.pidfile.unlink(missing_ok=True)

    def start(self, argv: list[str], socket_path: str) -> None:
        Path(socket_path).parent.mkdir(parents=True, exist_ok=True)
        self.socket = socket_path
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=self._log,
                                     start_new_session=True)
        self.pidfile.write_text(str(self.proc.pid))

    def wait_ready(self, timeout: float = 60) -> None:
        if not wait_for(self._ready, timeout=timeout, interval=0.1):
            raise RuntimeError(f"the daemon did not start; its log:\n{self.log_tail()}")

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited ({self.proc.returncode}); its log:\n"
                               f"{self.log_tail()}")
        try:
            return bool(asyncio.run(_get(self.socket, "/v1/status")).get("ready"))
        except (DaemonError, OSError):
            return False

    def log_tail(self) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-15:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM (it detaches and unpins), SIGKILL after 20 s. Never raises."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        with contextlib.suppress(Exception):
            if self._log is not None:
                self._log.close()
        self.pidfile.unlink(missing_ok=True)


class Demo:
    def __init__(self, policy_path: Path, socket_path: str | None, metrics: str,
                 learn: bool = False) -> None:
        self.lab = Lab(WORKLOADS, prefix=PREFIX)
        self.learn = learn
        self.policy_path = policy_path
        self.socket = socket_path  # chosen in up(), once a crashed demo is gone
        self.metrics = metrics
        self.daemon = DaemonLog(STATE_DIR, "daemon")

    # -- up and down ------------------------------------------------------------

    def clear_stale(self) -> None:
        """What a crashed demo left: its daemon, its pins, its lab."""
        self.daemon.clear_stale()
        self.lab.down()
        shutil.rmtree(PIN_DIR, ignore_errors=True)

    def up(self, say) -> None:
        self.clear_stale()
        self.socket = self.socket or demo_socket()
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        self.policy_path.parent.mkdir(parents=True, exist_ok=True)
        self.policy_path.write_text(policy_text(self.lab, self.learn))
        say(f"lab: {len(WORKLOADS)} workloads in namespaces {PREFIX}-*, on bridge "
            f"{self.lab.bridge}")
        self.lab.up()
        for name, servers in SERVERS.items():
            self.lab.serve(name, **servers)
        self.daemon.start(
            [sys.executable, "-m", "microseg", "run", "-i", self.lab.glob, "--policy",
             str(self.policy_path), "--socket", self.socket, "--pin-dir", PIN_DIR,
             "--metrics", self.metrics, "--flow-log", str(STATE_DIR / "flow.log")],
            self.socket)
        self.daemon.wait_ready()
        say(f"daemon: attached to {self.lab.glob}, socket {self.socket}")
        for source, targets in traffic(self.lab).items():
            self.lab.spawn(source, [sys.executable, "-m", "microseg.lab.traffic", "mix",
                                    *targets, "--interval", "0.25"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        say("traffic: client, web, api and rogue generating allowed, denied and audited "
            "flows")

    def down(self) -> None:
        """Everything goes: traffic, servers, the daemon (it detaches and
        unpins), the lab. Never raises."""
        with contextlib.suppress(Exception):
            self.lab.down()  # kills what runs inside first
        self.daemon.stop()
        shutil.rmtree(PIN_DIR, ignore_errors=True)


async def _get(sock: str, path: str) -> dict:
    async with Client(sock, timeout=5) as c:
        return await c.get(path)


async def _count_verdicts(sock: str, seconds: float, stop: asyncio.Event) -> Counter:
    """(verdict, rule) of every verdict event for `seconds`."""
    counts: Counter[tuple[str, str]] = Counter()

    async def consume() -> None:
        async with Client(sock, timeout=None) as c:
            async for e in c.stream("/v1/events", type="verdict"):
                counts[(e["verdict"], e["rule"] or "default")] += 1

    task = asyncio.create_task(consume())
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, DaemonError):
        await task
    return counts


def summary(counts: Counter, seconds: float) -> str:
    total = sum(counts.values())
    by_verdict = Counter()
    for (v, _), n in counts.items():
        by_verdict[v] += n
    lines = [f"microseg demo: {seconds:.0f} s, {total:,} verdicts: " + ", ".join(
        f"{v} {by_verdict[v]:,}" for v in ("allowed", "denied", "audit") if by_verdict[v])]
    lines.append(f"  {'verdict':8s} {'rule':16s} {'count':>7s}")
    for (v, rule), n in sorted(counts.items(), key=lambda x: (x[0][0], -x[1])):
        lines.append(f"  {v:8s} {rule:16s} {n:>7,}")
    return "\n".join(lines)


def demo_socket() -> str:
    """The default socket, so that plain `microseg watch` finds the demo —
    unless a daemon already serves it (a real one on this host): then the
    demo's own, leaving that one alone."""
    with socket.socket(socket.AF_UNIX) as s:
        try:
            s.connect(DEFAULT_SOCKET)
        except OSError:
            return DEFAULT_SOCKET
    return str(STATE_DIR / "microseg.sock")


def command_line(sock: str) -> str:
    """How to run microseg from another terminal, as this one was run (the
    virtualenv need not be on PATH)."""
    exe = Path(sys.executable).with_name("microseg")
    cmd = str(exe) if exe.exists() else f"{sys.executable} -m microseg"
    if shutil.which("microseg") == str(exe):
        cmd = "microseg"
    return cmd if sock == DEFAULT_SOCKET else f"MICROSEG_SOCKET={sock} {cmd}"


def free_metrics(addr: str) -> str:
    """The demo's metrics address, or any free port when it is taken."""
    host, _, port = addr.rpartition(":")
    with socket.socket() as s:
        try:
            s.bind((host, int(port)))
        except OSError:
            return f"{host}:0"
    return addr


class DemoLab(Protocol):
    """What run() needs of a demo: Demo, or demo_hosts.HostsDemo."""

    socket: str | None

    def up(self, say: Callable[[str], None]) -> None: ...

    def down(self) -> None: ...


def run(duration: float | None, policy_path: Path, socket_path: str | None,
        interactive: bool | None = None, learn: bool = False,
        demo: DemoLab | None = None) -> int:
    """demo: another demo than the one-host lab (`--hosts 2`)."""
    if os.geteuid() != 0:
        print("microseg demo: needs root (network namespaces, BPF)", file=sys.stderr)
        return 3
    interactive = sys.stdout.isatty() and sys.stdin.isatty() if interactive is None \
        else interactive
    hosts = 1 if demo is None else 2
    if demo is None:
        demo = Demo(policy_path, socket_path, free_metrics("127.0.0.1:9750"), learn)

    def say(msg: str) -> None:
        print(f"microseg demo: {msg}", flush=True)

    stop = asyncio.Event()
    loop_holder: list[asyncio.AbstractEventLoop] = []

    def on_signal(signum: int, frame: object) -> None:
        # Ctrl-C and SIGTERM end the demo through the same clean-up as q.
        if loop_holder:
            loop_holder[0].call_soon_threadsafe(stop.set)
        else:
            raise KeyboardInterrupt

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        demo.up(say)
        if learn:
            say(f"policy: {policy_path} — audit mode, no rules: every flow is observed")
            say(f"learn one: {command_line(demo.socket)} policy suggest -o "
                f"{policy_path.parent / 'suggested.yaml'}; then `policy stage` it, watch "
                "`top`, `policy stage promote`")
        elif hosts == 1:
            say(f"policy: {policy_path} — edit it and watch the verdicts change")
        assert demo.socket is not None
        say(f"in another terminal: {command_line(demo.socket)} watch")
        if hosts == 2:
            say(f"and: {command_line(demo.socket)} nodes; {command_line(demo.socket)} "
                "workloads (host b's arrive with source etcd)")
        if interactive and duration is None:
            from microseg.tui.app import TopApp
            from microseg.tui.source import DaemonSource

            app = TopApp(DaemonSource(demo.socket))
            signal.signal(signal.SIGTERM, lambda *_: app.exit())
            app.run()
            return 0
        seconds = duration if duration is not None else 30.0
        say(f"running for {seconds:.0f} s (no terminal: a summary follows)")

        async def main() -> Counter:
            loop_holder.append(asyncio.get_running_loop())
            return await _count_verdicts(demo.socket, seconds, stop)

        t0 = time.monotonic()
        counts = asyncio.run(main())
        print(summary(counts, time.monotonic() - t0), flush=True)
        return 0
    except KeyboardInterrupt:
        return 130
    except RuntimeError as e:
        print(f"microseg demo: {e}", file=sys.stderr)
        return 1
    finally:
        say("cleaning up")
        demo.down()
        for s, h in old.items():
            signal.signal(s, h)
        say("done: no namespace, link, pin or process left")
