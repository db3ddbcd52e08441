"""Echo servers and probes that run inside lab namespaces.

    python -m microseg.lab.traffic serve --tcp 80 --udp 53   # prints "ready"
    python -m microseg.lab.traffic probe tcp 10.203.0.20 80  # exit 0 if echoed
    python -m microseg.lab.traffic hold tcp 10.203.0.20 80   # one long-lived connection:
                                                            # a line per exchange, ok|timeout
    python -m microseg.lab.traffic flood udp 10.203.0.20 9 --count 100000  # as fast as it can
    python -m microseg.lab.traffic mix tcp,10.203.0.20,80,3 icmp,fd00:203::20  # forever: a
                                        # weighted random probe every --interval (demo traffic)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import sys
import time


class _UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.transport.sendto(data, addr)  # type: ignore[attr-defined]


async def _tcp_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def serve(tcp_ports: list[int], udp_ports: list[int]) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for port in tcp_ports:
        # One dual-stack socket per port: [::] also accepts IPv4.
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
        servers.append(await asyncio.start_server(_tcp_echo, sock=sock, backlog=1024))
    for port in udp_ports:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
        await loop.create_datagram_endpoint(_UdpEcho, sock=sock)
    print("ready", flush=True)
    await asyncio.Event().wait()


def probe(proto: str, host: str, port: int, timeout: float, payload: bytes = b"ping") -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(family, kind) as s:
        s.settimeout(timeout)
        try:
            s.connect((host, port))
            s.sendall(payload)
            return s.recv(len(payload)) == payload
        except OSError:
            return False


def hold(proto: str, host: str, port: int, interval: float, timeout: float,
         count: int) -> int:
    """Keep one connection (or UDP flow) and exchange a numbered message
    every `interval`: print `ok N` or `timeout N` for each, flushing."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(family, kind) as s:
        s.settimeout(timeout)
        try:
            s.connect((host, port))
        except OSError as e:
            print(f"connect-failed {e}", flush=True)
            return 1
        print("connected", flush=True)
        n = 0
        while count <= 0 or n < count:
            n += 1
            msg = f"{n:08d}".encode()
            try:
                s.sendall(msg)
                got = b""
                while len(got) < len(msg):
                    chunk = s.recv(len(msg) - len(got))
                    if not chunk:
                        raise OSError("closed")
                    got += chunk
                print(f"ok {n}" if got == msg else f"mismatch {n}", flush=True)
            except (TimeoutError, OSError):
                print(f"timeout {n}", flush=True)
                if proto == "tcp":
                    return 1  # a TCP stream cannot resync after a lost exchange
            time.sleep(interval)
    return 0


def flood(host: str, port: int, count: int, sources: int, rate: float = 0) -> int:
    """`count` small UDP datagrams from `sources` source ports (each a new
    flow to the firewall): as fast as the socket takes them, or `rate` per
    second."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks = [socket.socket(family, socket.SOCK_DGRAM) for _ in range(max(1, sources))]
    sent = 0
    t0 = time.monotonic()
    try:
        for i in range(count):
            if rate and i % 100 == 0:
                ahead = t0 + i / rate - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            try:
                socks[i % len(socks)].sendto(b"x", (host, port))
                sent += 1
            except (BlockingIOError, ConnectionRefusedError):
                pass
    finally:
        for s in socks:
            s.close()
    print(f"sent {sent}", flush=True)
    return 0


def parse_target(spec: str) -> tuple[str, str, int, float]:
    """PROTO,HOST[,PORT][,WEIGHT]: tcp,10.203.0.20,80,3  icmp,fd00:203::20,,2"""
    fields = spec.split(",")
    proto, host = fields[0], fields[1] if len(fields) > 1 else ""
    port = fields[2] if len(fields) > 2 else ""
    weight = float(fields[3]) if len(fields) > 3 and fields[3] else 1.0
    if proto not in ("tcp", "udp", "icmp") or not host:
        raise ValueError(f"target '{spec}': PROTO,HOST[,PORT][,WEIGHT] with tcp, udp or icmp")
    if proto != "icmp" and not port.isdigit():
        raise ValueError(f"target '{spec}': {proto} needs a port")
    return proto, host, int(port or 0), weight


def mix(targets: list[str], interval: float, timeout: float, seed: int | None) -> int:
    """Forever: a probe to a weighted random target every ~interval."""
    import random
    import subprocess

    rng = random.Random(seed)
    parsed = [parse_target(t) for t in targets]
    weights = [w for *_, w in parsed]
    while True:
        proto, host, port, _ = rng.choices(parsed, weights)[0]
        if proto == "icmp":
            subprocess.run(["ping", "-c", "1", "-W", "1", host], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
        else:
            probe(proto, host, port, timeout)
        time.sleep(interval * rng.uniform(0.5, 1.5))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m microseg.lab.traffic")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--tcp", type=int, action="append", default=[])
    s.add_argument("--udp", type=int, action="append", default=[])
    p = sub.add_parser("probe")
    p.add_argument("proto", choices=["tcp", "udp"])
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--timeout", type=float, default=1.0)
    h = sub.add_parser("hold")
    h.add_argument("proto", choices=["tcp", "udp"])
    h.add_argument("host")
    h.add_argument("port", type=int)
    h.add_argument("--interval", type=float, default=0.05)
    h.add_argument("--timeout", type=float, default=1.0)
    h.add_argument("--count", type=int, default=0, help="exchanges (0: until killed)")
    f = sub.add_parser("flood")
    f.add_argument("proto", choices=["udp"])
    f.add_argument("host")
    f.add_argument("port", type=int)
    f.add_argument("--count", type=int, default=10000)
    f.add_argument("--sources", type=int, default=1, help="source ports to spread over")
    f.add_argument("--rate", type=float, default=0, help="datagrams per second (0: no limit)")
    m = sub.add_parser("mix")
    m.add_argument("targets", nargs="+", metavar="PROTO,HOST[,PORT][,WEIGHT]")
    m.add_argument("--interval", type=float, default=0.3)
    m.add_argument("--timeout", type=float, default=0.3)
    m.add_argument("--seed", type=int)
    args = ap.parse_args(argv)
    if args.cmd == "mix":
        with contextlib.suppress(KeyboardInterrupt):
            return mix(args.targets, args.interval, args.timeout, args.seed)
        return 0
    if args.cmd == "serve":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(args.tcp, args.udp))
        return 0
    if args.cmd == "flood":
        return flood(args.host, args.port, args.count, args.sources, args.rate)
    if args.cmd == "hold":
        return hold(args.proto, args.host, args.port, args.interval, args.timeout, args.count)
    return 0 if probe(args.proto, args.host, args.port, args.timeout) else 1


if __name__ == "__main__":
    sys.exit(main())
