"""The Docker source against Podman's Docker-compatible API: a private
`podman system service` (own storage, run and network-config directories and
socket), a busybox image imported locally, a network of its own. Listing,
labels and addresses, a start and a removal, as with dockerd."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from microseg.inventory.docker import DockerSource, check_socket
from microseg.inventory.model import DiscoveredWorkload
from microseg.lab.dockerd import APPLETS, BUSYBOX

IMAGE = "msbusybox:1"
NETWORK, SUBNET = "mspnet", "10.246.0.0/24"
# This VM's hard limits are below Podman's default rlimits, which runc then
# fails to set: containers get ordinary ones.
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]


class Podman:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="mspod-", dir="/tmp"))
        self.sock = self.root / "p.sock"
        self.base = ["podman", "--root", str(self.root / "s"), "--runroot", str(self.root / "r"),
                     "--network-config-dir", str(self.root / "n"), "--cgroup-manager", "cgroupfs",
                     "--events-backend", "file"]
        self.proc: subprocess.Popen | None = None

    def __call__(self, *args: str, check: bool = True) -> str:
        done = subprocess.run([*self.base, *args], capture_output=True, text=True, timeout=60)
        if check and done.returncode:
            raise RuntimeError(f"podman {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout.strip()

    def start(self) -> None:
        (self.root / "n").mkdir()
        self.proc = subprocess.Popen([*self.base, "system", "service", "--time=0",
                                      f"unix://{self.sock}"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 20
        while not self.sock.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("podman system service did not start")
            time.sleep(0.05)
        with tempfile.TemporaryDirectory(prefix="mspimg-") as tmp:
            (Path(tmp) / "bin").mkdir()
            shutil.copy2(BUSYBOX, Path(tmp) / "bin" / "busybox")
            for applet in APPLETS:
                (Path(tmp) / "bin" / applet).symlink_to("busybox")
            tar = subprocess.run(["tar", "-C", tmp, "-c", "."], capture_output=True, check=True)
        subprocess.run([*self.base, "import", "-", IMAGE], input=tar.stdout,
                       capture_output=True, check=True, timeout=60)
        self("network", "create", "--subnet", SUBNET, NETWORK)

    def run(self, name: str, **labels: str) -> str:
        args = ["run", "-d", *LIMITS, "--network", NETWORK, "--name", name]
        for k, v in labels.items():
            args += ["--label", f"{k}={v}"]
        return self(*args, IMAGE, "sleep", "600")

    def address(self, name: str) -> str:
        return self("inspect", "--format",
                    "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", name)

    def teardown(self) -> None:
        with contextlib.suppress(Exception):
            self("rm", "-af", "-t", "0", check=False)
            self("network", "rm", "-f", NETWORK, check=False)
            self("system", "reset", "-f", check=False)
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split()[4] for line in f if f" {self.root}/" in line]
        for mount in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mount], capture_output=True)
        shutil.rmtree(self.root, ignore_errors=True)


def _links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


@pytest.fixture
def podman() -> Iterator[Podman]:
    if shutil.which("podman") is None or not BUSYBOX.exists():
        pytest.skip("needs podman and busybox-static (make setup installs them)")
    before = _links()
    made = Podman()
    try:
        try:
            made.start()
        except (RuntimeError, subprocess.SubprocessError) as e:
            pytest.skip(f"this machine cannot run Podman: {e}")
        yield made
    finally:
        made.teardown()
    assert _links() <= before, f"podman left links behind: {_links() - before}"
    assert not made.root.exists()


async def test_podman_socket_works_like_docker(podman: Podman) -> None:
    check_socket(str(podman.sock))  # a Docker API, and only root may write to it
    web = await asyncio.to_thread(podman.run, "pweb", tier="web", app="shop")
    calls: list[dict[str, DiscoveredWorkload]] = []
    changed = asyncio.Event()

    def on_change(workloads, changes) -> None:
        calls.append(dict(workloads))
        changed.set()

    source = DockerSource(str(podman.sock))
    task = asyncio.create_task(source.run(on_change))

    async def until(predicate, timeout: float = 15.0) -> dict[str, DiscoveredWorkload]:
        deadline = time.monotonic() + timeout
        while True:
            if calls and predicate(calls[-1]):
                return calls[-1]
            changed.clear()
            left = deadline - time.monotonic()
            assert left > 0, (calls[-1] if calls else None)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), left)

    try:
        listed = await until(lambda w: "pweb" in w)
        address = await asyncio.to_thread(podman.address, "pweb")
        assert listed["pweb"] == DiscoveredWorkload.make(
            "pweb", {"tier": "web", "app": "shop"}, [address], "docker", web)

        api = await asyncio.to_thread(podman.run, "papi", tier="api")
        started = await until(lambda w: "papi" in w)
        assert started["papi"].label_map == {"tier": "api"} and started["papi"].ident == api
        assert [str(a) for a in started["papi"].addresses] == \
            [await asyncio.to_thread(podman.address, "papi")]

        await asyncio.to_thread(podman, "rm", "-f", "-t", "0", "papi")
        gone = await until(lambda w: "papi" not in w)
        assert set(gone) == {"pweb"}
        assert source.up and source.errors == 0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
