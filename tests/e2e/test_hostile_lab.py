"""Hostile packets on real veths (issue 9, point 5, in the lab).

A real daemon enforces a policy on a lab of three workloads: web may open
TCP 5432 to db, rogue may open nothing to db (rule `no-rogue`). From rogue's
eth0, scapy sends thousands of crafted frames towards db — every TCP flag
byte class (ACK-only mid-stream, RST, FIN, SYN-ACK posing as a reply),
replies of sessions that never were, first, tiny and later fragments, bad
IHL / lengths / versions / data offsets, truncated headers, IPv6 extension
chains past the parser's limit, VLAN tags up to five deep, and ICMP errors
quoting web's live session sent to db — while web's connection to db keeps
exchanging messages. Then:
  1. not one of those frames reaches db's eth0 (an AF_PACKET capture in
     db's namespace, matching the frames' own source MAC);
  2. web's connection never missed an exchange, and a new one still opens;
  3. the daemon's drop counters (GET /v1/stats) moved by exactly the number
     of frames sent, and by reason exactly as the frame classes say the
     spec's reasons apply (§6: rule for a denied flow, state for a SYN-ACK
     without a SYN, invalid for a malformed header, fragment for a later
     fragment without its first).
"""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from microseg.lab.topology import Lab, WorkloadSpec, wait_for

from ..datapath import hostile as H
from .harness import DaemonProcess, LabSpec

WEB4, DB4, ROGUE4 = "10.213.0.10", "10.213.0.30", "10.213.0.66"
WEB6, DB6, ROGUE6 = "fd00:213::10", "fd00:213::30", "fd00:213::66"
FAKE_MAC = bytes.fromhex("02deadbeef66")  # only the hostile frames carry it
LAB = LabSpec([WorkloadSpec("web", 10), WorkloadSpec("db", 30), WorkloadSpec("rogue", 66)],
              prefix="msta", subnet4="10.213.0.0/24", subnet6="fd00:213::/64",
              serve={"db": {"tcp": [5432], "udp": [5433]}})

POLICY = f"""\
version: 1
default: deny
workloads:
  web: {{addresses: [{WEB4}, "{WEB6}"]}}
  db: {{addresses: [{DB4}, "{DB6}"]}}
  rogue: {{addresses: [{ROGUE4}, "{ROGUE6}"]}}
rules:
  - {{name: web-to-db, from: {{workload: web}}, to: {{workload: db}}, protocol: tcp,
     ports: [5432], action: allow}}
  - {{name: no-rogue, from: {{workload: rogue}}, to: {{workload: db}}, action: deny}}
"""

# Sniff db's eth0 until SIGTERM; print what came from the hostile MAC.
CAPTURE = r"""
import json, signal, socket, sys
mac = bytes.fromhex(sys.argv[1])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
s.bind(("eth0", 0))
s.settimeout(0.1)
seen = {"frames": 0, "hostile": 0, "samples": []}
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
print("ready", flush=True)
while not stop:
    try:
        data, addr = s.recvfrom(65535)
    except OSError:
        continue
    if addr[2] == socket.PACKET_OUTGOING:
        continue
    seen["frames"] += 1
    if data[6:12] == mac:
        seen["hostile"] += 1
        if len(seen["samples"]) < 5:
            seen["samples"].append(data[:80].hex())
print(json.dumps(seen), flush=True)
"""

# Send length-prefixed frames from a file on eth0 with scapy.
SENDER = r"""
import struct, sys
from scapy.all import Raw, sendp
data = open(sys.argv[1], "rb").read()
frames, at = [], 0
while at < len(data):
    (n,) = struct.unpack_from("!H", data, at)
    frames.append(Raw(data[at + 2:at + 2 + n]))
    at += 2 + n
sendp(frames, iface="eth0", verbose=False, inter=float(sys.argv[2]))
print(len(frames), flush=True)
"""

# TCP flag bytes by what the spec makes of them on a flow with no session
# (ECE/CWR are ignored by the validity check, so some carry them).
RULE_FLAGS = (0x02, 0x10, 0x18, 0x11, 0x04, 0x14, 0x19, 0xC2, 0x30, 0x58)
REPLY_FLAGS = (0x10, 0x18, 0x11, 0x04, 0x14, 0x19)
SYNACK_FLAGS = (0x12, 0x52, 0x92, 0xD2)
INVALID_FLAGS = (0x00, 0x03, 0x06, 0x01, 0x29, 0x3F, 0x16, 0x20)

RULE, STATE, INVALID, FRAGMENT = (("denied", "rule"), ("dropped", "state"),
                                  ("dropped", "invalid"), ("dropped", "fragment"))


def hostile_frames(db_mac: bytes, session: dict[int, tuple[str, int]],
                   seed: int = 0x1AB) -> list[tuple[tuple[str, str], str, bytes]]:
    """(expected (verdict, reason), label, frame) for every frame rogue sends.
    session[family] is web's live connection to db:5432 as (web ip, port)."""
    rng = random.Random(seed)
    out: list[tuple[tuple[str, str], str, bytes]] = []

    def add(expect: tuple[str, str], label: str, payload: bytes, etype: int,
            tags: list[tuple[int, int]] | None = None) -> None:
        out.append((expect, label, H.eth(etype, payload, tags or [], db_mac, FAKE_MAC)))

    for fam, rogue, db in ((4, ROGUE4, DB4), (6, ROGUE6, DB6)):
        v6 = fam == 6
        et = H.ETH_IPV6 if v6 else H.ETH_IP
        icmp_p = H.ICMPV6 if v6 else H.ICMP

        def ip(proto: int, l4: bytes, src: str = rogue, dst: str = db,
               **kw: object) -> bytes:
            return H.datagram(src, dst, proto, l4, **kw)

        def sport() -> int:
            return rng.randint(1024, 65535)

        # Denied by the rule: every valid flag class, to served and other ports.
        for flags in RULE_FLAGS:
            for _ in range(40):
                add(RULE, f"tcp {flags:#x}", ip(H.TCP, H.tcp(sport(), rng.choice(
                    (5432, 5432, 22, 80)), flags, payload=rng.randbytes(rng.randint(0, 64)))),
                    et)
        for flags in REPLY_FLAGS:  # replies of sessions that never were
            for _ in range(25):
                add(RULE, f"reply {flags:#x}", ip(H.TCP, H.tcp(5432, sport(), flags)), et)
        for _ in range(150):
            add(RULE, "udp", ip(H.UDP, H.udp(sport(), 5433, rng.randbytes(20))), et)
        for _ in range(50):
            add(RULE, "echo", ip(icmp_p, H.echo(sport(), v6=v6)), et)
            add(RULE, "echo-reply", ip(icmp_p, H.echo(sport(), v6=v6, reply=True)), et)
        for t in ((200, 201) if v6 else (13, 15, 17)):
            for _ in range(5):
                add(RULE, f"icmp type {t}", ip(icmp_p, H.icmp(t, 0, payload=b"x" * 16)), et)
        # The kernel takes the outer tag off before TC: up to three parse.
        for n in (1, 2, 3):
            for vid in (0, 5):
                for _ in range(5):
                    add(RULE, f"vlan*{n}", ip(H.TCP, H.tcp(sport(), 5432, H.SYN)), et,
                        [(H.TPID_8021Q, vid)] * n)
        for _ in range(10):
            if v6:
                add(RULE, "ext", H.ipv6(rogue, db, H.HOPOPTS, H.ext(H.HOPOPTS, H.DSTOPTS)
                                        + H.ext(H.DSTOPTS, H.TCP, 1)
                                        + H.with_checksum(rogue, db, H.TCP, H.tcp(
                                            sport(), 5432, H.SYN))), et)
            else:
                add(RULE, "ip-options", ip(H.TCP, H.tcp(sport(), 5432, H.SYN),
                                           options=b"\x01\x01\x01\x00"), et)
        # First fragments with whole headers, then their later fragments.
        for proto in (H.TCP, H.UDP):
            for _ in range(20):
                ident = rng.getrandbits(16)
                l4 = H.with_checksum(rogue, db, proto, H.tcp(sport(), 5432, H.SYN,
                                                             payload=bytes(64))
                                     if proto == H.TCP else H.udp(sport(), 5433, bytes(64)))
                frag = H.fragment6 if v6 else H.fragment4
                pieces = [(0, l4[:40]), (40, l4[40:64]), (64, l4[64:])]
                for off, chunk in pieces:
                    f = frag(rogue, db, proto, chunk, off, off < 64, ident, mac_dst=db_mac,
                             mac_src=FAKE_MAC)
                    out.append((RULE, f"fragment train {proto}", f))

        # A SYN-ACK whose SYN was never seen.
        for flags in SYNACK_FLAGS:
            for _ in range(50):
                add(STATE, f"syn-ack {flags:#x}", ip(H.TCP, H.tcp(sport(), 5432, flags)), et)

        # Malformed, each way the parser knows.
        for flags in INVALID_FLAGS:
            for _ in range(20):
                add(INVALID, f"flags {flags:#x}", ip(H.TCP, H.tcp(sport(), 5432, flags)), et)
        syn = H.with_checksum(rogue, db, H.TCP, H.tcp(sport(), 5432, H.SYN))
        for doff in (0, 1, 4, 6, 15):
            add(INVALID, f"doff {doff}", ip(H.TCP, H.tcp(sport(), 5432, H.SYN, doff=doff)), et)
        for cut in range(0, 20, 2):  # the TCP header cut, the IP length telling the truth
            add(INVALID, f"tcp cut {cut}", H.datagram(rogue, db, H.TCP, syn[:cut]), et)
        for ulen in (0, 7, 200):
            add(INVALID, f"udp len {ulen}", ip(H.UDP, H.udp(sport(), 5433, b"x" * 8,
                                                            ulen=ulen)), et)
        for n in (4, 5):  # three or more tags still in the frame at TC
            for vid in (0, 5):
                add(INVALID, f"vlan*{n}", ip(H.TCP, H.tcp(sport(), 5432, H.SYN)), et,
                    [(H.TPID_8021Q, vid)] * n)
        if v6:
            add(INVALID, "plen beyond", H.ipv6(rogue, db, H.TCP, syn, plen=400), et)
            add(INVALID, "version 4", b"\x40" + H.ipv6(rogue, db, H.TCP, syn)[1:], et)
            add(INVALID, "ext chain 9", H.ipv6(rogue, db, H.DSTOPTS, b"".join(
                H.ext(H.DSTOPTS, H.DSTOPTS if i < 8 else H.TCP) for i in range(9)) + syn), et)
            add(INVALID, "ext past payload", H.ipv6(rogue, db, H.DSTOPTS,
                                                    H.ext(H.DSTOPTS, H.TCP, 40) + syn,
                                                    plen=48), et)
        else:
            for ihl in (0, 1, 4):
                add(INVALID, f"ihl {ihl}", H.ipv4(rogue, db, H.TCP, syn, ihl=ihl), et)
            add(INVALID, "ihl 15", H.ipv4(rogue, db, H.TCP, syn[:20], ihl=15), et)
            for tot in (0, 12, 19, 400, 1500):
                add(INVALID, f"tot_len {tot}", H.ipv4(rogue, db, H.TCP, syn, tot_len=tot), et)
            add(INVALID, "version 6", H.ipv4(rogue, db, H.TCP, syn, version=6), et)
        frag = H.fragment6 if v6 else H.fragment4
        for cut in (1, 8, 12, 19):  # tiny first fragments
            out.append((INVALID, f"tiny first {cut}", frag(
                rogue, db, H.TCP, syn[:cut], 0, True, rng.getrandbits(16), mac_dst=db_mac,
                mac_src=FAKE_MAC)))
        for off in (8, 16):  # later fragments over the TCP header (RFC 1858)
            for _ in range(5):
                out.append((INVALID, f"tcp overlap @{off}", frag(
                    rogue, db, H.TCP, bytes(24), off, True, rng.getrandbits(16),
                    mac_dst=db_mac, mac_src=FAKE_MAC)))
        # ICMP errors to db quoting web's live connection: related only to web.
        wip, wport = session[fam]
        quote = H.datagram(wip, db, H.TCP, H.tcp(wport, 5432, H.ACK))
        for t in ((1, 2, 3, 4) if v6 else (3, 4, 5, 11, 12)):
            for _ in range(3):
                add(INVALID, f"icmp error {t} quoting web's session",
                    ip(icmp_p, H.icmp(t, rng.choice((0, 1, 3, 4)), b"\0" * 4, quote)), et)

        # Later fragments whose first never came.
        for proto, offs in ((H.UDP, (8, 16, 64, 1480)), (H.TCP, (24, 32, 1480)),
                            (icmp_p, (8, 512))):
            for off in offs:
                for _ in range(40):
                    out.append((FRAGMENT, f"orphan {proto}@{off}", frag(
                        rogue, db, proto, rng.randbytes(32), off, rng.random() < 0.5,
                        rng.getrandbits(16), mac_dst=db_mac, mac_src=FAKE_MAC)))
    return out


def drops(stats: dict) -> Counter[tuple[str, str]]:
    """Dropped packets by (verdict, reason), both directions, from /v1/stats."""
    out: Counter[tuple[str, str]] = Counter()
    for c in stats["counters"]:
        if c["verdict"] in ("denied", "dropped"):
            out[(c["verdict"], c["reason"])] += c["packets"]
    return out


class Hold:
    """web's long-lived connection to db:5432, exchanging a message every
    20 ms (`labtraffic hold`); a thread notes when each result came."""

    def __init__(self, lab: Lab, dst: str) -> None:
        self.proc = lab.spawn("web", [sys.executable, "-m", "microseg.lab.traffic", "hold",
                                      "tcp", dst, "5432", "--interval", "0.02",
                                      "--timeout", "0.5"], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "connected"
        self.results: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip():
                self.results.append((time.monotonic(), line.split()[0]))

    def stop(self) -> list[tuple[float, str]]:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self._reader.join(timeout=10)
        return self.results


def _session_ports(lab: Lab) -> dict[int, tuple[str, int]]:
    """web's end of each live connection to db:5432, by family."""
    out = lab.run("web", ["ss", "-Htn", "state", "established", "( dport = :5432 )"]).stdout
    ports = {}
    for line in out.splitlines():
        local = line.split()[-2]
        host, port = local.rsplit(":", 1)
        host = host.strip("[]")
        ports[6 if ":" in host else 4] = (host, int(port))
    assert set(ports) == {4, 6}, out
    return ports


def test_hostile_frames_never_reach_db_and_are_all_accounted(lab: Lab, daemon: DaemonProcess,
                                                            tmp_path: Path) -> None:
    db_mac = bytes.fromhex(lab.run("db", ["cat", "/sys/class/net/eth0/address"],
                                   check=True).stdout.strip().replace(":", ""))
    capture = lab.spawn("db", [sys.executable, "-c", CAPTURE, FAKE_MAC.hex()],
                        stdout=subprocess.PIPE, text=True)
    assert capture.stdout is not None and capture.stdout.readline().strip() == "ready"
    holds = [Hold(lab, DB4), Hold(lab, DB6)]
    frames = hostile_frames(db_mac, _session_ports(lab))
    assert len(frames) >= 3000
    path = tmp_path / "frames.bin"
    path.write_bytes(b"".join(struct.pack("!H", len(f)) + f for _e, _l, f in frames))

    before = drops(daemon.api("GET", "/v1/stats"))
    t0 = time.monotonic()
    sent = lab.run("rogue", [sys.executable, "-c", SENDER, str(path), "0.0003"], timeout=120,
                   check=True)
    t1 = time.monotonic()
    assert int(sent.stdout.strip()) == len(frames)
    expected = Counter(e for e, _l, _f in frames)

    def moved() -> Counter[tuple[str, str]]:
        now = drops(daemon.api("GET", "/v1/stats"))
        return Counter({k: now[k] - before[k] for k in now if now[k] != before[k]})

    wait_for(lambda: sum(moved().values()) >= len(frames), timeout=10, interval=0.2)

    # 1. Nothing from the hostile MAC arrived at db.
    capture.terminate()
    seen = json.loads(capture.communicate(timeout=10)[0].strip().splitlines()[-1])
    assert seen["hostile"] == 0, f"hostile frames reached db: {seen['samples']}"
    assert seen["frames"] > 0  # the capture did see web's traffic

    # 2. web's connections exchanged all along (one every 20 ms at most,
    # a miss of 0.5 s ends them), and a new one opens.
    for h in holds:
        results = h.stop()
        assert {r for _t, r in results} == {"ok"}, results[-5:]
        during = [t for t, _r in results if t0 <= t <= t1]
        assert len(during) >= (t1 - t0) / 0.1, (len(during), t1 - t0)
    assert lab.probe("web", "tcp", DB4, 5432) and lab.probe("web", "tcp", DB6, 5432)

    # 3. Every frame dropped once, under the reason its class calls for.
    got = moved()
    assert sum(got.values()) == len(frames), (got, expected)
    assert got == expected, {k: (got[k], expected[k]) for k in got | expected
                             if got[k] != expected[k]}
