"""An etcd v3 client over etcd's JSON gateway (docs/many-hosts.md "etcd").

etcd (≥ 3.4) serves its v3 API as JSON over HTTP beside gRPC: `/v3/kv/range`,
`/v3/kv/put`, `/v3/lease/*` and a streaming `/v3/watch`. Speaking it with
aiohttp, which the daemon already uses, needs no new dependency and none of
the gRPC/protobuf stacks whose versions the Python etcd clients pin.

Every key is under the client's prefix: a key outside it cannot be named,
so microseg touches no other part of the keyspace. Keys and values are bytes
(base64 on the wire); revisions and lease ids are ints (strings on the wire).

    async with EtcdClient(["https://10.0.0.5:2379"], "/microseg/", tls) as c:
        rev, kvs = await c.range_prefix("nodes/")
        async for rev, events in c.watch("nodes/", rev + 1): ...
"""

from __future__ import annotations

import asyncio
import base64
import errno
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
import orjson

# A request that takes longer is a failure: etcd answers in milliseconds, and
# a partition must show within seconds (docs/many-hosts.md "Faults").
REQUEST_TIMEOUT_S = 2.0
MAX_WATCH_LINE = 64 << 20  # one watch response: many events after a burst


class EtcdError(Exception):
    """etcd cannot be reached or refused a request: one line, naming the
    endpoint."""


class Compacted(EtcdError):
    """A watch asked for revisions etcd has compacted away: list again."""


@dataclass(frozen=True)
class TLSFiles:
    cacert: str | None = None
    cert: str | None = None
    key: str | None = None

    def context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=self.cacert)
        if self.cert:
            ctx.load_cert_chain(self.cert, self.key)
        return ctx


@dataclass(frozen=True)
class KeyValue:
    key: str            # below the prefix
    value: bytes
    mod_revision: int


@dataclass(frozen=True)
class Event:
    kind: str           # "put" | "delete"
    kv: KeyValue


def check_endpoints(endpoints: Sequence[str], tls: TLSFiles | None) -> list[str]:
    """http(s)://HOST:PORT URLs; ValueError with one line otherwise."""
    out = []
    for e in endpoints:
        e = e.strip().rstrip("/")
        if "://" not in e:
            e = ("https://" if tls and tls.cacert else "http://") + e
        u = urlsplit(e)
        if u.scheme not in ("http", "https") or not u.hostname or u.path:
            raise ValueError(f"--etcd {e}: not an endpoint like https://10.0.0.5:2379")
        out.append(e)
    if not out:
        raise ValueError("--etcd: give at least one endpoint")
    return out


def check_prefix(prefix: str) -> str:
    if not prefix.startswith("/") or not prefix.endswith("/") or len(prefix) < 3:
        raise ValueError(f"--etcd-prefix {prefix!r}: a key prefix like /microseg/ "
                         "(starting and ending with '/')")
    return prefix


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _range_end(prefix: bytes) -> bytes:
    """The end of the key range holding every key that starts with prefix."""
    p = bytearray(prefix)
    while p:
        if p[-1] < 0xFF:
            p[-1] += 1
            return bytes(p)
        p.pop()
    return b"\0"


class EtcdClient:
    """One logical connection to an etcd cluster: requests go to the first
    endpoint that answers, and stay there until it fails."""

    def __init__(self, endpoints: Sequence[str], prefix: str,
                 tls: TLSFiles | None = None, timeout: float = REQUEST_TIMEOUT_S) -> None:
        self.endpoints = check_endpoints(endpoints, tls)
        self.prefix = check_prefix(prefix)
        self._pfx = prefix.encode()
        # https is always verified: against --etcd-cacert, else the system's
        # CAs (never unverified: whoever poses as etcd names identities).
        self._ssl = (tls or TLSFiles()).context()
        self._timeout = timeout
        self._current = 0
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> EtcdClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=16),
                json_serialize=lambda o: orjson.dumps(o).decode())
        return self._session

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._current]

    def _key(self, key: str) -> bytes:
        return self._pfx + key.encode()

    def _kv(self, d: dict) -> KeyValue:
        key = base64.b64decode(d.get("key", ""))
        if not key.startswith(self._pfx):  # etcd answers only what was asked
            raise EtcdError(f"etcd {self.endpoint}: a key outside {self.prefix} in an answer")
        return KeyValue(key[len(self._pfx):].decode(errors="replace"),
                        base64.b64decode(d.get("value", "")),
                        int(d.get("mod_revision", 0)))

    # -- requests --------------------------------------------------------------

    def _move_on(self, failed: int) -> None:
        """The next endpoint, after the one that failed (unless a concurrent
        request moved on already)."""
        if self._current == failed:
            self._current = (failed + 1) % len(self.endpoints)

    async def _post(self, path: str, body: dict) -> dict:
        """One request, to each endpoint in turn until one answers. A member
        that answers 5xx (no leader: cut off from the majority) is moved on
        from like a silent one."""
        last: Exception | None = None
        for _ in range(len(self.endpoints)):
            at = self._current
            url = self.endpoints[at] + path
            try:
                async with self._http().post(
                        url, json=body,
                        timeout=aiohttp.ClientTimeout(total=self._timeout)) as r:
                    data = await r.read()
                    if r.status < 500:
                        return self._answer(r.status, data)
                    last = EtcdError(self._answer_error(r.status, data))
            except (aiohttp.ClientError, OSError, TimeoutError) as e:
                last = e
            self._move_on(at)
        if isinstance(last, EtcdError):
            raise last
        raise EtcdError(_unreachable(self.endpoints, last))

    def _answer_error(self, status: int, data: bytes) -> str:
        try:
            self._answer(status, data)
        except EtcdError as e:
            return str(e)
        return f"etcd {self.endpoint}: HTTP {status}"

    def _answer(self, status: int, data: bytes) -> dict:
        try:
            d = orjson.loads(data) if data else {}
        except orjson.JSONDecodeError:
            d = None
        if not isinstance(d, dict):
            raise EtcdError(f"etcd {self.endpoint}: HTTP {status}, not an etcd answer "
                            f"({data[:80]!r})")
        if status != 200 or "error" in d:
            raise EtcdError(f"etcd {self.endpoint}: {d.get('message') or d.get('error')} "
                            f"(HTTP {status})")
        return d

    async def range_prefix(self, prefix: str = "") -> tuple[int, list[KeyValue]]:
        """Every key under prefix+prefix, and the revision of that view."""
        k = self._key(prefix)
        d = await self._post("/v3/kv/range", {"key": _b64(k), "range_end": _b64(_range_end(k))})
        return int(d["header"]["revision"]), [self._kv(kv) for kv in d.get("kvs", [])]

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        """The revision the write made."""
        body: dict = {"key": _b64(self._key(key)), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        d = await self._post("/v3/kv/put", body)
        return int(d["header"]["revision"])

    async def delete(self, key: str) -> int:
        d = await self._post("/v3/kv/deleterange", {"key": _b64(self._key(key))})
        return int(d.get("deleted", 0))

    async def delete_prefix(self, prefix: str) -> int:
        k = self._key(prefix)
        d = await self._post("/v3/kv/deleterange",
                             {"key": _b64(k), "range_end": _b64(_range_end(k))})
        return int(d.get("deleted", 0))

    async def grant(self, ttl: int) -> int:
        d = await self._post("/v3/lease/grant", {"TTL": str(ttl)})
        return int(d["ID"])

    async def keepalive(self, lease: int) -> int:
        """The lease's renewed TTL; 0 when the lease is gone (expired)."""
        d = await self._post("/v3/lease/keepalive", {"ID": str(lease)})
        return int(d.get("result", {}).get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        try:
            await self._post("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdError as e:
            if "lease not found" not in str(e):
                raise

    async def watch(self, prefix: str, start_revision: int
                    ) -> AsyncIterator[tuple[int, list[Event]]]:
        """Changes under prefix from start_revision on, as (revision, events)
        batches, until the stream breaks (EtcdError) or etcd compacted the
        revision (Compacted). A batch of no events is a progress report."""
        k = self._key(prefix)
        body = {"create_request": {"key": _b64(k), "range_end": _b64(_range_end(k)),
                                   "start_revision": str(start_revision),
                                   "progress_notify": True}}
        at = self._current
        url = self.endpoints[at] + "/v3/watch"
        try:
            async with self._http().post(
                    url, json=body, timeout=aiohttp.ClientTimeout(
                        total=None, connect=self._timeout, sock_connect=self._timeout)) as r:
                if r.status != 200:
                    self._answer(r.status, await r.read())
                r.content._high_water = MAX_WATCH_LINE  # long lines after bursts
                while True:
                    line = await r.content.readline()
                    if not line:
                        raise EtcdError(f"etcd {self.endpoint}: the watch stream ended")
                    yield self._watch_batch(line)
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            self._move_on(at)
            raise EtcdError(_unreachable([url], e)) from None
        except ValueError as e:  # a line past MAX_WATCH_LINE
            raise EtcdError(f"etcd {self.endpoint}: watch: {e}") from None

    def _watch_batch(self, line: bytes) -> tuple[int, list[Event]]:
        try:
            return self._parse_watch(orjson.loads(line))
        except EtcdError:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise EtcdError(f"etcd {self.endpoint}: watch: not an etcd answer "
                            f"({type(e).__name__}: {line[:80]!r})") from None

    def _parse_watch(self, d: dict) -> tuple[int, list[Event]]:
        if "error" in d:
            raise EtcdError(f"etcd {self.endpoint}: watch: "
                            f"{d['error'].get('message', d['error'])}")
        res = d.get("result", {})
        if int(res.get("compact_revision", 0)):
            raise Compacted(f"etcd {self.endpoint}: revisions before "
                            f"{res['compact_revision']} were compacted")
        if res.get("canceled"):
            raise EtcdError(f"etcd {self.endpoint}: the watch was cancelled "
                            f"({res.get('cancel_reason', 'no reason given')})")
        events = [Event("delete" if ev.get("type") == "DELETE" else "put", self._kv(ev["kv"]))
                  for ev in res.get("events", [])]
        return int(res.get("header", {}).get("revision", 0)), events


def _unreachable(endpoints: Sequence[str], e: BaseException | None) -> str:
    why = "timed out" if isinstance(e, TimeoutError | asyncio.TimeoutError) else \
        (str(e) or type(e).__name__ if e else "no answer")
    if isinstance(e, aiohttp.ClientSSLError | ssl.SSLError) or "[SSL" in why:
        # Its certificate, or ours, not trusted: no retry mends that.
        return f"etcd {', '.join(endpoints)}: TLS handshake failed ({why})"
    if getattr(e, "errno", None) == errno.ECONNRESET and \
            any(u.startswith("https:") for u in endpoints):
        # TLS 1.3: a server refuses our certificate after our side of the
        # handshake is done, and its reset can overtake its alert.
        return (f"etcd {', '.join(endpoints)}: TLS handshake failed or the connection was "
                f"reset right after it (a client certificate etcd does not trust? {why})")
    return f"etcd {', '.join(endpoints)}: unreachable ({why})"
