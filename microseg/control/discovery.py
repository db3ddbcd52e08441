"""The daemon's discovery sources: started and stopped as the policy's
`discover` section says, each one's inventory handed to the policy manager,
which compiles it in and applies it as a generation (docs/policy.md
"Discovery").

A source that cannot reach its engine never stops the daemon: it is said
once in one line, shown in `status`, retried with back-off, and the last
known inventory stays enforced meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping

from microseg.flow.hub import rfc3339
from microseg.inventory.docker import DockerSocketError, DockerSource, check_socket
from microseg.inventory.model import Change, DiscoveredWorkload
from microseg.policy.manager import PolicyManager
from microseg.policy.model import Discovery

log = logging.getLogger("microseg.discovery")

# How long the first policy apply waits for a source's first inventory, so a
# (re)started daemon does not judge running containers as strangers.
FIRST_INVENTORY_WAIT_S = 5.0


class Sources:
    def __init__(self, policy: PolicyManager) -> None:
        self.policy = policy
        self.docker: DockerSource | None = None
        self._task: asyncio.Task | None = None
        self._first = asyncio.Event()
        # Counted across sources replaced by a policy edit: metrics are totals.
        self._changes: dict[tuple[str, str], int] = {}
        self._errors_before = 0

    def configure(self, discover: Discovery) -> None:
        """Follow what the policy's `discover` section names now."""
        want = discover.docker_socket
        if self.docker is not None and self.docker.socket_path == want:
            return
        self.stop_nowait()
        self.policy.forget_source("docker")
        if want is None:
            return
        self._changes.setdefault(("docker", "added"), 0)  # exported from now on
        self.docker = DockerSource(want)
        self._first = asyncio.Event()
        self._task = asyncio.create_task(self._run(self.docker), name="discover-docker")

    async def _run(self, source: DockerSource) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, check_socket, source.socket_path)
        except DockerSocketError as e:
            log.error("discover: %s; the policy file's workloads are enforced, retrying "
                      "with back-off", e)
        try:
            await source.run(self._on_change)
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug in applying: say it, keep enforcing what was applied
            log.exception("discover: docker source stopped")

    async def _on_change(self, workloads: Mapping[str, DiscoveredWorkload],
                         changes: tuple[Change, ...]) -> None:
        # Shielded: a policy edit that stops this source must not cancel an
        # apply half-way (the datapath switched, the manager not told).
        await asyncio.shield(self.policy.update_discovered("docker", workloads))
        self._first.set()
        for change in changes:
            key = ("docker", change.action)
            self._changes[key] = self._changes.get(key, 0) + 1

    async def first_inventory(self, timeout: float = FIRST_INVENTORY_WAIT_S) -> None:
        """Wait (bounded) for the first inventory of the configured source."""
        if self.docker is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._first.wait(), timeout)
        if not self._first.is_set():
            log.warning("discover: no inventory from %s within %.0f s: starting with the "
                        "policy file's workloads", self.docker.socket_path, timeout)

    def stop_nowait(self) -> None:
        if self.docker is not None:
            self._errors_before += self.docker.errors
        if self._task is not None:
            self._task.cancel()
        self._task = None
        self.docker = None

    async def stop(self) -> None:
        task = self._task
        self.stop_nowait()
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- what status and metrics show ------------------------------------------

    def changes_by_action(self) -> dict[tuple[str, str], int]:
        return dict(self._changes)

    def errors(self) -> dict[str, int]:
        if self.docker is None and not self._errors_before:
            return {}
        return {"docker": self._errors_before + (self.docker.errors if self.docker else 0)}

    def status(self) -> dict:
        d = self.docker
        if d is None:
            return {}
        return {"docker": {
            "socket": d.socket_path, "up": d.up, "since": rfc3339(int(d.since * 1e9)),
            "last_error": d.last_error, "workloads": len(d.workloads),
            "engine_events": d.engine_events, "errors": d.errors,
            "changes": dict(d.changes)}}
