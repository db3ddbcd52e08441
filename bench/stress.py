"""Stress: a real packet generator floods a lab link through the firewall.

Namespaces on one bridge, as in bench/traffic.py, but all of them the lab's
own (see Topology for why): `cli` (allowed to send UDP to `srv`'s port),
`srv` (the receiver), `bad` (denied by the same default-deny policy) and
`hub`, which holds the bridge and the host-side veths, where microseg
attaches. The generator is trafgen (netsniff-ng): it writes 64-byte UDP
frames (60 bytes without the FCS) into an AF_PACKET TX ring on a sender's
`eth0`, bypassing the qdisc; they cross the veth to its host end, where
microseg's TC ingress program judges them, are bridged to `srv`'s host end
(microseg's TC egress) and cross into `srv`. No socket send path, no pacing.

The configurations, interleaved and their order rotated every round:
- no firewall;
- microseg (`microseg run` with bench/traffic.py's policy, denials
  aggregated per flow over `--event-window` 1 s, docs/events.md);
- nftables with conntrack, the same policy as one rule over a set
  (bench/traffic.py's ruleset, on this bridge only).
Each with two floods: allowed established traffic (one UDP flow `cli` →
`srv`, made a session first by one datagram and its answer, then flooded
from the same source port) and a denied flood (the same frames from `bad`).
Each round also measures the generator alone: a veth whose host end is on
no bridge, whose frames the host drops at once — the ceiling of what one
CPU can offer here, whatever the path behind.

Counted by the kernel's interface counters over `seconds`, after `warmup`:
- offered: frames the sender's `eth0` transmitted or dropped, per second;
- taken: frames that entered the host (rx of the sender's host-side veth),
  i.e. that reached the firewall's ingress hook;
- delivered: frames that crossed into `srv` (tx of its host-side veth).
For allowed traffic, the figure compared with no firewall is delivered. For
the denied flood it is taken — the rate at which the firewall judges and
drops the flood, beside the rate at which the same path carries it with no
firewall — and delivered must stay ~0 (checked: a firewall that let the
flood through would make for flattering numbers). Both are compared per
second of the generator's own CPU time (below), and reported per second too.

The generator is pinned to one CPU (the last, as bench/traffic.py's tools;
the daemon and the rest keep the other). On veth there is no device queue
and no interrupt: a frame's transmit puts it on the peer's backlog on the
same CPU, and the softirq that takes it through TC, the bridge and into
`srv` runs there too, right after the send. So the generator and the whole
path share that CPU: offered is not a fixed rate but what one CPU sustains
with the path included; it falls when the path costs more, which is why
delivered is compared with no firewall's. On a shared VM it also follows
how much of that CPU the generator gets (others' programs pinned there
took from 5 to 60 % of it in one run), which made per-second figures of
one configuration vary by half between rounds. The generator's CPU time
(utime + stime of trafgen's processes, /proc/PID/stat) holds its sends and
the path they run inline (with tick-based accounting a tick in a softirq
is charged to the task it interrupted), so packets per second of that time
— what a CPU of its own would carry — is what is compared, and ns per
packet is its inverse. Also kept: the CPU's split (/proc/stat: user —
trafgen and anyone else's programs on that CPU; system — the sends;
softirq — the path) and the kernel's ns per packet taken (system + irq +
softirq time of that CPU over packets). microseg's own share is
the kernel's BPF run-time statistics (`run_time_ns` / `run_cnt` of the
programs on the lab's veths, docs/performance.md): ns per packet taken,
both hooks together, in a second window of the same flood (they cost each
program run two clock reads, so the first window has them only as the
daemon itself turns them on). The daemon's events published and lost during the
flood come from its /v1/stats.

The receiver holds a UDP socket on the port and never reads it after the
first answer, so in every configuration the frames end the same way
(dropped at the full socket).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from microseg.kernel import tc
from microseg.lab.topology import kill_all, wait_for

from .traffic import IPERF_PORT, NFT_TABLE, TrivialProgram, nft_ruleset, policy_yaml, summarize

CONFIGS = ("none", "tc_ok", "microseg", "nft")
FLOODS = ("allowed", "denied")
LABELS = {"none": "no firewall",
          "tc_ok": "a TC program returning TC_ACT_OK, where microseg attaches",
          "microseg": "microseg", "nft": "nftables with conntrack"}
FLOOD_LABELS = {"allowed": "allowed, established", "denied": "a denied flood"}
PORT = IPERF_PORT          # the policy's allowed UDP port (bench/traffic.py)
SPORT = 40000              # the established flow's source port
PIN_DIR = "/sys/fs/bpf/microseg-bench-stress"
CPU = (os.cpu_count() or 1) - 1
TARGET = 0.95              # delivered with microseg / with no firewall (docs/performance.md)
TICK_NS = 1e9 / os.sysconf("SC_CLK_TCK")

# The receiver: answers the first datagram (the session's reply), then holds
# the port without reading, until it is killed.
_RESPONDER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
data, peer = s.recvfrom(2048)
s.sendto(data, peer)
time.sleep(3600)
"""
# The client's half of the handshake, from the flow's source port.
_HELLO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("", int(sys.argv[3])))
s.settimeout(0.5)
for _ in range(6):
    s.sendto(b"hello", (sys.argv[1], int(sys.argv[2])))
    try:
        s.recvfrom(2048)
        print("answered")
        break
    except OSError:
        pass
"""


class Topology:
    """The lab, all of it in namespaces of its own: `hub` holds the bridge
    and the host-side veths (what a host is to its containers), `cli`,
    `srv` and `bad` one veth each. Why not bench/traffic.py's Lab, whose
    host side is the host's own namespace: there, whatever the host's
    other users set up for themselves — here, a container engine's
    iptables tables (so conntrack) and `net.bridge.bridge-nf-call-iptables`
    = 1, which sends every bridged packet through them — would be measured
    with every configuration, "no firewall" included (the sysctl is per
    network namespace; in `hub` it is 0, and only the nftables
    configuration turns netfilter on, on this bridge). It also offers what
    bench/traffic.py's helpers need: `ipv4()`, `bridge`."""

    PREFIX = "msbx"
    NAMES = {"cli": 10, "srv": 20, "bad": 30}
    NET = "10.221.0"

    def __init__(self) -> None:
        self.bridge = f"{self.PREFIX}br0"
        self.hub = self.ns("hub")
        self.glob = f"{self.PREFIX}-*"
        self._procs: list[subprocess.Popen] = []

    def ns(self, name: str) -> str:
        return f"{self.PREFIX}-{name}"

    def host_if(self, name: str) -> str:
        return f"{self.PREFIX}gen0" if name == "gen" else f"{self.PREFIX}-{name}"

    def ipv4(self, name: str) -> str:
        return f"{self.NET}.{self.NAMES.get(name, 40)}"

    def up(self) -> None:
        self.down()
        try:
            _ip("netns", "add", self.hub)
            _sysctl(self.hub, "net.ipv6.conf.all.disable_ipv6", "1")
            _sysctl(self.hub, "net.ipv6.conf.default.disable_ipv6", "1")
            _sysctl(self.hub, "net.bridge.bridge-nf-call-iptables", "0")
            _batch(self.hub, [f"link add {self.bridge} type bridge", f"link set {self.bridge} up",
                              "link set lo up"])
            for name in self.NAMES:
                ns, hif = self.ns(name), self.host_if(name)
                _ip("netns", "add", ns)
                _sysctl(ns, "net.ipv6.conf.all.disable_ipv6", "1")
                _sysctl(ns, "net.ipv6.conf.default.disable_ipv6", "1")
                _batch(self.hub, [f"link add {hif} type veth peer name eth0 netns {ns}",
                                  f"link set {hif} master {self.bridge}", f"link set {hif} up"])
                _batch(ns, ["link set lo up", f"addr add {self.ipv4(name)}/24 dev eth0",
                            "link set eth0 up"])
            # The generator's ceiling: a veth whose host end is on no bridge
            # (and outside the daemon's glob): the host drops its frames at
            # once (not addressed to it), so only the generator and the veth
            # cost anything.
            gen = self.ns("gen")
            _ip("netns", "add", gen)
            _sysctl(gen, "net.ipv6.conf.all.disable_ipv6", "1")
            _sysctl(gen, "net.ipv6.conf.default.disable_ipv6", "1")
            _batch(self.hub, [f"link add {self.host_if('gen')} type veth peer name eth0 "
                              f"netns {gen}", f"link set {self.host_if('gen')} up"])
            _batch(gen, ["link set lo up", f"addr add {self.ipv4('gen')}/24 dev eth0",
                         "link set eth0 up"])
        except BaseException:
            self.down()
            raise

    def down(self) -> None:
        """Remove every namespace of the lab and what runs in them; never fails."""
        kill_all(self._procs)
        listed = _ip("netns", "list", check=False).stdout.split()
        for ns in (n for n in listed if n.startswith(f"{self.PREFIX}-")):
            for pid in _ip("netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            _ip("netns", "del", ns, check=False)

    def argv(self, name: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(name), *argv]

    def run(self, name: str, argv: list[str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(name, argv), capture_output=True, text=True,
                              timeout=60)

    def spawn(self, name: str, argv: list[str], **kw) -> subprocess.Popen:
        """A process in a namespace, in its own process group; killed by down()."""
        p = subprocess.Popen(self.argv(name, argv), start_new_session=True, **kw)
        self._procs.append(p)
        return p

    def links(self, name: str) -> dict[str, dict]:
        """Every link of a namespace with its counters, read at once."""
        r = subprocess.run(["ip", "-n", self.ns(name), "-s", "-j", "link", "show"],
                           capture_output=True, text=True, check=True)
        return {x["ifname"]: x for x in json.loads(r.stdout)}


def _ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *argv], capture_output=True, text=True, check=check)


def _batch(ns: str, cmds: list[str]) -> None:
    r = subprocess.run(["ip", "-n", ns, "-batch", "-"], input="\n".join(cmds) + "\n",
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"bench stress: ip -n {ns} -batch: {r.stderr.strip()}")


def _sysctl(ns: str, key: str, value: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}={value}"],
                   capture_output=True, check=True)


def _mac(lab: Topology, name: str) -> str:
    return lab.links(name)["eth0"]["address"]


def trafgen_conf(lab: Topology, src: str, sport: int, cpu: int) -> str:
    """One 60-byte frame (64 on a wire), sent only by the generator's CPU."""
    return (f"cpu({cpu}): {{ eth(da={_mac(lab, 'srv')}, sa={_mac(lab, src)}), "
            f"ipv4(saddr={lab.ipv4(src)}, daddr={lab.ipv4('srv')}, ttl=64), "
            f"udp(sp={sport}, dp={PORT}), fill(0x00, 18) }}\n")


def _counters(lab: Topology, src: str) -> tuple[float, int, int, int]:
    """(time, offered, taken, delivered) so far: the sender's eth0 tx +
    tx dropped, its host end's rx, srv's host end's tx."""
    sender = lab.links(src)["eth0"]["stats64"]["tx"]
    hub = lab.links("hub")  # one reading of both host ends
    return (time.monotonic(), sender["packets"] + sender["dropped"],
            hub[lab.host_if(src)]["stats64"]["rx"]["packets"],
            hub[lab.host_if("srv")]["stats64"]["tx"]["packets"])


def _cpu_ticks(cpu: int) -> dict[str, int]:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:9]]
                return {"user": v[0] + v[1], "system": v[2], "idle": v[3] + v[4],
                        "irq": v[5], "softirq": v[6], "steal": v[7]}
    raise RuntimeError(f"bench stress: cpu{cpu} not in /proc/stat")


def _family(pid: int) -> list[int]:
    """pid and its children (trafgen forks one process per CPU)."""
    kids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError), \
                    open(f"/proc/{d}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.append(int(d))
    return [pid, *kids]


def _process_ticks(pids: list[int]) -> int:
    """utime + stime of these processes, in clock ticks. With tick-based
    accounting (no CONFIG_IRQ_TIME_ACCOUNTING, as on this kernel) a tick
    that lands in a softirq is charged to the task it interrupted too: the
    path the generator's sends run inline is in the generator's time."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total


def _lab_programs(lab: Topology) -> list[int]:
    """Ids of the BPF programs on the lab's host-side veths (both hooks)."""
    ids = []
    for name in lab.NAMES:
        for hook in ("ingress", "egress"):
            r = subprocess.run(["tc", "-n", lab.hub, "-j", "filter", "show", "dev",
                                lab.host_if(name), hook], capture_output=True, text=True)
            for f in json.loads(r.stdout or "[]"):
                prog = f.get("options", {}).get("prog", {})
                if "id" in prog:
                    ids.append(prog["id"])
    return sorted(set(ids))


def _bpf_run_time(ids: list[int]) -> tuple[int, int]:
    """Σ run_time_ns, Σ run_cnt of these programs (kernel run-time stats)."""
    from microseg.kernel import bpfsys

    ns = cnt = 0
    for i in ids:
        fd = bpfsys.prog_fd_by_id(i)
        try:
            info = bpfsys.prog_info(fd)
        finally:
            os.close(fd)
        ns, cnt = ns + info.run_time_ns, cnt + info.run_cnt
    return ns, cnt


def _daemon_stats(sock: str) -> dict:
    import asyncio

    from microseg.control.client import Client

    async def go() -> dict:
        async with Client(sock, timeout=10) as c:
            return await c.get("/v1/stats")

    return asyncio.run(go())


def _bridge_nf(lab: Topology, on: bool) -> None:
    subprocess.run(["ip", "-n", lab.hub, "link", "set", lab.bridge, "type", "bridge",
                    "nf_call_iptables", "1" if on else "0"], check=True, capture_output=True)


class Firewall:
    """One configuration, set up and torn down around each round's floods."""

    def __init__(self, kind: str, lab: Topology, rules: int, work: str) -> None:
        self.kind, self.lab, self.rules, self.work = kind, lab, rules, work
        self.proc: subprocess.Popen | None = None
        self.sock = os.path.join(work, "ms.sock")
        self.trivial: TrivialProgram | None = None

    def __enter__(self) -> Firewall:
        try:
            if self.kind == "microseg":
                self._start_microseg()
            elif self.kind == "tc_ok":
                # What any TC program costs here: the trivial one of the
                # real-traffic breakdown, on both hooks of the host-side veths.
                self.trivial = TrivialProgram()
                fd = self.trivial.fd
                self._in_hub(lambda ipr, idx: tc.attach(ipr, idx, fd, fd))
            elif self.kind == "nft":
                path = os.path.join(self.work, "stress.nft")
                with open(path, "w") as f:
                    f.write(nft_ruleset(self.lab, self.rules, sets=True))  # type: ignore[arg-type]
                subprocess.run(self.lab.argv("hub", ["nft", "-f", path]), check=True,
                               capture_output=True)
                _bridge_nf(self.lab, True)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _in_hub(self, each: Callable) -> None:
        """each(ipr, ifindex) for the host-side veths microseg attaches to,
        with a netlink socket of the hub's namespace."""
        from pyroute2 import IPRoute
        from pyroute2.netns import popns, pushns

        pushns(self.lab.hub)
        try:
            with IPRoute() as ipr:
                for name in Topology.NAMES:
                    each(ipr, ipr.link_lookup(ifname=self.lab.host_if(name))[0])
        finally:
            popns()

    def __exit__(self, *exc: object) -> None:
        if self.trivial is not None:
            self._in_hub(lambda ipr, idx: tc.detach(ipr, idx))
            self.trivial.close()
            self.trivial = None
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            self.proc = None
        if self.kind == "nft":
            _bridge_nf(self.lab, False)
            subprocess.run(self.lab.argv("hub", ["nft", "delete", "table", "inet", NFT_TABLE]),
                           capture_output=True)

    def _start_microseg(self) -> None:
        from .policy import _status

        path = os.path.join(self.work, "policy.yaml")
        with open(path, "w") as f:
            f.write(policy_yaml(self.lab, self.rules))  # type: ignore[arg-type]
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.sock)
        # In the hub's namespace: `ip netns exec` gives the daemon that
        # namespace's /sys (where it finds its links) in a mount namespace
        # of its own, so it mounts a bpffs of its own for its pins there;
        # it and they end with the daemon (nothing left on the host's bpffs).
        cmd = (f"mount -t bpf bpf /sys/fs/bpf && exec {sys.executable} -m microseg run "
               f"--metrics off -i '{self.lab.glob}' --policy {path} --socket {self.sock} "
               f"--pin-dir {PIN_DIR} --event-window 1")
        log = os.path.join(self.work, "daemon.log")
        with open(log, "w") as f:
            self.proc = self.lab.spawn("hub", ["sh", "-c", cmd], stdout=f, stderr=f)
        proc = self.proc
        ok = wait_for(lambda: proc.poll() is not None
                      or (os.path.exists(self.sock) and _status(self.sock).get("ready")),
                      timeout=120)
        if not ok or proc.poll() is not None:
            with open(log) as f:
                tail = f.read()[-1500:]
            raise RuntimeError(f"bench stress: the microseg daemon did not become ready:\n{tail}")


def _published(stats: dict) -> int:
    """Events the daemon published, every type (a /v1/stats reading)."""
    return sum(stats["events"]["published"].values())


def _lost(stats: dict) -> int:
    """Events lost, every source: the ring buffer's failed reservations
    (the kernel's count) and slow subscribers' (a /v1/stats reading)."""
    return sum(stats["events"]["lost"].values())


def _flood(lab: Topology, fw: Firewall | None, src: str, cpu: int, seconds: float,
           warmup: float, work: str) -> dict:
    """trafgen from src for warmup + seconds; the counters over the last
    seconds. fw None: the generator's ceiling (src "gen", into no path)."""
    from microseg.kernel import bpfsys

    resp = gen = None
    daemon = fw is not None and fw.kind == "microseg"
    try:
        if fw is not None:
            resp = lab.spawn("srv", [sys.executable, "-c", _RESPONDER, lab.ipv4("srv"),
                                     str(PORT)], stdout=subprocess.PIPE, text=True)
            assert resp.stdout is not None
            if resp.stdout.readline().strip() != "ready":
                raise RuntimeError("bench stress: the receiver did not start")
            # The flow's first datagram and its answer: an established
            # session (microseg), an established conntrack entry (nftables).
            # It also teaches the bridge where srv is, for the denied flood.
            hello = lab.run("cli", [sys.executable, "-c", _HELLO, lab.ipv4("srv"), str(PORT),
                                    str(SPORT)])
            if hello.stdout.strip() != "answered":
                raise RuntimeError(f"bench stress: {LABELS[fw.kind]}: the allowed flow's first "
                                   f"datagram got no answer {hello.stderr[-300:]}")
        conf = os.path.join(work, f"{src}.trafgen")
        with open(conf, "w") as f:
            f.write(trafgen_conf(lab, src, SPORT, cpu))
        # --no-sock-mem: trafgen would otherwise raise the host's socket
        # memory sysctls; -Q: leave IRQ affinities alone. One process per
        # CPU up to ours (-P), the frame only on ours: cpu(N) in the config.
        gen = lab.spawn(src, ["trafgen", "--no-sock-mem", "-Q", "-C", "-P", str(cpu + 1),
                              "-o", "eth0", "-i", conf],
                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(warmup)
        if gen.poll() is not None:
            raise RuntimeError(f"bench stress: trafgen exited: {gen.stderr.read()[-500:]}")
        progs = _lab_programs(lab) if daemon else []
        st0 = _daemon_stats(fw.sock) if daemon else {}
        family = _family(gen.pid)
        t0, off0, in0, out0 = _counters(lab, src)
        cpu0, own0 = _cpu_ticks(cpu), _process_ticks(family)
        time.sleep(seconds)
        t1, off1, in1, out1 = _counters(lab, src)
        cpu1, own1 = _cpu_ticks(cpu), _process_ticks(family)
        st1 = _daemon_stats(fw.sock) if daemon else {}
        if daemon:
            # microseg's share, in a window of its own after the one above:
            # the run-time statistics cost every program run two clock reads
            # (docs/performance.md), so they are on only here (this fd), and
            # in the window above only as the daemon itself turns them on.
            stats_fd = bpfsys.enable_run_time_stats()
            try:
                bpf0, in_b0 = _bpf_run_time(progs), _counters(lab, src)[2]
                time.sleep(min(1.0, seconds))
                bpf1, in_b1 = _bpf_run_time(progs), _counters(lab, src)[2]
            finally:
                os.close(stats_fd)
    finally:
        for p in (gen, resp):
            if p is not None and p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGINT if p is gen else signal.SIGKILL)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
    dt = t1 - t0
    taken = in1 - in0
    ticks = {k: cpu1[k] - cpu0[k] for k in cpu0}
    total = sum(ticks.values()) or 1
    # The kernel's share (system: the sends; softirq: the path): other
    # users' programs on this CPU of a shared machine show as user time.
    kernel = ticks["system"] + ticks["irq"] + ticks["softirq"]
    out = {"offered_pps": round((off1 - off0) / dt), "taken_pps": round(taken / dt),
           "delivered_pps": round((out1 - out0) / dt) if fw is not None else 0,
           "kernel_ns_per_packet": round(kernel * TICK_NS / taken, 1) if taken else None,
           # The generator's own CPU time (its sends and the path they run
           # inline): per packet, and the rates per second of that time —
           # what a CPU of its own would carry, whoever else shares it.
           "generator_cpu_s": round((own1 - own0) * TICK_NS / 1e9, 3),
           "ns_per_packet": round((own1 - own0) * TICK_NS / taken, 1) if taken else None,
           "taken_per_cpu_s": round(taken / ((own1 - own0) * TICK_NS / 1e9))
           if own1 > own0 else 0,
           "delivered_per_cpu_s": round((out1 - out0) / ((own1 - own0) * TICK_NS / 1e9))
           if own1 > own0 and fw is not None else 0,
           "cpu_share": {k: round(v / total, 3) for k, v in ticks.items()}}
    if daemon:
        judged = in_b1 - in_b0
        out["bpf_ns_per_packet"] = round((bpf1[0] - bpf0[0]) / judged, 1) if judged else None
        out["bpf_runs_per_packet"] = round((bpf1[1] - bpf0[1]) / judged, 2) if judged else None
        for key, (a, b) in {"events_published": (_published(st0), _published(st1)),
                            "events_lost": (_lost(st0), _lost(st1)),
                            "denials_unaggregated": (
                                st0["events"].get("denials_unaggregated", 0),
                                st1["events"].get("denials_unaggregated", 0))}.items():
            out[key] = b - a
    if src == "bad" and fw is not None and fw.kind not in ("none", "tc_ok") \
            and out["delivered_pps"] > 0.01 * out["taken_pps"]:
        raise RuntimeError(f"bench stress: {LABELS[fw.kind]} let a denied flood through: "
                           f"{out}")
    return out


KEYS = ("offered_pps", "taken_pps", "delivered_pps", "kernel_ns_per_packet", "ns_per_packet",
        "taken_per_cpu_s", "delivered_per_cpu_s",
        "bpf_ns_per_packet", "events_published", "events_lost", "denials_unaggregated")


def _summary(runs: list[dict]) -> dict:
    cell: dict = {"runs": runs}
    for k in KEYS:
        vals = [x[k] for x in runs if x.get(k) is not None]
        if vals:
            cell[k] = summarize(vals)
    return cell


def measure(rounds: int, seconds: float, rules: int, warmup: float = 1.0,
            cpu: int = CPU, progress: Callable[[str], None] = lambda s: None) -> dict:
    for tool in ("trafgen", "nft", "tc"):
        if not shutil.which(tool):
            raise RuntimeError(f"bench stress: {tool} not found (make setup installs it)")
    lab = Topology()
    work = tempfile.mkdtemp(prefix="microseg-bench-stress-")
    samples: dict[str, dict[str, list[dict]]] = {k: {f: [] for f in FLOODS} for k in CONFIGS}
    ceiling: list[dict] = []
    try:
        lab.up()
        for r in range(rounds):
            progress(f"stress round {r + 1}/{rounds}: the generator alone")
            ceiling.append(_flood(lab, None, "gen", cpu, seconds, warmup, work))
            order = CONFIGS[r % len(CONFIGS):] + CONFIGS[:r % len(CONFIGS)]
            for kind in order:
                with Firewall(kind, lab, rules, work) as fw:
                    for flood in (FLOODS if r % 2 == 0 else FLOODS[::-1]):
                        progress(f"stress round {r + 1}/{rounds}: {LABELS[kind]}, "
                                 f"{FLOOD_LABELS[flood]}")
                        src = "cli" if flood == "allowed" else "bad"
                        samples[kind][flood].append(_flood(lab, fw, src, cpu, seconds, warmup,
                                                           work))
    finally:
        lab.down()
        shutil.rmtree(work, ignore_errors=True)
    out: dict = {"params": {"rounds": rounds, "seconds": seconds, "warmup": warmup,
                            "rules": rules, "cpu": cpu, "frame_bytes": 60},
                 "generator": _summary(ceiling), "configs": {}}
    for kind, floods in samples.items():
        out["configs"][kind] = {"label": LABELS[kind], "floods": {
            flood: {"label": FLOOD_LABELS[flood], **_summary(runs)}
            for flood, runs in floods.items()}}
    return out


def verdicts(res: dict) -> list[dict]:
    """One row per configuration and flood. The figure compared with no
    firewall is per second of the generator's CPU time (see the module's
    docstring): delivered for allowed traffic, taken for the denied flood;
    its share of no firewall's (medians) and, for microseg, the target."""
    rows = []
    for kind, cfg in res["configs"].items():
        for flood, cell in cfg["floods"].items():
            key = "delivered_per_cpu_s" if flood == "allowed" else "taken_per_cpu_s"
            base = res["configs"]["none"]["floods"][flood][key]["median"]
            share = cell[key]["median"] / base if base else 0.0
            rows.append({"kind": kind, "flood": flood,
                         "label": f"{cfg['label']}, {cell['label']}", "figure": key,
                         "offered": cell["offered_pps"], "delivered": cell["delivered_pps"],
                         "compared": cell[key], "share": share,
                         "met": share >= TARGET if kind == "microseg" else None,
                         "ns": cell["ns_per_packet"], "bpf_ns": cell.get("bpf_ns_per_packet"),
                         "events": (cell["events_published"]["median"],
                                    cell["events_lost"]["max"])
                         if "events_published" in cell else None})
    return rows


def offered_met(res: dict) -> bool:
    """The ≥ 1,000,000 packets/s offered of the target, with no firewall."""
    return res["configs"]["none"]["floods"]["allowed"]["offered_pps"]["median"] >= 1e6


def table(res: dict) -> str:
    p, g = res["params"], res["generator"]
    lines = [f"Stress: trafgen, {p['frame_bytes']}-byte UDP frames on one CPU (cpu{p['cpu']}), "
             f"{p['rounds']} rounds x {p['seconds']} s, medians over the rounds",
             f"  the generator alone (into a veth, dropped at once): offered "
             f"{g['offered_pps']['median']:,.0f}/s, {g['taken_per_cpu_s']['median']:,.0f} per "
             f"CPU-second ({g['ns_per_packet']['median']:,.0f} ns/packet)",
             f"  {'configuration':46s}{'offered/s':>11s}{'delivered/s':>12s}{'per CPU-s':>11s}"
             f"{'% none':>8s}{'ns/pkt':>8s}{'BPF ns':>8s}  target >= 95 %"]
    for r in verdicts(res):
        bpf = f"{r['bpf_ns']['median']:.0f}" if r["bpf_ns"] else ""
        met = "" if r["met"] is None else ("met" if r["met"] else "NOT met")
        lines.append(f"  {r['label']:46s}{r['offered']['median']:>11,.0f}"
                     f"{r['delivered']['median']:>12,.0f}{r['compared']['median']:>11,.0f}"
                     f"{100 * r['share']:>7.0f}%{r['ns']['median']:>8,.0f}{bpf:>8s}  {met}")
        if r["events"]:
            lines.append(f"  {'':46s}daemon events published {r['events'][0]:,.0f}, "
                         f"lost {r['events'][1]:,.0f} (max)")
    lines.append("  per CPU-s: delivered (denied: taken by the host) per second of the "
                 "generator's CPU time, its sends and the path they run;")
    lines.append(f"  >= 1,000,000/s offered: {'met' if offered_met(res) else 'NOT met'}")
    return "\n".join(lines)
