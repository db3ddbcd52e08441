"""The control API: HTTP over the daemon's unix socket (aiohttp).

    GET  /v1/status            the daemon, its interfaces and policy
    GET  /v1/policy            the active policy with per-rule hits (`policy show`)
    POST /v1/policy/reload     re-read the policy file now (`policy apply`, SIGHUP)

Every response is JSON; errors are {"error": "..."} with a 4xx/5xx status.
The socket is 0600 (root) or 0660 with --socket-group; on top of the file
mode, each connection's peer credentials (SO_PEERCRED) are checked.
"""

from __future__ import annotations

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

if TYPE_CHECKING:
    from .daemon import Daemon

log = logging.getLogger("microseg.api")

_PEERCRED = struct.Struct("3i")  # pid, uid, gid


def json_response(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status,
                        content_type="application/json")


def error(status: int, message: str) -> web.Response:
    return json_response({"error": message}, status)


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


def build_app(daemon: Daemon, group_gid: int | None) -> web.Application:
    @web.middleware
    async def credentials(request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                          ) -> web.StreamResponse:
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is None or not peer_allowed(sock, group_gid):
            return error(403, "permission denied: root or the --socket-group group only")
        return await handler(request)

    async def status(request: web.Request) -> web.Response:
        return json_response(daemon.status())

    async def policy_show(request: web.Request) -> web.Response:
        return json_response(await daemon.policy_show())

    async def policy_reload(request: web.Request) -> web.Response:
        res = await daemon.policy.reload("api", force=request.query.get("force") == "1")
        return json_response(res.as_dict())

    app = web.Application(middlewares=[credentials])
    app.router.add_get("/v1/status", status)
    app.router.add_get("/v1/policy", policy_show)
    app.router.add_post("/v1/policy/reload", policy_reload)
    daemon.add_routes(app)
    return app


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
