"""Running containers as workloads, from a Docker Engine (or Podman's
Docker-compatible API) over its unix socket: list and inspect once, then
follow the engine's event stream (docs/policy.md "Discovery").

    source = DockerSource("/var/run/docker.sock")
    await source.run(on_change)     # until cancelled

`on_change(workloads, changes)` (a function or a coroutine function) is
called with the whole inventory (a dict by name, never mutated afterwards) and
what changed since the previous call: once after every (re)connection, with
the full resynchronised mapping even when nothing changed, then after each
event that changed something. While the engine is down the last inventory
stands and nothing is emitted.

A running container is a workload, paused or not, and so is one starting
from the moment it joins a network (see DockerSource._preview); one on the host's network
(or none) is a workload without addresses.
"""

from __future__ import annotations

import asyncio
import email.utils
import grp
import http.client
import inspect
import ipaddress
import logging
import os
import socket
import stat
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

import aiohttp
import orjson

from microseg.owners import group_name, user_name

from .model import ACTIONS, Change, DiscoveredWorkload, diff

log = logging.getLogger("microseg.inventory")

DEFAULT_SOCKET = "/var/run/docker.sock"
SOURCE = "docker"
# The newest API version whose fields we read; an older engine is asked in its own.
API_VERSION = (1, 41)
# A container that died, stopped or is gone is forgotten at once, without
# asking the engine: its addresses may be handed to the next container.
GONE = frozenset({"die", "stop", "destroy", "remove"})  # remove: Podman's destroy
# After these the container is inspected again. Not after `kill`: a fatal
# signal is followed by `die`, and inspecting a container that is stopping
# waits for the stop to end, holding up the `die` queued behind it.
REINSPECT = frozenset({"start", "rename"})
CONTAINER_EVENTS = GONE | REINSPECT
NETWORK_EVENTS = frozenset({"connect", "disconnect"})
# By type only: Podman filters event names by its own (`died`, not `die`) and
# would drop deaths; the few other events are skipped here (event_target).
EVENT_FILTERS = orjson.dumps({"type": ["container", "network"]}).decode()
MAX_EVENT_LINE = 1 << 20
INSPECT_CONCURRENCY = 8

OnChange = Callable[[Mapping[str, DiscoveredWorkload], tuple[Change, ...]],
                    Awaitable[None] | None]


class DockerSocketError(Exception):
    """The socket is missing, is not a Docker API, or others can write to it.
    Its message is one line naming the path and the problem."""


class EngineError(Exception):
    """The engine answered, but not as its API says it does."""


class _ConsumerError(Exception):
    """on_change raised: carried out of the reconnect loop untouched."""


# --- the socket check (synchronous: usable from the CLI and at start-up) ---

def check_socket(path: str = DEFAULT_SOCKET, timeout: float = 3.0) -> None:
    """Refuse, with a DockerSocketError, a path that is not a trustworthy
    Docker API socket: missing, not a socket, writable by others than root and
    the docker group, silent, or not answering /_ping and /version."""
    check_socket_owner(path)
    try:
        status, body = _get(path, "/_ping", timeout)
        if status != 200 or body.strip() != b"OK":
            raise DockerSocketError(f"docker socket {path}: is not a Docker API "
                                    f"(GET /_ping answered {status}, not OK)")
        status, body = _get(path, "/version", timeout)
    except OSError as e:  # refused, timed out, permission denied
        raise DockerSocketError(
            f"docker socket {path}: does not answer ({_os_reason(e)})") from None
    except http.client.HTTPException as e:
        raise DockerSocketError(f"docker socket {path}: is not a Docker API "
                                f"(it does not speak HTTP: {type(e).__name__})") from None
    try:
        version = orjson.loads(body).get("ApiVersion") if status == 200 else None
    except (ValueError, AttributeError):
        version = None
    if not isinstance(version, str) or not version:
        raise DockerSocketError(f"docker socket {path}: is not a Docker API "
                                f"(GET /version answered {status} with no ApiVersion)")


def check_socket_owner(path: str) -> None:
    """The socket must exist, be a socket, belong to root or the docker group,
    and be writable by no one else: whoever can write to it can start a
    container that claims any labels, hence any identity."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DockerSocketError(f"docker socket {path}: does not exist") from None
    except OSError as e:
        raise DockerSocketError(
            f"docker socket {path}: cannot stat it ({_os_reason(e)})") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise DockerSocketError(f"docker socket {path}: is not a socket")
    docker_gid = _gid("docker")
    mode = stat.S_IMODE(st.st_mode)
    trusted_group = st.st_gid in (0, docker_gid)
    if ((st.st_uid == 0 or st.st_gid == docker_gid) and not mode & 0o002
            and (trusted_group or not mode & 0o020)):
        return
    raise DockerSocketError(
        f"docker socket {path}: refused: owner {user_name(st.st_uid)}, group "
        f"{group_name(st.st_gid)}, mode {mode:04o}; it must belong to root or the docker "
        "group and be writable by no one else (whoever can write to it can make a container "
        "claim any identity)")


def _gid(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None




def _os_reason(e: OSError) -> str:
    if isinstance(e, TimeoutError):
        return "no answer in time"
    return e.strerror or type(e).__name__


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("docker", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


def _get(path: str, url: str, timeout: float) -> tuple[int, bytes]:
    conn = _UnixHTTPConnection(path, timeout)
    try:
        conn.request("GET", url)
        resp = conn.getresponse()
        return resp.status, resp.read(1 << 16)
    finally:
        conn.close()


# --- from the engine's JSON to workloads (pure) ---

def workload_of(container: Mapping[str, Any]) -> DiscoveredWorkload | None:
    """A container's inspection (`GET /containers/{id}/json`) as a workload,
    or None when it is not running."""
    if not (container.get("State") or {}).get("Running"):
        return None
    name = container.get("Name") or ""
    networks = (container.get("NetworkSettings") or {}).get("Networks") or {}
    addresses = [ip for net in networks.values()
                 for ip in _addresses((net or {}).get("IPAddress"),
                                      (net or {}).get("GlobalIPv6Address"))]
    return DiscoveredWorkload.make(name[1:] if name.startswith("/") else name,
                                   (container.get("Config") or {}).get("Labels"),
                                   addresses, SOURCE, container.get("Id") or "")


def _addresses(*texts: str | None) -> Iterable[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    for text in texts:
        if text:  # the engine says "" for "none on this network"
            try:
                yield ipaddress.ip_address(text)
            except ValueError:
                log.debug("docker: ignoring address %r", text)


def event_target(event: Mapping[str, Any]) -> tuple[str, str] | None:
    """(action, container id) for an engine event that concerns a container's
    life, name or addresses; None for the rest."""
    action = event.get("Action") or event.get("status") or ""
    actor = event.get("Actor") or {}
    if event.get("Type") == "network" and action in NETWORK_EVENTS:
        cid = (actor.get("Attributes") or {}).get("container")
    elif event.get("Type") == "container" and action in CONTAINER_EVENTS:
        cid = actor.get("ID") or event.get("id")
    else:
        return None
    return (action, cid) if isinstance(cid, str) and cid else None


# --- the source ---

class DockerSource:
    """Follows one engine and keeps its running containers as workloads.

    State for `status` and metrics: `up`, `last_error` (kept after a
    recovery), `since` (wall-clock time `up` last changed), `changes` (a
    Counter of added/removed/changed), `engine_events` and `errors`.
    """

    source = SOURCE

    def __init__(self, socket_path: str = DEFAULT_SOCKET, *, backoff_initial: float = 0.5,
                 backoff_max: float = 30.0, timeout: float = 10.0) -> None:
        self.socket_path = socket_path
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.timeout = timeout
        self.up = False
        self.last_error: str | None = None
        self.since = time.time()
        self.changes: Counter[str] = Counter(dict.fromkeys(ACTIONS, 0))
        self.engine_events = 0
        self.errors = 0
        self.previews = 0  # containers named from their network's `connect` (_preview)
        self._workloads: dict[str, DiscoveredWorkload] = {}  # published, by name
        self._containers: dict[str, DiscoveredWorkload] = {}  # by container id
        self._outage_logged = False
        self._on_change: OnChange | None = None
        self._api = ""
        # Removals are applied by the event reader the moment they arrive,
        # while the follower may be waiting on inspections: `_inspecting`
        # are the ids it is asking about, `_died` those of them that went
        # meanwhile (their answer may predate the death: it is dropped).
        self._inspecting: set[str] = set()
        self._died: set[str] = set()
        self._live = False  # removals may be emitted: the listing was
        self._emitting = asyncio.Lock()  # one on_change at a time, in order

    @property
    def workloads(self) -> Mapping[str, DiscoveredWorkload]:
        """The inventory as last emitted (the last known one while down)."""
        return self._workloads

    async def run(self, on_change: OnChange) -> None:
        """Follow the engine until cancelled, reconnecting with exponential
        back-off. An exception raised by on_change ends it."""
        self._on_change = on_change
        delay = self.backoff_initial
        while True:
            try:
                await self._follow()
            except _ConsumerError as e:
                assert e.__cause__ is not None
                raise e.__cause__ from None
            except (aiohttp.ClientError, OSError, TimeoutError, ValueError, EngineError,
                    DockerSocketError) as e:
                if self.up:
                    delay = self.backoff_initial
                self._down(_reason(e))
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)

    def _down(self, reason: str) -> None:
        self.errors += 1
        self.last_error = reason
        if self.up:
            self.up = False
            self.since = time.time()
        if self._outage_logged:
            log.debug("docker engine at %s still down: %s", self.socket_path, reason)
            return
        self._outage_logged = True
        log.warning("docker engine at %s is down: %s; keeping the last %d workloads, "
                    "retrying with back-off", self.socket_path, reason, len(self._workloads))

    async def _follow(self) -> None:
        check_socket_owner(self.socket_path)
        connector = aiohttp.UnixConnector(path=self.socket_path)
        async with aiohttp.ClientSession(connector=connector, base_url="http://docker",
                                         timeout=aiohttp.ClientTimeout(total=self.timeout),
                                         raise_for_status=False) as http:
            since = await self._handshake(http)
            # Nothing between the listing and the watch is missed: the stream
            # is asked for every event from `since`, the engine's own clock
            # read before the listing. The engine takes the events it still
            # buffers from then (its last 256) and subscribes under one lock,
            # so each event after `since` arrives, replayed or live. Opening
            # the stream alone would not do: dockerd sends the headers before
            # it subscribes. Events that the listing already reflects are
            # harmless: a start or a rename only makes us inspect the
            # container again, and a replayed die is followed by the replayed
            # start of whatever the listing saw run.
            async with http.get(f"{self._api}/events",
                                params={"since": str(int(since)), "filters": EVENT_FILTERS},
                                timeout=aiohttp.ClientTimeout(
                                    total=None, sock_connect=self.timeout)) as stream:
                await _check(stream)
                queue: asyncio.Queue[str | tuple[str, str] | BaseException] = asyncio.Queue()
                # Read all along, even while listing: dockerd drops events for
                # a subscriber that does not keep up.
                reader = asyncio.create_task(self._read_events(stream, queue))
                try:
                    await self._resync(http)
                    while True:
                        batch = [await queue.get()]
                        while not queue.empty():
                            batch.append(queue.get_nowait())
                        joins = [i for i in batch if isinstance(i, tuple)]
                        if joins:  # first: they are what a starting process waits for
                            await self._preview(http, joins)
                            await self._publish()
                        ids = list(dict.fromkeys(i for i in batch if isinstance(i, str)))
                        if ids:
                            await self._apply(http, ids)
                        for item in batch:
                            if isinstance(item, BaseException):
                                raise item
                finally:
                    self._live = False
                    try:
                        async with self._emitting:  # not while it runs on_change
                            pass
                    finally:
                        reader.cancel()

    async def _handshake(self, http: aiohttp.ClientSession) -> float:
        """Check it is a Docker API, pick the API version; the engine's clock."""
        async with http.get("/_ping") as resp:
            if resp.status != 200 or (await resp.read()).strip() != b"OK":
                raise EngineError(f"not a Docker API: GET /_ping answered {resp.status}")
            date = resp.headers.get("Date")
        async with http.get("/version") as resp:
            version = (await _json(resp, dict)).get("ApiVersion")
        try:
            major, minor = (int(part) for part in str(version).split(".")[:2])
        except ValueError:
            raise EngineError(f"not a Docker API: ApiVersion {version!r}") from None
        major, minor = min((major, minor), API_VERSION)
        self._api = f"/v{major}.{minor}"
        if date:
            try:
                # Whole seconds, rounded down: a second too early at worst.
                return email.utils.parsedate_to_datetime(date).timestamp()
            except (TypeError, ValueError):
                pass
        return time.time() - 1

    async def _read_events(self, stream: aiohttp.ClientResponse,
                           queue: asyncio.Queue[str | tuple[str, str] | BaseException]) -> None:
        """Apply each removal at once; queue the containers to inspect
        again, and at the end what ended the stream."""
        rest = b""
        try:
            async for chunk in stream.content.iter_any():
                lines = (rest + chunk).split(b"\n")
                rest = lines.pop()
                if len(rest) > MAX_EVENT_LINE:
                    raise EngineError("an event of over 1 MiB")
                for line in lines:
                    if not line.strip():
                        continue
                    self.engine_events += 1
                    event = orjson.loads(line)
                    target = event_target(event) if isinstance(event, dict) else None
                    if not target:
                        continue
                    action, cid = target
                    if action in GONE:
                        await self._forget(cid)
                    elif action in REINSPECT or cid in self._containers or \
                            cid in self._inspecting:
                        queue.put_nowait(cid)
                    elif action == "connect":
                        # A container we do not hold joining a network: one
                        # starting (its start follows), looked at at once
                        # without waiting for the start (_preview).
                        queue.put_nowait((cid, (event.get("Actor") or {}).get("ID") or ""))
                    # A disconnect of a container we do not hold: one gone,
                    # whose inspection would wait for its clean-up.
            queue.put_nowait(EngineError("the engine closed its event stream"))
        except asyncio.CancelledError:
            raise
        except Exception as e:  # handed to the follower, which reconnects
            queue.put_nowait(e)

    async def _forget(self, cid: str) -> None:
        """A dead container's addresses lose its identity now, not after the
        inspections queued ahead. (Before the listing is emitted, the removal
        waits for it: the listing then shows it.)"""
        if cid in self._inspecting:
            self._died.add(cid)
        self._containers.pop(cid, None)
        if self._live:
            await self._publish()

    async def _preview(self, http: aiohttp.ClientSession,
                       joins: list[tuple[str, str]]) -> None:
        """Containers joining a network as they start. dockerd reports the
        `connect` some 0.4 s before the `start` (it creates the container's
        task in between, holding the container, so an inspection would wait
        for the start), and a process may send the moment it runs. The
        network's endpoint (its addresses) and the engine's list (name,
        labels) answer at once: the container's identity is in place before
        its first packet. The inspection after `start` replaces this first
        view; a start that fails is forgotten by its `die`/`disconnect`."""
        cids = {cid for cid, _ in joins}
        self._inspecting |= cids  # a death meanwhile drops the answer
        found: dict[str, DiscoveredWorkload] = {}
        try:
            for cid, network in joins:
                seen = await self._peek(http, cid, network)
                if seen is not None:
                    before = found.get(cid)
                    found[cid] = seen if before is None else DiscoveredWorkload.make(
                        seen.name, seen.label_map, (*before.addresses, *seen.addresses),
                        SOURCE, cid)
        finally:
            self._inspecting -= cids
            died, self._died = self._died & cids, self._died - cids
        held = {a: other for other, w in self._containers.items() for a in w.addresses}
        for cid, w in found.items():
            # Known better already (inspected), gone, or an address another
            # container still holds (its death is on its way): left to the
            # inspection after the start.
            if cid in self._containers or cid in died or \
                    any(held.get(a, cid) != cid for a in w.addresses):
                continue
            self._containers[cid] = w
            self.previews += 1

    async def _peek(self, http: aiohttp.ClientSession, cid: str,
                    network: str) -> DiscoveredWorkload | None:
        if not network:
            return None
        async with http.get(f"{self._api}/networks/{network}") as resp:
            if resp.status == 404:
                return None
            endpoint = ((await _json(resp, dict)).get("Containers") or {}).get(cid)
        if not isinstance(endpoint, dict):
            return None
        addresses = [str(a).split("/")[0] for a in (endpoint.get("IPv4Address"),
                                                    endpoint.get("IPv6Address")) if a]
        params = {"all": "1", "filters": orjson.dumps({"id": [cid]}).decode()}
        async with http.get(f"{self._api}/containers/json", params=params) as resp:
            listed = await _json(resp, list)
        entry = next((c for c in listed if isinstance(c, dict) and c.get("Id") == cid), None)
        if entry is None:
            return None
        names = entry.get("Names") or []
        name = str(names[0]).lstrip("/") if names else str(endpoint.get("Name") or "")
        labels = entry.get("Labels") if isinstance(entry.get("Labels"), dict) else {}
        return DiscoveredWorkload.make(name, labels, _addresses(*addresses), SOURCE, cid)

    async def _resync(self, http: aiohttp.ClientSession) -> None:
        async with http.get(f"{self._api}/containers/json") as resp:
            listed = await _json(resp, list)
            ids = [c.get("Id") for c in listed if isinstance(c, dict) and c.get("Id")]
            del listed
        self._containers = {}
        await self._refresh(http, ids)
        await self._refresh(http, self._clashes())
        self.up = True
        self.since = time.time()
        if self._outage_logged:
            log.info("docker engine at %s is back: %d containers", self.socket_path,
                     len(self._containers))
        else:
            log.info("following docker engine at %s: %d containers", self.socket_path,
                     len(self._containers))
        self._outage_logged = False
        await self._publish(always=True)  # a consumer learns the inventory is fresh

    async def _apply(self, http: aiohttp.ClientSession, ids: list[str]) -> None:
        """Inspect again the containers whose events arrived together; one
        emission for all of them."""
        await self._refresh(http, ids)
        await self._refresh(http, self._clashes() - set(ids))
        await self._publish()

    async def _refresh(self, http: aiohttp.ClientSession, ids: Iterable[str]) -> None:
        """Inspect the containers again; the ones not running are forgotten.
        A refreshed one moves to the end: on a name clash the freshest wins."""
        ids = set(ids)
        sem = asyncio.Semaphore(INSPECT_CONCURRENCY)

        async def inspect_one(cid: str) -> tuple[str, DiscoveredWorkload | None]:
            async with sem:
                return cid, await self._inspect(http, cid)

        self._inspecting |= ids
        try:
            async with asyncio.TaskGroup() as tasks:
                running = [tasks.create_task(inspect_one(cid)) for cid in ids]
        except ExceptionGroup as group:
            raise group.exceptions[0] from None
        finally:
            self._inspecting -= ids
            died, self._died = self._died & ids, self._died - ids
        for task in running:
            cid, workload = task.result()
            if cid in died:  # the answer may be older than the death
                continue
            self._containers.pop(cid, None)
            if workload is not None:
                self._containers[cid] = workload

    async def _inspect(self, http: aiohttp.ClientSession, cid: str) -> DiscoveredWorkload | None:
        async with http.get(f"{self._api}/containers/{cid}/json") as resp:
            if resp.status == 404:  # removed meanwhile
                return None
            return workload_of(await _json(resp, dict))

    def _clashes(self) -> set[str]:
        """Containers whose name or an address another one also claims. The
        engine allows neither, so one of each pair is stale: an inspection
        older than a rename or a stop whose event is still on its way. Asking
        again settles it before anything is emitted; a lasting clash (two
        networks with overlapping subnets) costs a few inspections, no loop."""
        claims: dict[object, list[str]] = {}
        for cid, w in self._containers.items():
            for claim in (w.name, *w.addresses):
                claims.setdefault(claim, []).append(cid)
        return {cid for ids in claims.values() if len(ids) > 1 for cid in ids}

    async def _publish(self, always: bool = False) -> None:
        """Emit the inventory if it changed. The lock keeps calls in order
        and each one's mapping and changes computed together."""
        async with self._emitting:
            named: dict[str, DiscoveredWorkload] = {}
            for workload in self._containers.values():
                named[workload.name] = workload
            changes = diff(self._workloads, named)
            self._workloads = named
            self.changes.update(change.action for change in changes)
            self._live = True
            if not (changes or always):
                return
            assert self._on_change is not None
            try:
                result = self._on_change(named, changes)
                if inspect.isawaitable(result):
                    await result
            except Exception as e:
                raise _ConsumerError from e


async def _check(resp: aiohttp.ClientResponse) -> None:
    if resp.status >= 400:
        try:
            message = orjson.loads(await resp.read()).get("message")
        except (ValueError, AttributeError):
            message = None
        raise EngineError(f"{resp.method} {resp.url.path}: HTTP {resp.status}"
                          + (f": {message}" if message else ""))


async def _json(resp: aiohttp.ClientResponse, kind: type) -> Any:
    await _check(resp)
    data = orjson.loads(await resp.read())
    if not isinstance(data, kind):
        raise EngineError(f"{resp.method} {resp.url.path}: not a JSON {kind.__name__}")
    return data


def _reason(e: BaseException) -> str:
    """One line for the log and `status`."""
    if isinstance(e, aiohttp.ClientConnectorError):
        return f"cannot connect ({_os_reason(e.os_error)})"
    if isinstance(e, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return "the engine closed the connection"
    if isinstance(e, TimeoutError):
        return "no answer in time"
    if isinstance(e, OSError):
        return _os_reason(e)
    if isinstance(e, DockerSocketError):  # "docker socket PATH: why": the log names PATH
        return str(e).split(": ", 1)[-1]
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
