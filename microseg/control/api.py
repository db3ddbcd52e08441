"""The control API: HTTP over the daemon's unix socket (aiohttp).

    GET  /v1/status            the daemon, its interfaces and policy
    GET  /v1/policy            the active policy with per-rule hits (`policy show`)
    POST /v1/policy/reload     re-read the policy file now (`policy apply`, SIGHUP)
    GET  /v1/events            event stream, NDJSON (`watch`): filters type, verdict,
                               ip, from_ip, to_ip, port, protocol, workload, rule;
                               last=N (recent first), follow=0 (stop after those),
                               count=N (stop after N matching events)
    GET  /v1/sessions          the session table, NDJSON, streamed (`sessions`):
                               filters protocol, state, ip, workload
    GET  /v1/stats             counters, rates, table fill, loss (`stats`)
    GET  /v1/workloads         every workload known, NDJSON (`workloads`)
    GET  /v1/policy/source     the active policy file's text and the workloads known
                               (`policy suggest/trace/diff` evaluate it themselves)
    GET  /v1/flows             the flow aggregate, NDJSON (`policy suggest/diff`)
    POST /v1/policy/stage      body: a candidate policy; staged beside the active one
                               (result "staged", or "rejected" with every error)
    GET  /v1/policy/staged     the staged candidate and what it would change
    POST /v1/policy/staged/promote   make it the policy file and the active policy
    POST /v1/policy/staged/clear     drop it (409 when nothing is staged)

Responses are JSON (streams: one object per line); errors are
{"error": "..."} with a 4xx/5xx status.
The socket is 0600 (root) or 0660 with --socket-group; on top of the file
mode, each connection's peer credentials (SO_PEERCRED) are checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import socket
import stat
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from microseg.cluster.etcd import EtcdError
from microseg.flow.filters import EVENT_KEYS, SESSION_KEYS, Filter, FilterError
from microseg.flow.hub import ndjson
from microseg.policy.parse import PolicyError, parse_policy
from microseg.policy.staging import NothingStaged

if TYPE_CHECKING:
    from microseg.control.views import Views

log = logging.getLogger("microseg.api")

_PEERCRED = struct.Struct("3i")  # pid, uid, gid
STREAM_QUEUE = 32768  # events a watch client may fall behind before losing some
STREAM_BATCH = 8192  # per write: as many as the pipeline publishes per drain


def json_response(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status,
                        content_type="application/json")


def error(status: int, message: str) -> web.Response:
    return json_response({"error": message}, status)


def peer_uid(sock: socket.socket) -> int | None:
    try:
        return _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))[1]
    except OSError:
        return None


def peer_allowed(sock: socket.socket, group_gid: int | None) -> bool:
    """Root, or (with --socket-group) a member of that group."""
    try:
        pid, uid, gid = _PEERCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    except OSError:
        return False
    if uid == 0:
        return True
    if group_gid is None:
        return False
    if gid == group_gid:
        return True
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return str(group_gid) in line.split()[1:]
    except OSError:
        pass
    return False


def build_app(views: Views, group_gid: int | None) -> web.Application:
    parts = views.parts
    hub, policy = parts.hub, parts.policy

    @web.middleware
    async def credentials(request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                          ) -> web.StreamResponse:
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is None or not peer_allowed(sock, group_gid):
            return error(403, "permission denied: root or the --socket-group group only")
        return await handler(request)

    async def status(request: web.Request) -> web.Response:
        return json_response(views.status())

    async def policy_show(request: web.Request) -> web.Response:
        return json_response(await views.policy_show())

    async def policy_reload(request: web.Request) -> web.Response:
        res = await policy.reload("api", force=request.query.get("force") == "1")
        return json_response(res.as_dict())

    async def events(request: web.Request) -> web.StreamResponse:
        q = request.query
        try:
            flt = Filter.parse({k: q.get(k) for k in EVENT_KEYS})
            last = _int(q.get("last"), "last")
            count = _int(q.get("count"), "count")
        except (FilterError, ValueError) as e:
            return error(400, str(e))
        follow = q.get("follow", "1") != "0"
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        sub = hub.subscribe(flt.predicate(), size=STREAM_QUEUE, last=last)
        sent = 0
        try:
            while True:
                if follow:
                    first = await sub.get()
                else:
                    first = sub.get_nowait()
                    if first is None:
                        break
                batch = [first, *sub.take(STREAM_BATCH - 1)]
                if count:
                    out = []
                    for e in batch:
                        out.append(e)
                        sent += e["type"] != "lost"
                        if sent >= count:
                            break
                    batch = out
                await resp.write(ndjson(batch))
                if count and sent >= count:
                    break
        except (ConnectionResetError, asyncio.CancelledError, StopAsyncIteration):
            pass  # the client left, or the daemon is stopping
        finally:
            sub.close()
        with contextlib.suppress(ConnectionResetError):
            await resp.write_eof()
        return resp

    async def sessions(request: web.Request) -> web.StreamResponse:
        try:
            flt = Filter.parse({k: request.query.get(k) for k in SESSION_KEYS}, SESSION_KEYS)
        except FilterError as e:
            return error(400, str(e))
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        try:
            async for rows in views.session_rows(flt):
                if rows:
                    await resp.write(b"".join(
                        orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE) for r in rows))
            await resp.write_eof()
        except ConnectionResetError:
            pass
        return resp

    async def stats(request: web.Request) -> web.Response:
        return json_response(await views.stats())

    async def policy_source(request: web.Request) -> web.Response:
        return json_response(views.policy_source())

    def root_only(request: web.Request, what: str) -> web.Response | None:
        """Staging, promoting and clearing change what the daemon enforces
        or will: only root may (a --socket-group member may read, and ask
        for a reload of the file root wrote — docs/policy.md)."""
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is None or peer_uid(sock) != 0:
            return error(403, f"permission denied: only root may {what}")
        return None

    async def stage(request: web.Request) -> web.Response:
        if (denied := root_only(request, "stage a policy")) is not None:
            return denied
        data = await request.read()
        source = request.query.get("source") or "<staged>"
        res = await policy.stager.stage(data, source)
        if res.result == "staged":
            parts.staged_changes.clear()
        return json_response(res.as_dict())

    async def staged_status(request: web.Request) -> web.Response:
        return json_response(await views.staged_status())

    async def promote(request: web.Request) -> web.Response:
        if (denied := root_only(request, "promote the staged policy")) is not None:
            return denied
        try:
            res = await policy.stager.promote()
        except NothingStaged as e:
            return error(409, str(e))
        except OSError as e:
            return error(500, f"cannot write the policy file {policy.path}: {e}")
        if res.result == "applied":
            parts.staged_changes.clear()
        return json_response(res.as_dict())

    async def clear(request: web.Request) -> web.Response:
        if (denied := root_only(request, "clear the staged policy")) is not None:
            return denied
        try:
            s = await policy.stager.clear()
        except NothingStaged as e:
            return error(409, str(e))
        parts.staged_changes.clear()
        return json_response({"result": "cleared", "source": s.loaded.source,
                              "generation": s.generation})

    async def flows(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        try:
            batch: list[bytes] = []
            for record in parts.flows.records():
                batch.append(orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE))
                if len(batch) >= STREAM_BATCH:
                    await resp.write(b"".join(batch))
                    batch = []
            await resp.write(b"".join(batch))
            await resp.write_eof()
        except ConnectionResetError:
            pass
        return resp

    async def nodes(request: web.Request) -> web.Response:
        rows = views.nodes()
        if rows is None:
            return error(409, "this daemon runs without etcd (microseg run --etcd ENDPOINT)")
        return web.Response(body=b"".join(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE)
                                          for r in rows),
                            content_type="application/x-ndjson")

    async def cluster_policy(request: web.Request) -> web.Response:
        """Validate a policy and store it in etcd as every node's."""
        if (denied := root_only(request, "apply the cluster policy")) is not None:
            return denied
        if parts.cluster is None:
            return error(409, "this daemon runs without etcd (microseg run --etcd ENDPOINT)")
        data = await request.read()
        try:
            loaded = parse_policy(data, "etcd")
        except PolicyError as e:
            return json_response({"result": "rejected", "errors": [
                i.format(request.query.get("source") or "etcd") for i in e.errors]}, 400)
        try:
            revision = await parts.cluster.put_policy(data)
        except EtcdError as e:
            return error(503, f"not stored: {e}")
        return json_response({"result": "stored", "revision": revision,
                              "sha256": loaded.sha256, "rules": len(loaded.policy.rules),
                              "workloads": len(loaded.policy.workloads)})

    async def workloads(request: web.Request) -> web.Response:
        rows = await views.workloads(request.query.get("source") or None)
        return web.Response(body=b"".join(orjson.dumps(r, option=orjson.OPT_APPEND_NEWLINE)
                                          for r in rows),
                            content_type="application/x-ndjson")

    # A staged candidate may be as large as a policy file (16 MiB).
    app = web.Application(middlewares=[credentials], client_max_size=17 << 20)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/policy", policy_show)
    app.router.add_post("/v1/policy/reload", policy_reload)
    app.router.add_get("/v1/events", events)
    app.router.add_get("/v1/sessions", sessions)
    app.router.add_get("/v1/stats", stats)
    app.router.add_get("/v1/workloads", workloads)
    app.router.add_get("/v1/nodes", nodes)
    app.router.add_post("/v1/policy/cluster", cluster_policy)
    app.router.add_get("/v1/policy/source", policy_source)
    app.router.add_post("/v1/policy/stage", stage)
    app.router.add_get("/v1/policy/staged", staged_status)
    app.router.add_post("/v1/policy/staged/promote", promote)
    app.router.add_post("/v1/policy/staged/clear", clear)
    app.router.add_get("/v1/flows", flows)
    return app


def _int(raw: str | None, name: str) -> int:
    if raw in (None, ""):
        return 0
    if not raw.isdigit():
        raise ValueError(f"{name} '{raw}': a whole number")
    return int(raw)


def prepare_socket(path: str) -> None:
    """Make the socket's directory; remove a stale socket nobody serves."""
    os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # stale: its daemon is gone
        return
    finally:
        probe.close()
    raise OSError(f"another daemon already serves {path}")


def group_id(group: str | None) -> int | None:
    """The gid of --socket-group (a name or a number)."""
    if group is None:
        return None
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise OSError(f"--socket-group: no group named '{group}'") from None


def secure_socket(path: str, gid: int | None) -> None:
    """0600 root-only, or 0660 owned by the --socket-group group."""
    if gid is None:
        os.chmod(path, 0o600)
        return
    os.chown(path, 0, gid)
    os.chmod(path, 0o660)
