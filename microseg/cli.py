"""The `microseg` command line.

Errors are one line on stderr and a non-zero exit: 1 for a failed operation,
2 for a usage error, 3 for missing privileges. Colour only on a TTY and
never with NO_COLOR. Output to a closed pipe exits quietly.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import orjson

from microseg import __version__

if TYPE_CHECKING:
    from microseg.control.client import Client

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PRIVILEGES = 3


class CommandError(Exception):
    """A failed operation: its message is what the user sees."""

    def __init__(self, message: str, code: int = EXIT_FAILED,
                 usage: bool | None = None) -> None:
        super().__init__(message)
        self.code = code
        # Print the usage line too: for a misused command line, not for
        # every exit 2 (`policy diff` exits 2 whenever it cannot answer).
        self.usage = code == EXIT_USAGE if usage is None else usage


def use_colour(stream=sys.stdout) -> bool:
    return stream.isatty() and "NO_COLOR" not in os.environ


def _window(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds") from None
    if not 0 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"'{text}': between 0 and 3600 seconds")
    return value


def _size(text: str) -> int:
    """'16MiB', '1048576', '64k' -> bytes."""
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}.get(t[-1:], 1)
    digits = t[:-1] if t[-1:] in "kmg" else t
    try:
        return int(digits) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a size like 16MiB") from None


# -- microseg run -----------------------------------------------------------

def _run_time_stats(text: str) -> str:
    from microseg.control.runstats import parse_mode

    try:
        parse_mode(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _etcd_config(args: argparse.Namespace):
    """--etcd and its companions, checked (ValueError: one line)."""
    from microseg.control.config import EtcdConfig

    tls = (args.etcd_cacert, args.etcd_cert, args.etcd_key)
    if args.etcd is None:
        if args.policy == "etcd":
            raise ValueError("--policy etcd: the policy comes from etcd: give --etcd ENDPOINT")
        if args.node or any(tls):
            raise ValueError("--node and --etcd-* options need --etcd ENDPOINT")
        return None
    from microseg.cluster.etcd import check_endpoints, check_prefix
    from microseg.cluster.node import MIN_TTL, check_node_name

    if bool(args.etcd_cert) != bool(args.etcd_key):
        raise ValueError("--etcd-cert and --etcd-key go together")
    for flag, path in zip(("--etcd-cacert", "--etcd-cert", "--etcd-key"), tls, strict=True):
        if path is not None and not os.path.isfile(path):
            raise ValueError(f"{flag} {path}: no such file")
    if args.etcd_ttl < MIN_TTL:
        raise ValueError(f"--etcd-ttl {args.etcd_ttl}: at least {MIN_TTL} seconds")
    endpoints = [e for e in args.etcd.split(",") if e.strip()]
    cfg = EtcdConfig(endpoints=endpoints, node=args.node or "", prefix=args.etcd_prefix,
                     ttl=args.etcd_ttl, cacert=args.etcd_cacert, cert=args.etcd_cert,
                     key=args.etcd_key)
    import ssl

    from microseg.cluster.etcd import TLSFiles

    cfg.endpoints = check_endpoints(endpoints, TLSFiles(*tls))
    try:  # the files themselves: one line now, not a traceback at start
        TLSFiles(*tls).context()
    except (ssl.SSLError, OSError) as e:
        raise ValueError(f"--etcd-cacert/--etcd-cert/--etcd-key: {e}") from None
    check_prefix(cfg.prefix)
    check_node_name(cfg.node_name())
    return cfg


def cmd_run(args: argparse.Namespace) -> int:
    if not args.interface:
        raise CommandError("run: give at least one -i/--interface (name or glob)", EXIT_USAGE)
    # A cold start's compile begins now, while the daemon's modules import
    # and its configuration is checked (docs/how-it-works.md "Start and
    # restart"); a start refused meanwhile undoes it.
    from microseg.kernel.loader import DatapathConfig, Preload

    preload = Preload.begin(DatapathConfig(
        pin_dir=args.pin_dir, session_capacity=args.session_capacity,
        ringbuf_bytes=args.ringbuf_bytes)) if os.geteuid() == 0 else None
    try:
        from microseg.control.client import default_socket
        from microseg.control.config import RunConfig
        from microseg.control.daemon import run
        from microseg.exporters.prometheus import parse_listen
        from microseg.flow.sweeper import parse_timeouts

        try:
            timeouts = parse_timeouts(args.timeout)
            metrics = parse_listen(args.metrics)
            etcd = _etcd_config(args)
        except ValueError as e:
            raise CommandError(str(e), EXIT_USAGE) from None
        return run(RunConfig(
            interfaces=args.interface, policy_path=args.policy,
            policy_default_audit=args.policy_default == "audit",
            insecure_policy_permissions=args.insecure_policy_permissions,
            socket_path=args.socket or default_socket(), socket_group=args.socket_group,
            pin_dir=args.pin_dir, keep_on_exit=args.keep_on_exit,
            session_capacity=args.session_capacity, ringbuf_bytes=args.ringbuf_bytes,
            flow_log=args.flow_log, flow_log_max_bytes=args.flow_log_max_bytes,
            flow_log_keep=args.flow_log_keep, timeouts=timeouts,
            sweep_interval=args.sweep_interval, metrics=metrics,
            event_window=args.event_window, run_time_stats=args.run_time_stats, etcd=etcd),
            preload=preload)
    finally:
        if preload is not None:
            preload.discard()  # nothing, once the daemon took it


# -- microseg watch / sessions / stats ---------------------------------------

def _write_line(data: bytes) -> None:
    sys.stdout.buffer.write(data)


def cmd_watch(args: argparse.Namespace) -> int:
    from microseg.control.render import event_line
    from microseg.flow.filters import Filter, FilterError

    params = {"type": args.type, "verdict": args.verdict, "ip": args.ip,
              "from_ip": args.from_ip, "to_ip": args.to_ip, "port": args.port,
              "protocol": args.protocol, "workload": args.workload, "rule": args.rule}
    try:
        Filter.parse(params)  # the daemon checks too; a usage error is ours to report
    except FilterError as e:
        raise CommandError(str(e), EXIT_USAGE) from None
    as_json = args.output == "json"
    colour = use_colour()

    async def go(c: Client) -> int:
        seen = 0
        out = sys.stdout.buffer
        async for lines in c.stream_lines("/v1/events", last=args.last or None,
                                          follow=0 if args.no_follow else None,
                                          count=args.count or None, **params):
            if args.count:  # stop exactly after N events that are not `lost`
                keep = []
                for line in lines:
                    keep.append(line)
                    if b'"type":"lost"' not in line:
                        seen += 1
                        if seen >= args.count:
                            break
                lines = keep
            if as_json:  # the daemon's lines are the schema: pass them through
                out.write(b"".join(lines))
            else:
                out.write("".join(event_line(orjson.loads(x), colour) + "\n"
                                  for x in lines).encode())
            out.flush()
            if args.count and seen >= args.count:
                break
        return 0

    try:
        return int(_daemon(args, go) or 0)  # type: ignore[arg-type]
    except KeyboardInterrupt:
        return 0


def cmd_sessions(args: argparse.Namespace) -> int:
    from microseg.control.render import session_line
    from microseg.flow.filters import SESSION_KEYS, Filter, FilterError

    params = {"protocol": args.protocol, "state": args.state, "ip": args.ip,
              "workload": args.workload}
    try:
        Filter.parse(params, SESSION_KEYS)
    except FilterError as e:
        raise CommandError(str(e), EXIT_USAGE) from None

    async def go(c: Client) -> int:
        n = 0
        async for lines in c.stream_lines("/v1/sessions", **params):
            n += len(lines)
            if args.json:  # the daemon's rows are the format: pass them through
                _write_line(b"".join(lines))
            else:
                _write_line("".join(session_line(orjson.loads(x)) + "\n"
                                    for x in lines).encode())
        if not args.json:
            print(f"{n} session{'s' if n != 1 else ''}", file=sys.stderr)
        return 0

    return int(_daemon(args, go) or 0)  # type: ignore[arg-type]


def cmd_stats(args: argparse.Namespace) -> int:
    from microseg.control.render import human_bytes

    st = _daemon(args, lambda c: c.get("/v1/stats"))
    assert isinstance(st, dict)
    if args.json:
        _write_line(orjson.dumps(st, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE))
        return 0
    pk = st["packets"]
    rates = st["rates_since_start_pps"]
    print(f"uptime {st['uptime_s']:.0f}s, policy generation {st['policy']['generation']} "
          f"({st['policy']['reloads_total']} reloads, "
          f"{st['policy']['reload_failures_total']} rejected)")
    print("packets " + "  ".join(f"{k} {pk.get(k, 0)} ({rates.get(k, 0):.1f}/s)"
                                 for k in ("allowed", "denied", "audit", "dropped")))
    if st["drops"]:
        print("drops   " + "  ".join(f"{k} {v}" for k, v in sorted(st["drops"].items())))
    se = st["sessions"]
    print(f"sessions {se['entries']} of {se['capacity']} ({se['fill'] * 100:.2f}% full), "
          f"{se['expired_total']} expired; " + ", ".join(
              f"{k} {v}" for k, v in sorted(se["by_state"].items())))
    ev = st["events"]
    print(f"events  {sum(ev['published'].values())} published, lost {ev['lost']['ringbuf']} "
          f"(ring buffer) / {ev['lost']['subscriber']} (slow clients)")
    dp = st["datapath"]
    avg = f"{dp['avg_ns_per_packet']:.0f} ns/packet over {dp['runs']} runs" \
        if dp["avg_ns_per_packet"] is not None else "no packets yet"
    rts = dp.get("run_time_stats")  # the runs counted: docs/metrics.md
    if rts and rts["mode"] == "sampled":
        avg += f" (sampled: {rts['window_s']:g} s every {rts['period_s']:g} s)"
    elif rts and rts["mode"] == "off":
        avg = "not measured (--run-time-stats off)"
    load = dp.get("load")
    if load and load["programs"] == "reused":
        avg += "; programs reused from pins (no compile)"
    elif load:
        avg += f"; programs compiled in {load['compile_s']:.1f} s, verified in " \
               f"{load['load_s']:.1f} s"
    print(f"datapath {avg}")
    fl = st.get("flow_log")
    if fl:
        print(f"flow log {fl['path']}: {fl['lines']} lines, {human_bytes(fl['bytes'])}, "
              f"{fl['write_errors']} write errors, {fl['rotations']} rotations")
    return 0


# -- microseg policy ... ----------------------------------------------------

def cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from microseg.lab.demo import run

    if args.hosts == 2 and args.learn:
        raise CommandError("demo: --learn runs on one host (without --hosts 2)", EXIT_USAGE)
    demo = None
    if args.hosts == 2:
        from microseg.lab.demo_hosts import HostsDemo

        # Each daemon's metrics are on its own host's loopback: no port taken here.
        demo = HostsDemo(Path(args.policy), args.socket, "127.0.0.1:9750")
    return run(args.duration, Path(args.policy), args.socket, learn=args.learn, demo=demo)


def cmd_top(args: argparse.Namespace) -> int:
    if args.synthetic is None:
        # One line and exit 1 when there is no daemon to show.
        _daemon(args, lambda c: c.get("/v1/status"))
    from microseg.tui.app import TopApp
    from microseg.tui.source import DaemonSource, SyntheticSource

    source = SyntheticSource(rate=args.synthetic) if args.synthetic is not None \
        else DaemonSource(args.socket)
    app = TopApp(source)
    app.run()
    return 0


def _daemon(args: argparse.Namespace, coro: Callable[[Client], object]) -> object:
    # Imported here: aiohttp is a tenth of a second that `microseg run`
    # spends compiling instead (cmd_run).
    from microseg.control.client import Client, DaemonError

    async def go() -> object:
        async with Client(args.socket) as c:
            return await coro(c)

    try:
        return asyncio.run(go())
    except DaemonError as e:
        raise CommandError(str(e), EXIT_PRIVILEGES if e.privileges else EXIT_FAILED) from None


def cmd_policy_check(args: argparse.Namespace) -> int:
    from microseg.policy.parse import PolicyError, load_policy_file

    try:
        loaded = load_policy_file(args.file)
    except PolicyError as e:
        for issue in e.issues:
            print(issue.format(args.file), file=sys.stderr)
        n = e.error_count
        print(f"{args.file}: {n:,} error{'s' if n != 1 else ''}", file=sys.stderr)
        return EXIT_FAILED
    for w in loaded.warnings:
        print(w.format(args.file), file=sys.stderr)
    p = loaded.policy
    if p.discover.docker_socket:
        from microseg.inventory.docker import DockerSocketError, check_socket

        try:
            check_socket(p.discover.docker_socket)
        except DockerSocketError as e:
            print(f"{args.file}: discover: {e}", file=sys.stderr)
            return EXIT_FAILED
    found = f", discovering from docker at {p.discover.docker_socket}" \
        if p.discover.docker_socket else ""
    print(f"{args.file}: valid ({len(p.workloads)} workloads, {len(p.rules)} rules, "
          f"{p.mode}, default {p.default}{found})")
    return 0


def cmd_workloads(args: argparse.Namespace) -> int:
    async def go(c: Client) -> list[bytes]:
        out: list[bytes] = []
        async for lines in c.stream_lines("/v1/workloads", source=args.source or None):
            out.extend(lines)
        return out

    lines = _daemon(args, go)
    assert isinstance(lines, list)
    if args.json:  # the daemon's rows are the format: pass them through
        _write_line(b"".join(lines))
        return 0
    ws = [orjson.loads(line) for line in lines]
    nodes = any("node" in w for w in ws)  # run --etcd: where each one runs
    rows = [("NAME", "SOURCE", *(("NODE",) if nodes else ()), "ADDRESSES", "SESSIONS",
             "LABELS")]
    for w in ws:
        rows.append((w["workload"], w["source"], *((w.get("node", "-"),) if nodes else ()),
                     ",".join(w["addresses"]) or "-", str(w["sessions"]),
                     ",".join(f"{k}={v}" for k, v in sorted(w["labels"].items())) or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])
    print(f"{len(rows) - 1} workload{'s' if len(rows) != 2 else ''}", file=sys.stderr)
    return 0


def cmd_policy_show(args: argparse.Namespace) -> int:
    show = _daemon(args, lambda c: c.get("/v1/policy"))
    assert isinstance(show, dict)
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(show, option=orjson.OPT_INDENT_2) + b"\n")
        return 0
    print(f"generation {show['generation']}  {show.get('mode')}, default {show.get('default')}")
    print(f"source     {show.get('source')}")
    print(f"sha256     {show.get('sha256')}")
    print(f"loaded at  {show.get('loaded_at')}")
    wl = show.get("workloads", [])
    print(f"workloads  {len(wl)}: " + ", ".join(w["name"] for w in wl))
    rules = show.get("rules", [])
    print(f"rules      {len(rules)}")
    if rules:
        rows = [("NAME", "ACTION", "FROM", "TO", "PROTO", "PORTS", "HITS", "LAST HIT")]
        for r in rules:
            rows.append((r["name"], r["action"], ",".join(r["from"]), ",".join(r["to"]),
                         r["protocol"], ",".join(r["ports"]) or "*", str(r["hits"]),
                         r["last_hit"] or "never"))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    never = show.get("never_hit", [])
    print(f"never hit  {', '.join(never) if never else '-'}")
    return 0


def _apply_text(args: argparse.Namespace, data: bytes, label: str) -> int:
    """Validate, write over the daemon's policy file, reload, report."""
    from microseg.policy.edit import write_atomically
    from microseg.policy.parse import PolicyError, parse_policy

    try:
        loaded = parse_policy(data, label)
    except PolicyError as e:
        for issue in e.issues:
            print(issue.format(label), file=sys.stderr)
        raise CommandError(f"{label}: invalid, not applied") from None

    async def go(c: Client) -> dict:
        status = await c.get("/v1/status")
        path = _policy_file(status)
        if os.path.realpath(path) != os.path.realpath(label) or not os.path.exists(label):
            write_atomically(path, data)
        return await c.post("/v1/policy/reload")

    try:
        res = _daemon(args, go)
    except PermissionError as e:
        raise CommandError(f"cannot write the daemon's policy file: {e}", EXIT_PRIVILEGES) \
            from None
    assert isinstance(res, dict)
    if res["result"] == "rejected":
        for err in res["errors"]:
            print(err, file=sys.stderr)
        raise CommandError(f"the daemon refused the policy; generation {res['generation']} "
                           "is still enforced")
    if res.get("sha256") not in (None, loaded.sha256):
        raise CommandError("the policy file changed again while applying; check "
                           "`microseg policy show`")
    took = f", applied in {res['apply_ms']:.0f} ms" if res["result"] == "applied" else ""
    print(f"generation {res['generation']} active ({res['rules']} rules, "
          f"{res['workloads']} workloads{took})")
    for w in loaded.warnings:
        print(w.format(label), file=sys.stderr)
    return 0


CLUSTER_POLICY = "etcd"  # `run --policy etcd`: the daemon's policy path


def _policy_file(status: dict) -> str:
    """The daemon's policy file; a daemon enforcing the cluster policy has none."""
    path = status["policy"]["path"]
    if path == CLUSTER_POLICY:
        raise CommandError("the daemon enforces the cluster policy (run --policy etcd): "
                           "change it with `microseg policy apply --cluster FILE`")
    return path


def _read_policy_arg(path: str) -> bytes:
    """A policy file named on the command line: a regular file, read up to
    just past the limit (the parse refuses more, with its line) — a FIFO or
    /dev/zero is one line, not a hang or a MemoryError."""
    from microseg.policy.parse import MAX_FILE_BYTES, open_policy_file

    try:
        with open_policy_file(path) as f:
            return f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise CommandError(f"{path}: {e.strerror or e}") from None


def cmd_policy_apply(args: argparse.Namespace) -> int:
    if args.cluster:
        return _apply_cluster(args, _read_policy_arg(args.file), args.file)
    return _apply_text(args, _read_policy_arg(args.file), args.file)


# How long `policy apply --cluster` waits for its daemon to enforce the new
# policy (when that daemon runs with --policy etcd).
CLUSTER_APPLY_WAIT_S = 10.0


def _apply_cluster(args: argparse.Namespace, data: bytes, label: str) -> int:
    """Validate here, store in etcd through the daemon, wait until that
    daemon enforces it if it follows the cluster policy."""
    from microseg.policy.parse import PolicyError, parse_policy

    try:
        loaded = parse_policy(data, label)
    except PolicyError as e:
        for issue in e.issues:
            print(issue.format(label), file=sys.stderr)
        raise CommandError(f"{label}: invalid, not applied") from None

    async def go(c: Client) -> tuple[dict, dict | None]:
        res = await c.post("/v1/policy/cluster", body=data, source=label)
        deadline = time.monotonic() + CLUSTER_APPLY_WAIT_S
        while True:
            pol = (await c.get("/v1/status"))["policy"]
            if pol["path"] != CLUSTER_POLICY:
                return res, None
            if pol["sha256"] == res["sha256"] or time.monotonic() > deadline:
                return res, pol
            await asyncio.sleep(0.05)

    res, pol = _daemon(args, go)
    print(f"stored in etcd at revision {res['revision']} ({res['rules']} rules, "
          f"{res['workloads']} workloads, sha256 {res['sha256'][:12]})")
    if pol is not None:
        if pol["sha256"] != res["sha256"]:
            raise CommandError(f"stored, but this daemon still enforces generation "
                               f"{pol['generation']} after {CLUSTER_APPLY_WAIT_S:.0f} s; see "
                               "`microseg nodes` and its log")
        print(f"generation {pol['generation']} active here; `microseg nodes` shows every "
              "node's")
    for w in loaded.warnings:
        print(w.format(label), file=sys.stderr)
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    async def go(c: Client) -> tuple[list[bytes], dict]:
        out: list[bytes] = []
        async for lines in c.stream_lines("/v1/nodes"):
            out.extend(lines)
        return out, (await c.get("/v1/status")).get("etcd") or {}

    lines, etcd = _daemon(args, go)
    if etcd and not etcd.get("up"):
        print(f"etcd unreachable since {etcd.get('since')} ({etcd.get('last_error')}): "
              "the last known state", file=sys.stderr)
    if args.json:
        _write_line(b"".join(lines))
        return 0
    rows = [("NODE", "HEARTBEAT", "POLICY", "GENERATION", "WORKLOADS", "VERSION")]
    for line in lines:
        n = orjson.loads(line)
        rows.append((n["node"] + (" (this)" if n.get("self") else ""), n["heartbeat"] or "-",
                     (n["policy_sha256"] or "-")[:12], str(n["policy_generation"]),
                     str(n["workloads"]), n["version"] or "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    shas = {orjson.loads(line)["policy_sha256"] for line in lines}
    print(f"{len(lines)} node{'s' if len(lines) != 1 else ''}, "
          + ("converged on one policy" if len(shas) == 1 else
             f"{len(shas)} different policies"), file=sys.stderr)
    return 0


def _edit(args: argparse.Namespace, change: Callable[[str, str], str]) -> int:
    from microseg.policy.edit import EditError, write_atomically
    from microseg.policy.parse import PolicyError, parse_policy

    path = args.file
    if path is None:
        status = _daemon(args, lambda c: c.get("/v1/status"))
        assert isinstance(status, dict)
        path = _policy_file(status)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise CommandError(f"{path}: {e.strerror}") from None
    try:
        new = change(text, path)
        parse_policy(new.encode(), path)
    except EditError as e:
        raise CommandError(str(e)) from None
    except PolicyError as e:
        for issue in e.issues:
            print(issue.format(path), file=sys.stderr)
        raise CommandError(f"{path}: the edit would make the policy invalid; file unchanged") \
            from None
    write_atomically(path, new.encode())
    print(f"{path}: updated")
    if args.file is not None and args.no_apply:
        return 0
    return _apply_text(args, new.encode(), path)


def cmd_rule_add(args: argparse.Namespace) -> int:
    from microseg.policy.edit import add_rule

    return _edit(args, lambda text, path: add_rule(
        text, path, name=args.name, sources=args.src, destinations=args.dst,
        action=args.action, protocol=args.protocol, ports=args.ports))


def cmd_rule_delete(args: argparse.Namespace) -> int:
    from microseg.policy.edit import delete_rule

    return _edit(args, lambda text, path: delete_rule(text, path, args.name))


def cmd_version(args: argparse.Namespace) -> int:
    print(f"microseg {__version__}")
    return 0


# -- the parser -----------------------------------------------------------------

def _socket_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", metavar="PATH", default=None,
                   help="the daemon's control socket (default: $MICROSEG_SOCKET, else "
                        "/run/microseg/microseg.sock)")


def _lazy(target: str) -> Callable[[argparse.Namespace], int]:
    """A command implemented in another module, imported when it runs (the
    CLI starts fast: most commands never import the policy tooling)."""
    def run(args: argparse.Namespace) -> int:
        import importlib

        module, _, name = target.partition(":")
        return getattr(importlib.import_module(module), name)(args)
    return run


def _lifecycle_parsers(psub: argparse._SubParsersAction) -> None:
    """learn -> stage -> enforce (docs/policy.md "Policy lifecycle")."""
    p = psub.add_parser(
        "suggest", help="write a policy that allows exactly the flows observed",
        description="From the daemon's flow aggregate, or from flow log files (rotated and "
                    ".gz ones too): a complete policy file that allows what was observed and "
                    "nothing else, each rule commented with what was seen.")
    p.add_argument("--flow-log", nargs="+", metavar="FILE", help="read these flow log files "
                   "instead of asking the daemon")
    p.add_argument("--file", metavar="FILE", help="the policy whose workloads and discover "
                   "section the suggestion keeps (default: the daemon's active policy)")
    p.add_argument("-o", "--output", metavar="FILE", help="write here (default: stdout)")
    p.add_argument("--mode", choices=["enforce", "audit"], default="enforce",
                   help="the mode of the written policy (default: enforce)")
    _socket_option(p)
    p.set_defaults(func=_lazy("microseg.cli_learn:cmd_policy_suggest"))

    p = psub.add_parser(
        "stage", help="load a candidate policy beside the active one; status, promote, clear",
        description="`stage FILE` loads FILE as the staged policy: every new session is "
                    "judged by both, the active one decides, and verdicts the candidate would "
                    "change are marked. `stage status [--json]`, `stage promote` (make it the "
                    "active policy: written to the policy file), `stage clear`.")
    p.add_argument("what", metavar="FILE|status|promote|clear")
    p.add_argument("--json", action="store_true", help="with status: JSON output")
    _socket_option(p)
    p.set_defaults(func=cmd_policy_stage)

    p = psub.add_parser(
        "trace", help="what would happen to this connection? verdict, rule, and why",
        description="ADDR is an IP address; WORKLOAD a workload's name (its first address). "
                    "Against the daemon's active policy, or --file offline.")
    p.add_argument("--from", dest="src", required=True, metavar="ADDR|WORKLOAD")
    p.add_argument("--to", dest="dst", required=True, metavar="ADDR|WORKLOAD")
    p.add_argument("--protocol", default="tcp",
                   help="tcp, udp, icmp, icmpv6 or a number (default: tcp)")
    p.add_argument("--port", type=int, metavar="N", help="destination port (tcp/udp)")
    p.add_argument("--file", metavar="FILE", help="trace against this policy file, offline")
    p.add_argument("--json", action="store_true", help="one JSON object")
    _socket_option(p)
    p.set_defaults(func=_lazy("microseg.cli_trace:cmd_policy_trace"))

    p = psub.add_parser(
        "diff", help="which observed flows would a candidate policy judge otherwise?",
        description="Replays the observed flows (the daemon's flow aggregate, or --flow-log "
                    "files) against CANDIDATE and the baseline (the daemon's active policy, "
                    "or --against FILE), both evaluated afresh. Exit 0: nothing changes; "
                    "1: some flows change; 2: usage error. Usable as a CI gate.")
    p.add_argument("candidate", metavar="CANDIDATE")
    p.add_argument("--against", metavar="FILE", help="the baseline policy file (offline)")
    p.add_argument("--flow-log", nargs="+", metavar="FILE", help="replay these flow log "
                   "files instead of the daemon's flow aggregate")
    p.add_argument("--json", action="store_true", help="JSON output")
    _socket_option(p)
    p.set_defaults(func=_lazy("microseg.cli_learn:cmd_policy_diff"))


STAGE_ACTIONS = ("status", "promote", "clear")


def cmd_policy_stage(args: argparse.Namespace) -> int:
    if args.what not in STAGE_ACTIONS:
        if args.json:
            raise CommandError("policy stage FILE: --json is for `stage status`", EXIT_USAGE)
        return _stage_file(args, args.what)
    if args.json and args.what != "status":
        raise CommandError(f"policy stage {args.what}: --json is for `stage status`",
                           EXIT_USAGE)
    if args.what == "status":
        return _stage_status(args)
    path = "/v1/policy/staged/" + args.what
    try:
        res = _daemon(args, lambda c: c.post(path))
    except CommandError as e:
        if "nothing is staged" in str(e):
            raise CommandError(f"policy stage {args.what}: nothing is staged") from None
        raise
    assert isinstance(res, dict)
    if args.what == "clear":
        print(f"staged policy cleared ({res['source']}); new flows are judged by the active "
              "policy only")
        return 0
    if res["result"] != "applied":
        for err in res["errors"]:
            print(err, file=sys.stderr)
        raise CommandError(f"the daemon refused the staged policy; generation "
                           f"{res['generation']} is still enforced and the candidate stays "
                           "staged")
    print(f"promoted: generation {res['generation']} active ({res['rules']} rules, "
          f"{res['workloads']} workloads, applied in {res['apply_ms']:.0f} ms); "
          "nothing staged")
    return 0


def _stage_file(args: argparse.Namespace, path: str) -> int:
    from microseg.policy.parse import PolicyError, parse_policy

    data = _read_policy_arg(path)
    try:  # every error here, without a daemon; the daemon checks again
        parse_policy(data, path)
    except PolicyError as e:
        for issue in e.issues:
            print(issue.format(path), file=sys.stderr)
        raise CommandError(f"{path}: invalid, nothing staged") from None
    res = _daemon(args, lambda c: c.post("/v1/policy/stage", body=data,
                                         source=os.path.abspath(path)))
    assert isinstance(res, dict)
    if res["result"] != "staged":
        for err in res["errors"]:
            print(err, file=sys.stderr)
        raise CommandError(f"{path}: refused by the daemon, nothing changed")
    for w in res["warnings"]:
        print(w, file=sys.stderr)
    print(f"staged {path} ({res['rules']} rules, {res['workloads']} workloads, loaded in "
          f"{res['apply_ms']:.0f} ms): new flows are judged by it too; the active policy "
          "decides. `microseg policy stage status` shows what it would change.")
    return 0


def _stage_status(args: argparse.Namespace) -> int:
    from microseg.control.render import staged_status_lines

    doc = _daemon(args, lambda c: c.get("/v1/policy/staged"))
    assert isinstance(doc, dict)
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
        return 0
    print("\n".join(staged_status_lines(doc["staged"], colour=use_colour())))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from microseg.flow.sweeper import DEFAULT_TIMEOUTS

    ap = argparse.ArgumentParser(
        prog="microseg",
        description="Event-driven, observability-first microsegmentation firewall "
                    "(TC eBPF).")
    ap.add_argument("--version", action="version", version=f"microseg {__version__}")
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("run", help="the daemon: attach, enforce, report",
                       description="Run the daemon: load the datapath, attach it to the "
                                   "interfaces, enforce the policy file and follow its "
                                   "changes, serve the control socket.")
    p.add_argument("-i", "--interface", action="append", default=[], metavar="NAME",
                   help="interface name or shell glob (veth*, msd-*); repeatable; "
                        "links that appear later and match are attached too")
    p.add_argument("--policy", default="/etc/microseg/policy.yaml", metavar="FILE",
                   help="policy file, or 'etcd': the cluster policy (with --etcd; "
                   "`policy apply --cluster` stores it) (default: %(default)s)")
    p.add_argument("--policy-default", choices=["audit"], default=None,
                   help="with no policy file yet, run the built-in policy: default allow "
                        "in audit mode (observe everything, enforce nothing)")
    p.add_argument("--insecure-policy-permissions", action="store_true",
                   help="use a policy file that users other than root could change "
                   "(refused otherwise, like sshd's StrictModes); warned at every reload")
    _socket_option(p)
    p.add_argument("--socket-group", metavar="GROUP",
                   help="let this group use the control socket (mode 0660)")
    p.add_argument("--pin-dir", default="/sys/fs/bpf/microseg", metavar="DIR",
                   help="where maps are pinned (default: %(default)s)")
    p.add_argument("--keep-on-exit", action="store_true",
                   help="leave the datapath attached and enforcing when the daemon stops")
    p.add_argument("--session-capacity", type=int, default=1 << 20, metavar="N",
                   help="session table size (default: %(default)s)")
    p.add_argument("--ringbuf-bytes", type=_size, default=16 << 20, metavar="N",
                   help="size of each of the two event ring buffers (events; denials and "
                   "drops), a power of two (default: 16MiB)")
    p.add_argument("--flow-log", metavar="FILE", help="append every event to FILE as NDJSON")
    p.add_argument("--flow-log-max-bytes", type=_size, default=100 << 20, metavar="N",
                   help="rotate the flow log at this size (default: 100MiB)")
    p.add_argument("--flow-log-keep", type=int, default=5, metavar="N",
                   help="rotated flow logs to keep (default: %(default)s)")
    p.add_argument("--timeout", action="append", default=[], metavar="NAME=SECONDS",
                   help="idle timeout of a kind of session; repeatable. Names and defaults: "
                   + " ".join(f"{k}={v:g}" for k, v in DEFAULT_TIMEOUTS.items())
                   + " (*_unreplied: sessions that have seen one direction only)")
    p.add_argument("--sweep-interval", type=float, default=5.0, metavar="SECONDS",
                   help="how often idle sessions are expired (default: %(default)s)")
    p.add_argument("--event-window", type=_window, default=1.0, metavar="SECONDS",
                   help="repeated denials and drops of one flow within this window are "
                   "reported as one event with a count; 0: every packet its own event "
                   "(default: %(default)s)")
    p.add_argument("--run-time-stats", type=_run_time_stats, default="1/15",
                   metavar="WINDOW/PERIOD|on|off",
                   help="the kernel's BPF run-time statistics (datapath ns/packet) cost "
                   "every packet while on: on for WINDOW seconds every PERIOD, or for the "
                   "whole run, or never (default: %(default)s)")
    g = p.add_argument_group("many hosts (docs/many-hosts.md)")
    g.add_argument("--etcd", metavar="ENDPOINT[,ENDPOINT...]",
                   help="share workload identities (and, with --policy etcd, the policy) "
                   "with other nodes through etcd, e.g. https://10.0.0.5:2379")
    g.add_argument("--node", metavar="NAME", help="this node's name (default: the host name)")
    g.add_argument("--etcd-prefix", default="/microseg/", metavar="PREFIX",
                   help="the only keys microseg reads and writes (default: %(default)s)")
    g.add_argument("--etcd-ttl", type=int, default=30, metavar="SECONDS",
                   help="this node's lease: its workloads vanish from other nodes this "
                   "long after it stops answering (min 5, default: %(default)s)")
    g.add_argument("--etcd-cacert", metavar="FILE", help="CA certificate to trust etcd by")
    g.add_argument("--etcd-cert", metavar="FILE", help="client certificate (TLS)")
    g.add_argument("--etcd-key", metavar="FILE", help="client certificate's key")
    p.add_argument("--metrics", default="127.0.0.1:9750", metavar="ADDR",
                   help="Prometheus listener, HOST:PORT or [IPV6]:PORT (port 0: any free "
                   "port, shown by /v1/status), or 'off' (default: %(default)s)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("watch", help="stream events from the daemon (like hubble observe)",
                       description="Stream events. Filters combine with AND and are applied "
                                   "in the daemon.")
    p.add_argument("-o", "--output", choices=["compact", "json"], default="compact",
                   help="compact lines (default) or the JSON schema, one object per line")
    p.add_argument("--json", dest="output", action="store_const", const="json",
                   help="same as -o json")
    p.add_argument("--type", choices=["verdict", "session", "drop", "policy", "lost",
                                      "workload"])
    p.add_argument("--verdict", choices=["allowed", "denied", "audit", "dropped"])
    p.add_argument("--ip", metavar="CIDR", help="source or destination in CIDR")
    p.add_argument("--from-ip", metavar="CIDR", help="source in CIDR")
    p.add_argument("--to-ip", metavar="CIDR", help="destination in CIDR")
    p.add_argument("--port", metavar="N", help="source or destination port")
    p.add_argument("--protocol", metavar="P", help="tcp, udp, icmp, icmpv6 or a number")
    p.add_argument("--workload", metavar="NAME", help="source or destination workload")
    p.add_argument("--rule", metavar="NAME", help="the deciding rule")
    p.add_argument("--last", type=int, default=0, metavar="N",
                   help="first print up to N recent events the daemon kept")
    p.add_argument("--no-follow", action="store_true", help="exit after --last")
    p.add_argument("--count", type=int, default=0, metavar="N",
                   help="exit after N matching events")
    _socket_option(p)
    p.set_defaults(func=cmd_watch)

    from microseg.lab import DEMO_POLICY

    p = sub.add_parser("demo", help="a microsegmented lab, live: workloads, traffic, the "
                       "daemon and `top`",
                       description="Build a lab of five workloads (client, web, api, db, "
                       "rogue) in network namespaces with servers and a steady mix of allowed, "
                       "denied and audited traffic, run the daemon on it under a demo policy you "
                       "can edit live, and open `microseg top`. Without a terminal (or with "
                       "--duration) it runs that long and prints a summary. Everything it "
                       "creates is removed on exit (q, Ctrl-C, SIGTERM).")
    p.add_argument("--duration", type=float, metavar="SECONDS",
                   help="run this long, then print a summary instead of opening `top` "
                   "(default without a terminal: 30)")
    p.add_argument("--hosts", type=int, choices=[1, 2], default=1,
                   help="2: two hosts, each with its own daemon and policy, sharing "
                   "workload identities through one etcd; `top` shows host a "
                   "(docs/many-hosts.md)")
    p.add_argument("--policy", default=DEMO_POLICY, metavar="FILE",
                   help="where to write the demo policy (default: %(default)s)")
    p.add_argument("--socket", metavar="PATH",
                   help="the demo daemon's socket (default: /run/microseg/microseg.sock, so "
                   "`microseg watch` finds it)")
    p.add_argument("--learn", action="store_true",
                   help="start in audit mode with no rules, to learn a policy from the "
                   "traffic (`policy suggest`, `stage`, `promote`)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("top", help="the live view: rates, flows, verdicts, sessions, rules, "
                       "a workload matrix (Textual)",
                       description="The live view of the daemon: a header with rates, table "
                       "fill, losses and the policy; views Flows, Verdicts, Sessions, Rules and "
                       "Matrix (keys 1-5). ? help, / filter, p pause, Enter drill in, q quit.")
    _socket_option(p)
    p.add_argument("--synthetic", type=float, metavar="EVENTS_PER_S", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_top)

    p = sub.add_parser("sessions", help="list the session table (like conntrack -L)",
                       description="List the session table: protocol, state, both "
                       "endpoints with workloads, packets/bytes each way, age, idle, expiry, "
                       "rule. Streamed: usable with a million entries. Filters combine with "
                       "AND and are applied in the daemon.")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--protocol", metavar="P", help="tcp, udp, icmp, icmpv6 or a number")
    p.add_argument("--state", choices=["new", "established", "closing", "closed"])
    p.add_argument("--ip", metavar="CIDR", help="either endpoint in CIDR")
    p.add_argument("--workload", metavar="NAME", help="either endpoint's workload")
    _socket_option(p)
    p.set_defaults(func=cmd_sessions)

    p = sub.add_parser("workloads", help="every workload the daemon knows (like `cilium "
                       "endpoint list`)",
                       description="Every workload the daemon knows, from the policy file "
                       "(source static) and discovered where they run (source docker): name, "
                       "source, addresses, live sessions, labels.")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--source", metavar="S", help="only workloads from S (static, docker, "
                   "etcd: other nodes')")
    _socket_option(p)
    p.set_defaults(func=cmd_workloads)

    p = sub.add_parser("nodes", help="every node sharing etcd: heartbeat, policy, workloads",
                       description="Every node of the cluster (run --etcd): its last "
                       "heartbeat, the sha256 and generation of the policy it enforces, "
                       "the workloads it publishes, its version — converged or not.")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    _socket_option(p)
    p.set_defaults(func=cmd_nodes)

    p = sub.add_parser("stats", help="counters, rates, table fill, events lost",
                       description="One-shot summary: packets by verdict with rates since "
                       "the daemon started, drops by reason, session table fill, events "
                       "published and lost, policy generation, datapath ns/packet.")
    p.add_argument("--json", action="store_true", help="JSON output")
    _socket_option(p)
    p.set_defaults(func=cmd_stats)

    pol = sub.add_parser("policy", help="check, show, apply and edit the policy")
    psub = pol.add_subparsers(dest="policy_command", metavar="ACTION", required=True)
    p = psub.add_parser("check", help="validate a policy file (no daemon needed)")
    p.add_argument("file", metavar="FILE")
    p.set_defaults(func=cmd_policy_check)
    p = psub.add_parser("show", help="the active policy, with per-rule hits")
    p.add_argument("--json", action="store_true", help="JSON output")
    _socket_option(p)
    p.set_defaults(func=cmd_policy_show)
    p = psub.add_parser("apply", help="validate FILE, make it the daemon's policy and wait "
                                      "until it is active")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--cluster", action="store_true",
                   help="store it in etcd as every node's policy (nodes run with "
                   "--policy etcd), through the daemon on the socket")
    _socket_option(p)
    p.set_defaults(func=cmd_policy_apply)

    _lifecycle_parsers(psub)

    rule = psub.add_parser("rule", help="add or delete a rule in the policy file")
    rsub = rule.add_subparsers(dest="rule_command", metavar="ACTION", required=True)
    p = rsub.add_parser("add", help="append a rule, keeping the file's comments and order",
                        description="Selectors: any, workload:NAME, labels:k=v[,k=v], "
                                    "cidr:PREFIX; several separated by ';' or by repeating "
                                    "--from/--to. Ports: 80,443,8000-8100.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--from", dest="src", action="append", required=True, metavar="SEL")
    p.add_argument("--to", dest="dst", action="append", required=True, metavar="SEL")
    p.add_argument("--protocol", choices=["tcp", "udp", "icmp", "icmpv6", "any"])
    p.add_argument("--ports", metavar="LIST")
    p.add_argument("--action", choices=["allow", "deny"], required=True)
    p.add_argument("--file", metavar="FILE",
                   help="edit this file instead of the daemon's policy file")
    p.add_argument("--no-apply", action="store_true",
                   help="with --file: only edit, do not apply")
    _socket_option(p)
    p.set_defaults(func=cmd_rule_add)
    p = rsub.add_parser("delete", help="remove a rule by name")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--file", metavar="FILE",
                   help="edit this file instead of the daemon's policy file")
    p.add_argument("--no-apply", action="store_true",
                   help="with --file: only edit, do not apply")
    _socket_option(p)
    p.set_defaults(func=cmd_rule_delete)

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=cmd_version)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except CommandError as e:
        if e.usage:
            parser.print_usage(sys.stderr)
        print(f"microseg: {e}", file=sys.stderr)
        return e.code
    except BrokenPipeError:
        # `microseg ... | head`: the reader left; exit quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130

