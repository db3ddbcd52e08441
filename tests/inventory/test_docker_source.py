"""The Docker source against a real, private dockerd: what the daemon will
enforce from — each running container's name, labels and addresses — as
containers start, stop, move between networks, get renamed, churn, and as
the engine itself goes away and comes back. Latencies are printed (run with
-s to see them); the bounds asserted on them are generous on purpose."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import ipaddress
import logging
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from microseg.inventory.docker import DockerSocketError, check_socket
from microseg.inventory.model import Change, DiscoveredWorkload
from microseg.lab.dockerd import IMAGE, Engine

from .conftest import Follower

ip = ipaddress.ip_address
BOUND = 5.0  # seconds: far above what is measured; a hang, not a slow run, fails


def workload(name: str, labels: dict[str, str], addresses: list[str],
             ident: str) -> DiscoveredWorkload:
    return DiscoveredWorkload.make(name, labels, addresses, "docker", ident)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:+.0f} ms"


async def event_time(engine: Engine, container: str, event: str, kind: str = "container") -> float:
    """When the engine says the last such event for the container happened."""
    now = int(time.time())
    lines = await engine.adocker(
        "events", "--since", str(now - 120), "--until", str(now + 1), "--filter", f"type={kind}",
        "--filter", f"event={event}",
        "--format", '{{.TimeNano}} {{.Actor.ID}} {{index .Actor.Attributes "container"}}')
    times = [int(line.split()[0]) for line in lines.splitlines() if container in line.split()[1:]]
    return times[-1] / 1e9


# --- a) what runs when the source starts ---

async def test_initial_listing_has_names_labels_and_both_families(
        engine: Engine, follow: Callable[..., Follower]) -> None:
    web = await engine.adocker(*engine.run_args(
        "web", labels={"app": "web", "tier": "front"}, ip="10.240.0.10", ip6="fd00:240::10"))
    db = await engine.adocker(*engine.run_args(
        "db", labels={"app": "db", "tier": "back"}, ip="10.240.0.11", ip6="fd00:240::11"))
    # Unlabelled and on no network: a workload still, without addresses.
    batch = await engine.adocker(*engine.run_args("batch", network="none"))

    f = follow()
    first = await f.wait_for(lambda w: True)

    assert first.workloads == {
        "web": workload("web", {"app": "web", "tier": "front"},
                        ["10.240.0.10", "fd00:240::10"], web),
        "db": workload("db", {"app": "db", "tier": "back"}, ["10.240.0.11", "fd00:240::11"], db),
        "batch": workload("batch", {}, [], batch),
    }
    assert first.workloads["web"].addresses == (ip("10.240.0.10"), ip("fd00:240::10"))
    assert sorted((c.action, c.workload.name) for c in first.changes) == [
        ("added", "batch"), ("added", "db"), ("added", "web")]
    assert f.source.up and f.source.last_error is None
    assert f.source.workloads == first.workloads
    assert dict(f.source.changes) == {"added": 3, "removed": 0, "changed": 0}


# --- b) a container that starts ---

async def test_started_container_is_added_promptly(
        engine: Engine, follow: Callable[..., Follower]) -> None:
    await engine.adocker(*engine.run_args("web", labels={"app": "web"}, ip="10.240.0.10"))
    f = follow()
    await f.wait_for(lambda w: set(w) == {"web"})
    seen = len(f.calls)

    issued = time.monotonic()
    cache = await engine.adocker(*engine.run_args(
        "cache", labels={"app": "cache"}, ip="10.240.0.12", ip6="fd00:240::12"))
    returned = time.monotonic()
    call = await f.wait_for(lambda w: "cache" in w, after=seen)

    started = await event_time(engine, cache, "start")
    print(f"\nadded: on_change {ms(call.wall - started)} after the engine's start event, "
          f"{ms(call.at - returned)} after `docker run` returned (the CLI took "
          f"{returned - issued:.2f} s)")
    assert call.at - returned < BOUND
    assert call.changes == (Change("added", workload(
        "cache", {"app": "cache"}, ["10.240.0.12", "fd00:240::12"], cache)),)
    assert set(call.workloads) == {"web", "cache"}
    # It was named from its network's `connect`, which comes before the
    # start (tests/e2e and make bench show what that buys: the first packet
    # of a process that sends at once meets its identity); the inspection
    # after the start found it the same: nothing changed since.
    assert f.source.previews == 1
    await asyncio.sleep(0.5)
    assert all(not c.changes for c in f.calls[seen + 1:]), f.calls[seen + 1:]


async def test_a_start_that_fails_leaves_nothing(
        engine: Engine, follow: Callable[..., Follower]) -> None:
    """Named from its `connect`, a container whose process cannot start is
    forgotten again: the engine disconnects it."""
    f = follow()
    await f.wait_for(lambda w: True)
    seen = len(f.calls)
    await asyncio.to_thread(
        engine.docker, "run", "-d", "--network", "msnet0", "--ip", "10.240.0.13",
        "--name", "broken", IMAGE, "/no/such/program", check=False)
    await f.wait_for(lambda w: "broken" not in w, after=seen, timeout=10)
    await asyncio.sleep(1.0)  # whatever was on its way has arrived
    assert "broken" not in f.source.workloads
    assert f.source.previews == 1


# --- c) a container that stops, and the next one on its address ---

async def test_stopped_container_is_forgotten_and_its_address_not_inherited(
        engine: Engine, follow: Callable[..., Follower]) -> None:
    address, address6 = ip("10.240.0.40"), ip("fd00:240::40")
    old = await engine.adocker(*engine.run_args(
        "payments", labels={"app": "payments", "pci": "yes"}, ip=str(address),
        ip6=str(address6)))
    f = follow()
    await f.wait_for(lambda w: "payments" in w)
    seen = len(f.calls)

    issued = time.monotonic()
    await engine.adocker("stop", "payments")
    returned = time.monotonic()
    gone = await f.wait_for(lambda w: "payments" not in w, after=seen)
    died = await event_time(engine, old, "die")
    print(f"\nremoved: on_change {ms(gone.wall - died)} after the engine's die event, "
          f"{ms(gone.at - issued)} after `docker stop` was issued, "
          f"{ms(gone.at - returned)} from its return")
    assert gone.at - returned < BOUND
    assert gone.changes == (Change("removed", workload(
        "payments", {"app": "payments", "pci": "yes"}, [str(address), str(address6)], old)),)

    # The engine hands the addresses to a new container with other labels.
    removal = f.calls.index(gone)
    seen = len(f.calls)
    new = await engine.adocker(*engine.run_args(
        "guest", labels={"app": "guest"}, ip=str(address), ip6=str(address6)))
    returned = time.monotonic()
    call = await f.wait_for(lambda w: "guest" in w, after=seen)
    print(f"re-used addresses: the new container added {ms(call.at - returned)} after "
          "`docker run` returned")
    assert call.workloads["guest"] == workload(
        "guest", {"app": "guest"}, [str(address), str(address6)], new)
    # In everything emitted since the stop, the addresses never stood for the
    # old container, nor for two at once.
    for emitted in f.calls[removal:]:
        for reused in (address, address6):
            owners = [w for w in emitted.workloads.values() if reused in w.addresses]
            assert [w.ident for w in owners] in ([], [new]), owners
    assert "payments" in await engine.adocker("ps", "-a", "--format", "{{.Names}}")


# --- d) networks connected and disconnected ---

async def test_addresses_follow_network_connect_and_disconnect(
        engine: Engine, follow: Callable[..., Follower]) -> None:
    app = await engine.adocker(*engine.run_args(
        "app", labels={"app": "api"}, ip="10.240.0.50", ip6="fd00:240::50"))
    f = follow()
    await f.wait_for(lambda w: "app" in w)

    seen = len(f.calls)
    await engine.adocker("network", "connect", "--ip", "10.241.0.50", "--ip6", "fd00:241::50",
                         "msnet1", "app")
    returned = time.monotonic()
    call = await f.wait_for(lambda w: ip("10.241.0.50") in w["app"].addresses, after=seen)
    connected = await event_time(engine, app, "connect", kind="network")
    print(f"\nconnect: on_change {ms(call.wall - connected)} after the engine's connect event, "
          f"{ms(call.at - returned)} after `docker network connect` returned")
    both = workload("app", {"app": "api"},
                    ["10.240.0.50", "fd00:240::50", "10.241.0.50", "fd00:241::50"], app)
    assert call.changes == (Change("changed", both),)

    seen = len(f.calls)
    await engine.adocker("network", "disconnect", "msnet0", "app")
    returned = time.monotonic()
    call = await f.wait_for(lambda w: ip("10.240.0.50") not in w["app"].addresses, after=seen)
    print(f"disconnect: on_change {ms(call.at - returned)} after `docker network disconnect` "
          "returned")
    assert call.workloads["app"] == workload(
        "app", {"app": "api"}, ["10.241.0.50", "fd00:241::50"], app)
    assert call.at - returned < BOUND


# --- e) a rename ---

async def test_rename_moves_the_workload_to_its_new_name(
        engine: Engine, follow: Callable[..., Follower]) -> None:
    ident = await engine.adocker(*engine.run_args(
        "blue", labels={"app": "shop"}, ip="10.240.0.70", ip6="fd00:240::70"))
    f = follow()
    before = (await f.wait_for(lambda w: "blue" in w)).workloads["blue"]
    seen = len(f.calls)

    await engine.adocker("rename", "blue", "green")
    returned = time.monotonic()
    call = await f.wait_for(lambda w: "green" in w, after=seen)
    print(f"\nrename: on_change {ms(call.at - returned)} after `docker rename` returned")

    assert "blue" not in call.workloads
    green = call.workloads["green"]
    assert (green.ident, green.labels, green.addresses) == (ident, before.labels,
                                                            before.addresses)
    assert sorted((c.action, c.workload.name) for c in call.changes) == [
        ("added", "green"), ("removed", "blue")]


# --- f) the engine goes away and comes back ---

async def outage(engine: Engine, f: Follower, caplog: pytest.LogCaptureFixture,
                 bring_down: Callable[[], None]) -> tuple[int, dict[str, DiscoveredWorkload]]:
    """Take the engine down, check the source says so once and emits nothing
    while it is down, bring it back; the index of the first call after the
    outage and what the source held meanwhile."""
    caplog.clear()
    issued = time.monotonic()
    down = asyncio.ensure_future(asyncio.to_thread(bring_down))
    while f.source.up:
        assert time.monotonic() - issued < 30, "the source never noticed the engine go"
        await asyncio.sleep(0.01)
    noticed = time.monotonic()
    seen = len(f.calls)
    held = dict(f.source.workloads)
    await down
    print(f"\nengine down: the source noticed {ms(noticed - issued)} after the signal; "
          f"the engine took {time.monotonic() - issued:.2f} s to exit")
    assert f.source.last_error

    try:
        await asyncio.sleep(1.5)  # down for a while: attempts at back-off 0.05 … 0.4 s
        attempts = f.source.errors
        assert attempts >= 4
        # Meanwhile the last inventory stands: nothing emitted, above all no empty one.
        assert len(f.calls) == seen
        assert f.source.workloads == held
    finally:
        ready = await asyncio.to_thread(engine.start)  # the next tests need it anyway
    answering = time.monotonic()
    back = await f.wait_for(lambda w: True, after=seen, timeout=30)
    print(f"engine back: /_ping answered {ready:.2f} s after start; the source resynced "
          f"{ms(back.at - answering)} later, after {attempts} failed attempts")
    assert f.source.up

    warnings = [r for r in caplog.records
                if r.name == "microseg.inventory" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "is down" in warnings[0].getMessage()
    assert any("is back" in r.getMessage() for r in caplog.records)
    return seen, held


async def test_engine_stop_and_start_resyncs_to_what_runs(
        engine: Engine, follow: Callable[..., Follower], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="microseg.inventory")
    keeper = await engine.adocker(*engine.run_args(
        "keeper", labels={"app": "keeper"}, ip="10.240.0.60", ip6="fd00:240::60",
        restart="always"))
    await engine.adocker(*engine.run_args(
        "transient", labels={"app": "tmp"}, ip="10.240.0.61", ip6="fd00:240::61"))
    f = follow(backoff_initial=0.05, backoff_max=0.4)
    await f.wait_for(lambda w: set(w) == {"keeper", "transient"})
    before = len(f.calls)

    seen, held = await outage(engine, f, caplog, engine.stop)

    # A stopping dockerd stops its containers and says so before it closes
    # the stream: those removals are true, and the only ones emitted.
    for call in f.calls[before:seen]:
        assert {c.action for c in call.changes} == {"removed"}, call.changes
    print("emitted while the engine stopped: "
          f"{[(c.action, c.workload.name) for call in f.calls[before:seen] for c in call.changes]}")
    assert set(held) <= {"keeper", "transient"}
    # --restart=always brings keeper back, maybe just after the engine answers.
    settled = await f.wait_for(lambda w: w == engine.running(), after=seen, timeout=15)
    assert settled.workloads == {"keeper": workload(
        "keeper", {"app": "keeper"}, ["10.240.0.60", "fd00:240::60"], keeper)}


async def test_engine_crash_keeps_the_last_inventory_then_resyncs(
        engine: Engine, follow: Callable[..., Follower], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="microseg.inventory")
    keeper = await engine.adocker(*engine.run_args(
        "keeper", labels={"app": "keeper"}, ip="10.240.0.62", ip6="fd00:240::62",
        restart="always"))
    transient = await engine.adocker(*engine.run_args(
        "transient", labels={"app": "tmp"}, ip="10.240.0.63", ip6="fd00:240::63"))
    f = follow(backoff_initial=0.05, backoff_max=0.4)
    known = (await f.wait_for(lambda w: set(w) == {"keeper", "transient"})).workloads
    before = len(f.calls)

    # A crash says nothing: the containers run on, and the source holds them.
    seen, held = await outage(engine, f, caplog, engine.crash)
    assert seen == before
    assert held == known == {
        "keeper": workload("keeper", {"app": "keeper"}, ["10.240.0.62", "fd00:240::62"], keeper),
        "transient": workload("transient", {"app": "tmp"}, ["10.240.0.63", "fd00:240::63"],
                              transient)}

    # Back without live-restore, dockerd stops what survived the crash and
    # restarts keeper: the source ends on exactly that.
    settled = await f.wait_for(lambda w: w == engine.running(), after=seen, timeout=15)
    assert settled.workloads == {"keeper": known["keeper"]}
    assert any(Change("removed", known["transient"]) in call.changes
               for call in f.calls[seen:])


# --- g) churn ---

async def test_churn_ends_exactly_on_what_docker_ps_shows(
        engine: Engine, follow: Callable[..., Follower]) -> None:
    f = follow()
    await f.wait_for(lambda w: True)
    loop = asyncio.get_running_loop()
    rounds, per_round = 2, 26  # 200 go through the daemon in tests/e2e/test_discovery.py

    def stop_some(names: list[str]) -> None:
        # All the ways a container goes: stop (die, stop), kill (kill, die),
        # rm -f (kill, die, destroy), a few names per command.
        verbs = (("stop",), ("kill",), ("rm", "-f"))
        for i, verb in enumerate(verbs):
            batch = names[i::len(verbs)]
            for start in range(0, len(batch), 5):
                engine.docker(*verb, *batch[start:start + 5])

    # Another subscriber records when the engine says each start and die
    # happened (`docker events --since` would only replay its last 256).
    assert engine.cli is not None
    recorder = await asyncio.create_subprocess_exec(
        engine.cli, "-H", f"unix://{engine.sock}", "events", "--filter", "type=container",
        "--filter", "event=start", "--filter", "event=die",
        "--format", "{{.TimeNano}} {{.Action}} {{.Actor.ID}}", stdout=asyncio.subprocess.PIPE)
    await asyncio.sleep(0.5)  # subscribed

    began = time.monotonic()
    previous: list[str] = []
    with ThreadPoolExecutor(max_workers=6) as pool:
        for r in range(rounds):
            names = [f"churn-{r}-{i}" for i in range(per_round)]
            jobs = [loop.run_in_executor(pool, engine.docker, *engine.run_args(
                name, labels={"round": str(r), "index": str(i)})) for i, name in enumerate(names)]
            # The previous round goes while this one starts.
            jobs += [loop.run_in_executor(pool, stop_some, previous[k::3]) for k in range(3)]
            await asyncio.gather(*jobs)
            previous = names
        await loop.run_in_executor(pool, stop_some, previous[::2])
    done = time.monotonic()

    expected = await asyncio.to_thread(engine.running)
    assert len(expected) == per_round // 2
    settled = await f.wait_for(lambda w: w == expected, timeout=30)
    print(f"\nchurn: {rounds * per_round} started, {rounds * per_round - len(expected)} stopped "
          f"in {done - began:.1f} s; inventory equal to `docker ps` {ms(settled.at - done)} "
          f"after the last command; {len(f.calls)} on_change calls, "
          f"{f.source.engine_events} engine events, changes {dict(f.source.changes)}")

    # From the engine's event to the inventory that reflects it.
    recorder.terminate()
    out, _ = await recorder.communicate()
    events = {(action, ident): int(nanos) / 1e9
              for nanos, action, ident in (line.split() for line in out.decode().splitlines())}
    latencies: dict[str, list[float]] = {"start": [], "die": []}
    for (action, ident), at in events.items():
        came = next((i for i, c in enumerate(f.calls)
                     if any(w.ident == ident for w in c.workloads.values())), None)
        assert came is not None, f"{ident} never appeared"
        if action == "start":
            latencies["start"].append(f.calls[came].wall - at)
            continue
        went = next(c for c in f.calls[came:]
                    if all(w.ident != ident for w in c.workloads.values()))
        latencies["die"].append(went.wall - at)
    for action, values in latencies.items():
        values.sort()
        print(f"  {action} -> on_change, {len(values)} containers: "
              f"p50 {ms(values[len(values) // 2])}, p99 {ms(values[len(values) * 99 // 100])}, "
              f"max {ms(values[-1])}")
        assert values[-1] < BOUND
    assert dict(f.source.workloads) == await asyncio.to_thread(engine.running)
    assert f.source.errors == 0
    # Never, in anything emitted, one address for two workloads.
    for call in f.calls:
        addresses = [a for w in call.workloads.values() for a in w.addresses]
        assert len(addresses) == len(set(addresses))


# --- h) check_socket ---

class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    routes: dict[str, tuple[int, bytes]] = {}


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _UnixHTTPServer

    def do_GET(self) -> None:
        status, body = self.server.routes.get(self.path, (404, b"404 page not found\n"))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def address_string(self) -> str:
        return "unix"

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def http_on_unix_socket(path: Path, routes: dict[str, tuple[int, bytes]]) -> Iterator[None]:
    server = _UnixHTTPServer(str(path), _Handler)
    server.routes = routes
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def refusal(path: Path | str, **options: float) -> str:
    with pytest.raises(DockerSocketError) as caught:
        check_socket(str(path), **options)
    message = str(caught.value)
    assert "\n" not in message and str(path) in message, message
    return message


def test_check_socket_refuses_what_is_not_a_trusted_docker_api(
        engine: Engine, tmp_path: Path) -> None:
    assert "does not exist" in refusal(tmp_path / "missing.sock")

    regular = tmp_path / "file.sock"
    regular.write_text("")
    assert "is not a socket" in refusal(regular)

    web = tmp_path / "web.sock"
    with http_on_unix_socket(web, {}):
        assert "is not a Docker API (GET /_ping answered 404" in refusal(web)

    almost = tmp_path / "almost.sock"
    with http_on_unix_socket(almost, {"/_ping": (200, b"OK"), "/version": (200, b"{}")}):
        assert "is not a Docker API (GET /version answered 200 with no ApiVersion)" in \
            refusal(almost)

    silent = tmp_path / "silent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(silent))
        listener.listen(1)  # connects, is never answered
        assert "does not answer (no answer in time)" in refusal(silent, timeout=0.5)

    # Someone else's socket: not root's, not the docker group's.
    foreign = tmp_path / "foreign.sock"
    with http_on_unix_socket(foreign, {"/_ping": (200, b"OK")}):
        os.chown(foreign, 65534, 65534)
        message = refusal(foreign)
        assert "refused: owner nobody, group nogroup, mode" in message


def test_check_socket_passes_the_engine_and_refuses_it_writable_by_all(engine: Engine) -> None:
    check_socket(str(engine.sock))  # root:docker 0660, as dockerd makes it

    mode = engine.sock.stat().st_mode & 0o777
    os.chmod(engine.sock, 0o666)
    try:
        message = refusal(engine.sock)
    finally:
        os.chmod(engine.sock, mode)
    assert "refused: owner root, group docker, mode 0666" in message
    check_socket(str(engine.sock))
