"""Talk to a running daemon over its control socket (see microseg/api.py)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import aiohttp
import orjson

if TYPE_CHECKING:
    from microseg.policy.model import Policy
    from microseg.policy.parse import LoadedPolicy

DEFAULT_SOCKET = "/run/microseg/microseg.sock"


def default_socket() -> str:
    return os.environ.get("MICROSEG_SOCKET") or DEFAULT_SOCKET


class DaemonError(Exception):
    """The daemon could not be reached or refused the request."""

    def __init__(self, message: str, privileges: bool = False) -> None:
        super().__init__(message)
        self.privileges = privileges


class Client:
    def __init__(self, socket_path: str | None = None, timeout: float | None = 30) -> None:
        self.socket_path = socket_path or default_socket()
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_read=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        if not os.path.exists(self.socket_path):
            raise DaemonError(f"daemon not reachable: no socket at {self.socket_path} "
                              "(is `microseg run` running? --socket or $MICROSEG_SOCKET)")
        conn = aiohttp.UnixConnector(path=self.socket_path)
        self._session = aiohttp.ClientSession(connector=conn, timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    def _url(self, path: str) -> str:
        return f"http://microseg{path}"

    async def _check(self, resp: aiohttp.ClientResponse) -> None:
        if resp.status < 400:
            return
        try:
            message = (await resp.json(loads=orjson.loads))["error"]
        except (ValueError, KeyError, aiohttp.ContentTypeError):
            message = f"HTTP {resp.status}"
        raise DaemonError(message, privileges=resp.status == 403)

    def _denied(self) -> DaemonError:
        """Refused by the socket's mode: missing privileges, not a daemon
        that is unreachable (exit 3, not 1: see the README's Commands)."""
        return DaemonError(f"permission denied on {self.socket_path}: run as root or "
                           "as a member of the daemon's --socket-group", True)

    def _connect_error(self, e: aiohttp.ClientConnectorError) -> DaemonError:
        if isinstance(e.os_error, PermissionError):
            return self._denied()
        return DaemonError(f"daemon not reachable at {self.socket_path} ({e.os_error})")

    async def request(self, method: str, path: str, *, body: bytes | None = None,
                      **params: object) -> dict:
        assert self._session is not None
        query = {k: str(v) for k, v in params.items() if v is not None}
        try:
            async with self._session.request(method, self._url(path), params=query,
                                             data=body) as resp:
                await self._check(resp)
                return await resp.json(loads=orjson.loads)
        except PermissionError as e:
            raise self._denied() from e
        except aiohttp.ClientConnectorError as e:
            raise self._connect_error(e) from e

    async def get(self, path: str, **params: object) -> dict:
        return await self.request("GET", path, **params)

    async def post(self, path: str, *, body: bytes | None = None, **params: object) -> dict:
        return await self.request("POST", path, body=body, **params)

    async def stream_lines(self, path: str, **params: object) -> AsyncIterator[list[bytes]]:
        """NDJSON from a streaming endpoint as it arrives: lists of whole
        lines (newline included), unparsed."""
        assert self._session is not None
        query = {k: str(v) for k, v in params.items() if v is not None}
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        rest = b""
        try:
            async with self._session.get(self._url(path), params=query,
                                         timeout=timeout) as resp:
                await self._check(resp)
                async for chunk in resp.content.iter_any():
                    data = rest + chunk
                    cut = data.rfind(b"\n") + 1
                    rest = data[cut:]
                    if cut:
                        yield data[:cut].splitlines(keepends=True)
        except aiohttp.ClientConnectorError as e:
            raise self._connect_error(e) from e
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as e:
            raise DaemonError(f"the daemon went away ({e.__class__.__name__})") from e

    async def stream(self, path: str, **params: object) -> AsyncIterator[dict]:
        """NDJSON lines from a streaming endpoint, one dict each."""
        async for lines in self.stream_lines(path, **params):
            for line in lines:
                if line.strip():
                    yield orjson.loads(line)


# -- what the lifecycle commands read from a daemon ---------------------------


@dataclass(frozen=True)
class DaemonPolicy:
    """The daemon's active policy as a client can evaluate it: the policy
    file as loaded (its own workloads, `discover` section, rules) and the
    merged policy it is compiled from (plus every discovered workload)."""

    loaded: LoadedPolicy
    policy: Policy
    generation: int
    text: str


async def fetch_policy(c: Client) -> DaemonPolicy:
    """`GET /v1/policy/source`: the active file's text and every workload the
    daemon knows; merged here with the same code the daemon merges with."""
    from microseg.policy.inventory import merge
    from microseg.policy.parse import PolicyError, parse_policy

    doc = await c.get("/v1/policy/source")
    if not doc.get("generation"):
        raise DaemonError("the daemon has no policy applied yet")
    text = doc["text"]
    try:
        loaded = parse_policy(text.encode(), doc["source"])
    except PolicyError as e:  # it was valid when the daemon applied it
        raise DaemonError(f"the daemon's policy no longer parses here: {e}") from None
    discovered = discovered_from_rows(doc["known"])
    return DaemonPolicy(loaded, merge(loaded.policy, discovered).policy, doc["generation"],
                        text)


def discovered_from_rows(rows: list[dict]) -> dict[str, dict]:
    """`known` rows (GET /v1/policy/source) as the discovered inventory the
    daemon merged: by source, then name."""
    from microseg.inventory.model import DiscoveredWorkload
    from microseg.policy.inventory import STATIC
    from microseg.policy.model import selector_name

    discovered: dict[str, dict[str, DiscoveredWorkload]] = {}
    for k in rows:
        if k["source"] != STATIC:
            # Another node's keeps its node and its own name: the merge names
            # it NAME@NODE again where the daemon's did.
            node = k.get("node")
            name = selector_name(k["workload"]) if node else k["workload"]
            discovered.setdefault(k["source"], {})[k["workload"]] = DiscoveredWorkload.make(
                name, k["labels"], k["addresses"], k["source"], "", node=node)
    return discovered


async def fetch_flows(c: Client) -> list[dict]:
    """`GET /v1/flows`: the daemon's flow aggregate, one record per observed
    flow (the format of microseg.flow.observed)."""
    out: list[dict] = []
    async for flow in c.stream("/v1/flows"):
        out.append(flow)
    return out
