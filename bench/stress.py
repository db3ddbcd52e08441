"""Stress: a packet generator in the kernel floods a lab link through the firewall.

Namespaces on one bridge, as in bench/traffic.py, but all of them the lab's
own (see Topology for why): `cli` (allowed to send UDP to `srv`'s port),
`srv` (the receiver), `bad` (denied by the same default-deny policy) and
`hub`, which holds the bridge and the host-side veths, where microseg
attaches.

The generator is an XDP program run by BPF_PROG_TEST_RUN in live-frames
mode (bpfsys.xdp_live_frames) in a sender's namespace: the kernel makes
64-byte UDP frames (60 bytes without the FCS) from one template and the
program's XDP_TX sends each out of the sender's `eth0` into the veth's ring,
millions per second from one CPU, with no socket and no copy per frame.
The host end of that veth runs its receive in a NAPI thread of its own
(GRO on, `threaded`), pinned to the path's CPU; the generator, the daemon
and the benchmark itself keep the other CPUs. So the two are apart, as a
NIC and the host's CPUs are: the generator offers more than one CPU can
carry, the host end's ring drops the rest (counted), and what is compared
is what the path's CPU carries — the host end's receive, microseg's TC
ingress program, the bridge, TC egress on `srv`'s host end and the receive
into `srv`, all on that CPU.

The configurations, interleaved and their order rotated every round:
- no firewall;
- a TC program that returns TC_ACT_OK at once, on microseg's hooks (what
  any TC program costs here);
- microseg (`microseg run` with bench/traffic.py's policy, denials
  aggregated per flow over `--event-window` 1 s, docs/events.md);
- nftables with conntrack, the same policy as one rule over a set
  (bench/traffic.py's ruleset, on this bridge only).
Each with two floods: allowed established traffic (one UDP flow `cli` →
`srv`, made a session first by one datagram and its answer, then flooded
from the same source port) and a denied flood (the same frames from `bad`).
Each round also measures the generator alone: a veth whose host end is on
no bridge, whose frames the host drops at once.

Counted by the kernel's interface counters of the sender's host end (and
`srv`'s) over `seconds`, after `warmup`:
- offered: frames the generator sent into the veth: received by the host
  end, or dropped at its full ring;
- taken: frames the host end received, i.e. that reached the firewall's
  ingress hook;
- delivered: frames that crossed into `srv` (tx of its host-side veth).
For allowed traffic, the figure compared with no firewall is delivered. For
the denied flood it is taken — the rate at which the firewall judges and
drops the flood, beside the rate at which the same path carries it with no
firewall — and delivered must stay ~0 (checked: a firewall that let the
flood through would make for flattering numbers). Both are compared per
second of the path CPU's busy time (/proc/stat: on a shared VM others'
work can take a share of that CPU, and so of the per-second figures; per
CPU-second is what a CPU of its own carries), and reported per second too;
ns per packet is that busy time per packet taken. microseg's own share is
the kernel's BPF run-time statistics (`run_time_ns` / `run_cnt` of the
programs on the lab's veths, docs/performance.md): ns per packet taken,
both hooks together, in a second window of the same flood (they cost each
program run two clock reads, so the first window has them only as the
daemon itself turns them on). The daemon's events published and lost during
the flood come from its /v1/stats.

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
# The path's CPU (the host ends' NAPI threads); everything else, the
# generator included, runs on the others.
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
# The generator (see the module's docstring): `r0 = XDP_TX; exit`, run over
# fresh copies of the frame until it is killed, from this process's CPUs.
# Long runs: every BPF_PROG_TEST_RUN of an XDP program puts it into the
# kernel's XDP dispatcher and takes it out again, each an RCU grace period
# of sleep (runs of 2^18 frames left the generator asleep a third of the time).
_GENERATOR = """
import socket, struct, sys
from microseg.kernel import bpfsys
insns = struct.pack("<BBhi", 0xb7, 0, 0, 3) + struct.pack("<BBhi", 0x95, 0, 0, 0)
fd = bpfsys.prog_load(insns, "mseg_stress_gen", bpfsys.BPF_PROG_TYPE_XDP)
frame, ifindex = bytes.fromhex(sys.argv[1]), socket.if_nametoindex("eth0")
bpfsys.xdp_live_frames(fd, frame, ifindex, repeat=64)
print("ready", flush=True)
while True:
    bpfsys.xdp_live_frames(fd, frame, ifindex, repeat=1 << 24)
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

    def up(self, cpu: int) -> None:
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
            self._receive_in_threads(cpu)
        except BaseException:
            self.down()
            raise

    def _receive_in_threads(self, cpu: int) -> None:
        """Each host end receives in a NAPI thread of its own, on `cpu`.
        GRO on gives a veth NAPI (and the ring XDP_TX fills); `threaded`
        moves its poll from the softirq of whichever CPU sent into a
        thread, which can be pinned."""
        from pyroute2.ethtool import Ethtool
        from pyroute2.netns import popns, pushns

        ends = [self.host_if(n) for n in (*self.NAMES, "gen")]
        pushns(self.hub)
        try:
            tool = Ethtool()
            try:
                for hif in ends:
                    features = tool.get_features(hif)
                    features.features["rx-gro"].enable = True
                    tool.set_features(hif, features)
            finally:
                tool.close()
        finally:
            popns()
        subprocess.run(["ip", "netns", "exec", self.hub, "sh", "-c",
                        " && ".join(f"echo 1 > /sys/class/net/{hif}/threaded" for hif in ends)],
                       check=True, capture_output=True)
        threads = _napi_threads(self.PREFIX)
        if len(threads) < len(ends):
            raise RuntimeError(f"bench stress: {len(threads)} NAPI threads for {len(ends)} "
                               "host ends (veth GRO or threaded NAPI not supported?)")
        for pid in threads:
            os.sched_setaffinity(pid, {cpu})

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


def frame(lab: Topology, src: str, sport: int) -> bytes:
    """The generator's 60-byte frame (64 on a wire), src to srv."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether

    return bytes(Ether(dst=_mac(lab, "srv"), src=_mac(lab, src))
                 / IP(src=lab.ipv4(src), dst=lab.ipv4("srv"), ttl=64)
                 / UDP(sport=sport, dport=PORT) / bytes(18))


def _napi_threads(prefix: str) -> list[int]:
    """Pids of the NAPI threads of the lab's links ("napi/<link>-<id>")."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{d}/comm") as f:
                if f.read().startswith(f"napi/{prefix}"):
                    pids.append(int(d))
    return pids


def _counters(lab: Topology, src: str) -> tuple[float, int, int, int]:
    """(time, offered, taken, delivered) so far: the sender's host end's rx
    + rx dropped (its ring full), its rx, srv's host end's tx."""
    hub = lab.links("hub")  # one reading of both host ends
    rx = hub[lab.host_if(src)]["stats64"]["rx"]
    return (time.monotonic(), rx["packets"] + rx["dropped"], rx["packets"],
            hub[lab.host_if("srv")]["stats64"]["tx"]["packets"])


def _cpu_ticks(cpu: int) -> dict[str, int]:
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith(f"cpu{cpu} "):
                v = [int(x) for x in line.split()[1:9]]
                return {"user": v[0] + v[1], "system": v[2], "idle": v[3] + v[4],
                        "irq": v[5], "softirq": v[6], "steal": v[7]}
    raise RuntimeError(f"bench stress: cpu{cpu} not in /proc/stat")


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
    """The generator in src for warmup + seconds; the counters over the
    last seconds. fw None: the generator alone (src "gen", into no path)."""
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
        gen = lab.spawn(src, [sys.executable, "-c", _GENERATOR,
                              frame(lab, src, SPORT).hex()],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert gen.stdout is not None and gen.stderr is not None
        if gen.stdout.readline().strip() != "ready":
            gen.wait(timeout=10)
            raise RuntimeError(f"bench stress: the generator failed: {gen.stderr.read()[-500:]}")
        time.sleep(warmup)
        progs = _lab_programs(lab) if daemon else []
        st0 = _daemon_stats(fw.sock) if daemon else {}
        t0, off0, in0, out0 = _counters(lab, src)
        cpu0 = _cpu_ticks(cpu)
        time.sleep(seconds)
        t1, off1, in1, out1 = _counters(lab, src)
        cpu1 = _cpu_ticks(cpu)
        st1 = _daemon_stats(fw.sock) if daemon else {}
        if gen.poll() is not None:
            raise RuntimeError(f"bench stress: the generator exited: {gen.stderr.read()[-500:]}")
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
                    os.killpg(p.pid, signal.SIGKILL)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
    dt = t1 - t0
    taken = in1 - in0
    ticks = {k: cpu1[k] - cpu0[k] for k in cpu0}
    total = sum(ticks.values()) or 1
    # The path CPU's busy time: the NAPI thread, the softirqs it runs, and
    # whatever else of a shared machine's ran there (user time: not ours).
    busy_s = (total - ticks["idle"] - ticks["steal"]) * TICK_NS / 1e9
    kernel = ticks["system"] + ticks["irq"] + ticks["softirq"]
    out = {"offered_pps": round((off1 - off0) / dt), "taken_pps": round(taken / dt),
           "delivered_pps": round((out1 - out0) / dt) if fw is not None else 0,
           "kernel_ns_per_packet": round(kernel * TICK_NS / taken, 1) if taken else None,
           "path_cpu_s": round(busy_s, 3),
           "ns_per_packet": round(busy_s * 1e9 / taken, 1) if taken else None,
           "taken_per_cpu_s": round(taken / busy_s) if busy_s else 0,
           "delivered_per_cpu_s": round((out1 - out0) / busy_s)
           if busy_s and fw is not None else 0,
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
    for tool in ("nft", "tc"):
        if not shutil.which(tool):
            raise RuntimeError(f"bench stress: {tool} not found (make setup installs it)")
    lab = Topology()
    work = tempfile.mkdtemp(prefix="microseg-bench-stress-")
    samples: dict[str, dict[str, list[dict]]] = {k: {f: [] for f in FLOODS} for k in CONFIGS}
    ceiling: list[dict] = []
    # The generator, the daemon and this process on the other CPUs (their
    # children inherit it); the path's CPU is the host ends' NAPI threads'.
    affinity = os.sched_getaffinity(0)
    others = (set(range(os.cpu_count() or 1)) - {cpu}) or {cpu}
    try:
        os.sched_setaffinity(0, others)
        lab.up(cpu)
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
        os.sched_setaffinity(0, affinity)
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
    firewall is per second of the path CPU's busy time (see the module's
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
    lines = [f"Stress: an XDP live-frames generator, {p['frame_bytes']}-byte UDP frames; "
             f"the path on one CPU (cpu{p['cpu']}), {p['rounds']} rounds x {p['seconds']} s, "
             "medians over the rounds",
             f"  the generator alone (into a veth, dropped at once): offered "
             f"{g['offered_pps']['median']:,.0f}/s; the host took "
             f"{g['taken_per_cpu_s']['median']:,.0f} per CPU-second "
             f"({g['ns_per_packet']['median']:,.0f} ns/packet)",
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
                 "path CPU's busy time;")
    lines.append(f"  >= 1,000,000/s offered: {'met' if offered_met(res) else 'NOT met'}")
    return "\n".join(lines)
