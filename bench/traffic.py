"""Real traffic between two lab namespaces, side by side: no firewall, microseg,
and nftables with conntrack enforcing the same rules — once as a linear rule
list, once as a set.

The client and the server are namespaces on one bridge (as containers are).
microseg attaches to the host side of both veths; nftables filters the same
bridged traffic in an inet forward chain (the bridge's `nf_call_iptables`,
set only on this bridge and only while nftables is measured, sends it
there, through conntrack). Both enforce default deny with the benchmark's
flows allowed by the last of `rules` rules, the rest never matching.

Measured per configuration and round, the configurations interleaved and
their order rotated every round:
- TCP request/response, 64 bytes, one connection, one request in flight
  (sockperf ping-pong, full round trips): requests/s, p50 and p99 latency;
- UDP, 64-byte datagrams as fast as the sender can (iperf3): datagrams/s
  received;
- TCP stream (iperf3): bits/s received.

And, interleaved with them, request/response alone for the breakdown of
microseg's overhead (BREAKDOWN): a trivial TC program where microseg
attaches, and microseg's programs with the daemon stopped, with the kernel's
BPF run-time statistics off and on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

from microseg.lab.topology import Lab, WorkloadSpec, wait_for

CONFIGS = ("none", "microseg", "nft_linear", "nft_sets")
# Where microseg's request/response overhead goes (README, "Real traffic"):
# measured with sockperf only, interleaved with the configurations above.
# "microseg_kept" measures "microseg_kept_stats" too, on the same attached
# programs (one daemon start less per round), in either order by turns.
BREAKDOWN = ("tc_ok", "microseg_kept", "microseg_kept_stats")
LABELS = {"none": "no firewall", "microseg": "microseg",
          "nft_linear": "nftables, linear rules", "nft_sets": "nftables, a set",
          "tc_ok": "a TC program returning TC_ACT_OK",
          "tc_ok_ingress": "a TC program returning TC_ACT_OK, ingress only",
          "microseg_kept": "microseg's programs, daemon stopped",
          "microseg_kept_stats": "microseg's programs, daemon stopped, run-time stats on",
          "microseg_kept_ingress": "microseg's programs, daemon stopped, ingress only"}
RR_PORT, IPERF_PORT = 11111, 5201
PIN_DIR = "/sys/fs/bpf/microseg-bench-traffic"
NFT_TABLE = "msbench"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
# Client and server share one CPU, the same in every run (the daemon and
# the rest keep the other): left to the scheduler, a request/response pair
# on this 2-vCPU VM lands on one CPU or two at random, and a cross-CPU
# wake-up costs ~40 us here, which made the latencies bimodal and the
# comparison meaningless. On one CPU the firewall's cost shows undiluted.
PIN = ["taskset", "-c", str((os.cpu_count() or 1) - 1)]


def _filler(i: int) -> tuple[str, str, int]:
    """The i-th rule that never matches: its own /32s and port."""
    return (f"198.18.{i // 250}.{i % 250 + 1}", f"198.19.{i // 250}.{i % 250 + 1}",
            1024 + i)


def policy_yaml(lab: Lab, rules: int) -> str:
    cli, srv = lab.ipv4("cli"), lab.ipv4("srv")
    out = ["version: 1", "default: deny", "workloads:",
           f"  cli: {{addresses: [{cli}]}}", f"  srv: {{addresses: [{srv}]}}", "rules:"]
    for i in range(max(0, rules - 2)):
        a, b, port = _filler(i)
        out.append(f"  - {{name: f{i}, from: {{cidr: {a}/32}}, to: {{cidr: {b}/32}}, "
                   f"protocol: tcp, ports: [{port}], action: allow}}")
    out.append(f"  - {{name: bench-tcp, from: {{workload: cli}}, to: {{workload: srv}}, "
               f"protocol: tcp, ports: [{RR_PORT}, {IPERF_PORT}], action: allow}}")
    out.append(f"  - {{name: bench-udp, from: {{workload: cli}}, to: {{workload: srv}}, "
               f"protocol: udp, ports: [{IPERF_PORT}], action: allow}}")
    return "\n".join(out) + "\n"


def nft_ruleset(lab: Lab, rules: int, sets: bool) -> str:
    """The policy above in nftables: conntrack first (as microseg's session
    table), then the rules, then default deny — for this bridge only."""
    cli, srv = lab.ipv4("cli"), lab.ipv4("srv")
    allowed = [(_filler(i)[0], _filler(i)[1], "tcp", _filler(i)[2])
               for i in range(max(0, rules - 2))]
    allowed += [(cli, srv, "tcp", RR_PORT), (cli, srv, "tcp", IPERF_PORT),
                (cli, srv, "udp", IPERF_PORT)]
    lines = [f"table inet {NFT_TABLE} {{"]
    if sets:
        elems = ", ".join(f"{a} . {b} . {p} . {port}" for a, b, p, port in allowed)
        lines += ["  set allow {",
                  "    type ipv4_addr . ipv4_addr . inet_proto . inet_service",
                  f"    elements = {{ {elems} }}", "  }"]
    lines += ["  chain workloads {",
              "    ct state established,related accept",
              "    ct state invalid drop"]
    if sets:
        lines.append("    ip saddr . ip daddr . meta l4proto . th dport @allow accept")
    else:
        lines += [f"    ip saddr {a} ip daddr {b} {p} dport {port} accept"
                  for a, b, p, port in allowed]
    lines += ["    drop", "  }",
              "  chain forward {",
              "    type filter hook forward priority filter; policy accept;",
              f'    iifname "{lab.bridge}" jump workloads',
              "  }", "}"]
    return "\n".join(lines) + "\n"


# A TC program that returns TC_ACT_OK at once: what any TC program costs
# on this path (the kernel's clsact and cls_bpf, the program's call).
TRIVIAL_C = "int tc_ok(struct __sk_buff *skb) { return 0; }"


class TrivialProgram:
    """The trivial program, compiled once per run, attached where microseg
    attaches (both hooks of both host-side veths, or ingress only)."""

    def __init__(self) -> None:
        from bcc import BPF

        self.bpf = BPF(text=TRIVIAL_C)
        self.fd = self.bpf.load_func("tc_ok", BPF.SCHED_CLS).fd

    def attach(self, lab: Lab, hooks: str = "both") -> None:
        _attach_all(lab, self.fd, self.fd, hooks)

    def close(self) -> None:
        self.bpf.cleanup()


def _attach_all(lab: Lab, ingress_fd: int, egress_fd: int, hooks: str) -> None:
    from pyroute2 import IPRoute

    from microseg.kernel import tc

    with IPRoute() as ipr:
        for w in lab.workloads:
            idx = lab.ifindex(w.name)
            tc.attach(ipr, idx, ingress_fd, egress_fd)
            if hooks == "ingress":
                _del_filter(ipr, idx, tc.PARENT_EGRESS)


def _del_filter(ipr, idx: int, parent: str) -> None:
    from microseg.kernel import tc

    ipr.tc("del-filter", "bpf", idx, tc.FILTER_HANDLE, parent=parent, prio=tc.FILTER_PRIO,
           protocol=tc.ETH_P_ALL)


def _detach_all(lab: Lab, hooks: str = "both") -> None:
    """Remove whatever TC programs a configuration left on the lab's veths."""
    from pyroute2 import IPRoute

    from microseg.kernel import tc

    with IPRoute() as ipr:
        for w in lab.workloads:
            try:
                idx = lab.ifindex(w.name)
            except OSError:
                continue
            if hooks == "egress":
                _del_filter(ipr, idx, tc.PARENT_EGRESS)
            else:
                tc.detach(ipr, idx)


# Host-wide: what a daemon's stats fd turns on, and maybe an operator too.
BPF_STATS_SYSCTL = "/proc/sys/kernel/bpf_stats_enabled"


def _set_bpf_stats(on: bool | str) -> str:
    """Set kernel.bpf_stats_enabled (on, off, or back to a value read
    before); what it was."""
    with open(BPF_STATS_SYSCTL) as f:
        was = f.read().strip()
    with open(BPF_STATS_SYSCTL, "w") as f:
        f.write(on if isinstance(on, str) else "1" if on else "0")
    return was


class Firewall:
    """One configuration, set up and torn down around each round's tests.

    Besides the compared firewalls, the breakdown of microseg's cost:
    - "tc_ok": the trivial program where microseg attaches;
    - "microseg_kept": microseg's programs and maps, attached and enforcing
      the same policy, the daemon stopped (`--keep-on-exit`): no daemon
      wake-ups, no kernel run-time statistics;
    - "microseg_kept_stats": the same with the kernel's BPF run-time
      statistics on (`kernel.bpf_stats_enabled`, what a daemon's stats fd
      turns on);
    - "microseg_kept_ingress": microseg_kept with the egress hooks removed
      (one program per packet instead of two).
    """

    def __init__(self, kind: str, lab: Lab, rules: int, work: str,
                 trivial: TrivialProgram | None = None,
                 daemon_argv: list[str] | None = None) -> None:
        self.kind, self.lab, self.rules, self.work = kind, lab, rules, work
        self.trivial = trivial
        self.daemon_argv = daemon_argv or [sys.executable, "-m", "microseg"]
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> Firewall:
        try:
            self._enter()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _enter(self) -> None:
        if self.kind == "microseg":
            self._start_microseg()
        elif self.kind.startswith("microseg_kept"):
            self._start_microseg(keep=True)
            self.proc.send_signal(signal.SIGTERM)
            if self.proc.wait(timeout=30) != 0:
                raise RuntimeError("bench traffic: the microseg daemon did not stop cleanly")
            self.proc = None
            if self.kind.endswith("_ingress"):
                _detach_all(self.lab, hooks="egress")
            if self.kind.endswith("_stats"):
                _set_bpf_stats(True)
        elif self.kind.startswith("tc_ok"):
            assert self.trivial is not None
            self.trivial.attach(self.lab, "ingress" if self.kind.endswith("_ingress")
                                else "both")
        elif self.kind.startswith("nft"):
            path = os.path.join(self.work, f"{self.kind}.nft")
            with open(path, "w") as f:
                f.write(nft_ruleset(self.lab, self.rules, sets=self.kind == "nft_sets"))
            subprocess.run(["nft", "-f", path], check=True, capture_output=True)
            _bridge_nf(self.lab, True)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=30)
            self.proc = None
        if self.kind.startswith(("microseg_kept", "tc_ok")):
            _set_bpf_stats(False)
            _detach_all(self.lab)
            shutil.rmtree(PIN_DIR, ignore_errors=True)
        if self.kind.startswith("nft"):
            _bridge_nf(self.lab, False)
            subprocess.run(["nft", "delete", "table", "inet", NFT_TABLE], capture_output=True)

    def _start_microseg(self, keep: bool = False) -> None:
        from .policy import _status

        path = os.path.join(self.work, "policy.yaml")
        with open(path, "w") as f:
            f.write(policy_yaml(self.lab, self.rules))
        sock = os.path.join(self.work, "ms.sock")
        log = os.path.join(self.work, "daemon.log")
        self.proc = subprocess.Popen(
            [*self.daemon_argv, "run", "--metrics", "off", "-i", self.lab.glob,
             "--policy", path, "--socket", sock, "--pin-dir", PIN_DIR,
             *(["--keep-on-exit"] if keep else [])],
            stdout=subprocess.DEVNULL, stderr=open(log, "wb"))  # noqa: SIM115 (the child's)
        ok = wait_for(lambda: self.proc.poll() is None and os.path.exists(sock)
                      and _status(sock).get("ready"), timeout=120)
        if not ok:
            with open(log, errors="replace") as f:
                tail = f.read()[-2000:]
            raise RuntimeError(f"bench traffic: the microseg daemon did not become ready:\n"
                               f"{tail}")


def _bridge_nf(lab: Lab, on: bool) -> None:
    subprocess.run(["ip", "link", "set", lab.bridge, "type", "bridge", "nf_call_iptables",
                    "1" if on else "0"], check=True, capture_output=True)


# The bridge's netfilter hooks, host-wide: a container engine sets them to 1
# (docker, podman), and then every bridged packet — "no firewall" too —
# passes iptables and conntrack. Off while measuring (nftables turns them on
# for its own bridge only: _bridge_nf), restored after.
BRIDGE_NF = ("/proc/sys/net/bridge/bridge-nf-call-iptables",
             "/proc/sys/net/bridge/bridge-nf-call-ip6tables")


def _host_bridge_nf(values: dict[str, str] | None = None) -> dict[str, str]:
    """Set the host-wide bridge netfilter switches (off, or back to values);
    what they were. Absent without br_netfilter: nothing to do."""
    was = {}
    for path in BRIDGE_NF:
        try:
            with open(path) as f:
                was[path] = f.read().strip()
            with open(path, "w") as f:
                f.write((values or {}).get(path, "0"))
        except FileNotFoundError:
            continue
    return was


def _sockperf_rr(lab: Lab, seconds: float) -> dict:
    r = lab.run("cli", [*PIN, "sockperf", "ping-pong", "--tcp", "-i", lab.ipv4("srv"),
                        "-p", str(RR_PORT), "-t", str(seconds), "-m", "64", "--full-rtt"],
                timeout=seconds + 30)
    text = ANSI.sub("", r.stdout + r.stderr)
    valid = re.search(r"\[Valid Duration\] RunTime=([\d.]+) sec; SentMessages=\d+; "
                      r"ReceivedMessages=(\d+)", text)
    p50 = re.search(r"percentile 50\.000 =\s*([\d.]+)", text)
    p99 = re.search(r"percentile 99\.000 =\s*([\d.]+)", text)
    if not (valid and p50 and p99):
        raise RuntimeError(f"bench traffic: unexpected sockperf output:\n{text[-2000:]}")
    return {"rr_per_s": round(int(valid[2]) / float(valid[1])),
            "p50_us": float(p50[1]), "p99_us": float(p99[1])}


def _iperf(lab: Lab, seconds: float, udp: bool) -> dict:
    argv = [*PIN, "iperf3", "-c", lab.ipv4("srv"), "-p", str(IPERF_PORT),
            "-t", str(seconds), "--json"]
    if udp:
        argv += ["-u", "-l", "64", "-b", "0"]
    r = lab.run("cli", argv, timeout=seconds + 30)
    try:
        end = json.loads(r.stdout)["end"]
    except (ValueError, KeyError) as e:
        raise RuntimeError(f"bench traffic: iperf3 failed: {r.stdout[-500:]}"
                           f"{r.stderr[-500:]}") from e
    if udp:
        s = end["sum"]
        return {"udp_pps": round((s["packets"] - s["lost_packets"]) / s["seconds"]),
                "udp_sent_pps": round(s["packets"] / s["seconds"])}
    return {"stream_gbps": round(end["sum_received"]["bits_per_second"] / 1e9, 3)}


def _run_tests(lab: Lab, seconds: float) -> dict:
    out = _sockperf_rr(lab, seconds)
    out.update(_iperf(lab, seconds, udp=True))
    out.update(_iperf(lab, seconds, udp=False))
    return out


_CONNECT = """
import socket, sys
s = socket.socket()
s.settimeout(1)
try:
    s.connect((sys.argv[1], 22))
    print("open")
except ConnectionRefusedError:
    print("refused")
except OSError:
    print("dropped")
"""


def _check_enforced(lab: Lab, kind: str) -> None:
    """A firewall that is not enforcing would make for flattering numbers:
    a port the policy does not allow is dropped under each of them (and,
    with no firewall, refused by the server's kernel)."""
    got = lab.run("cli", [sys.executable, "-c", _CONNECT, lab.ipv4("srv")],
                  timeout=30).stdout.strip()
    want = "refused" if kind == "none" or kind.startswith("tc_ok") else "dropped"
    if got != want:
        raise RuntimeError(f"bench traffic: {LABELS[kind]}: tcp to port 22 {got}, "
                           f"expected {want}")


def summarize(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def measure(rounds: int, seconds: float, rules: int,
            progress: Callable[[str], None] = lambda s: None) -> dict:
    for tool in ("sockperf", "iperf3", "nft"):
        if not shutil.which(tool):
            raise RuntimeError(f"bench traffic: {tool} not found (make setup installs it)")
    lab = Lab([WorkloadSpec("cli", 10), WorkloadSpec("srv", 20)], prefix="msbt",
              subnet4="10.210.0.0/24", subnet6="fd00:210::/64")
    work = tempfile.mkdtemp(prefix="microseg-bench-traffic-")
    kinds = CONFIGS + BREAKDOWN[:-1]
    samples: dict[str, list[dict]] = {k: [] for k in CONFIGS + BREAKDOWN}
    trivial = None
    bridge_nf = _host_bridge_nf()
    bpf_stats = _set_bpf_stats(False)  # restored after, whatever it was
    try:
        lab.up()
        lab.spawn("srv", [*PIN, "sockperf", "server", "--tcp", "-i", "0.0.0.0",
                          "-p", str(RR_PORT)],
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        lab.spawn("srv", [*PIN, "iperf3", "-s", "-p", str(IPERF_PORT)],
                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        trivial = TrivialProgram()
        for r in range(rounds):
            order = kinds[r % len(kinds):] + kinds[:r % len(kinds)]
            for kind in order:
                progress(f"traffic round {r + 1}/{rounds}: {LABELS[kind]}")
                with Firewall(kind, lab, rules, work, trivial=trivial):
                    _check_enforced(lab, kind)
                    if kind in CONFIGS:
                        samples[kind].append(_run_tests(lab, seconds))
                    elif kind == "microseg_kept":
                        for stats in (False, True) if r % 2 == 0 else (True, False):
                            _set_bpf_stats(stats)
                            samples[kind + "_stats" * stats].append(
                                _sockperf_rr(lab, seconds))
                    else:
                        samples[kind].append(_sockperf_rr(lab, seconds))
    finally:
        if trivial is not None:
            trivial.close()
        _set_bpf_stats(bpf_stats)
        _host_bridge_nf(bridge_nf)
        lab.down()
        subprocess.run(["nft", "delete", "table", "inet", NFT_TABLE], capture_output=True)
        shutil.rmtree(PIN_DIR, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    out: dict = {"params": {"rounds": rounds, "seconds": seconds, "rules": rules},
                 "configs": {}, "breakdown": {}}
    for kind, runs in samples.items():
        out["configs" if kind in CONFIGS else "breakdown"][kind] = {
            "label": LABELS[kind], "runs": runs,
            **{m: summarize([x[m] for x in runs]) for m in runs[0]}}
    return out
