"""A real `microseg run` process for end-to-end tests, on a lab.

Started as a user would start it (the CLI, a policy file, a socket), driven
through its control socket, files and signals, and always stopped — and its
clean-up checked — at the end.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from microseg.control.client import Client
from microseg.lab.topology import Lab, wait_for


class DaemonProcess:
    def __init__(self, workdir: Path, lab: Lab, policy: str, *extra: str) -> None:
        self.workdir = workdir
        self.lab = lab
        self.policy_path = workdir / "policy.yaml"
        self.socket = str(workdir / "microseg.sock")
        self.pin_dir = f"/sys/fs/bpf/mstest-{os.getpid()}-{workdir.name[-8:]}"
        self.log_path = workdir / "daemon.log"
        self.extra = list(extra)
        self.proc: subprocess.Popen | None = None
        if policy is not None:
            self.policy_path.write_text(policy)

    def argv(self) -> list[str]:
        # Metrics on a free port (tests run side by side); /v1/status says which.
        metrics = [] if "--metrics" in self.extra else ["--metrics", "127.0.0.1:0"]
        return [sys.executable, "-m", "microseg", "run", "-i", self.lab.glob,
                "--policy", str(self.policy_path), "--socket", self.socket,
                "--pin-dir", self.pin_dir, *metrics, *self.extra]

    def start(self, timeout: float = 20) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(self.argv(), stdout=self._log, stderr=self._log,
                                     start_new_session=True)
        ok = wait_for(lambda: self._ready(), timeout=timeout, interval=0.1)
        if not ok:
            self.stop(check=False)
            raise RuntimeError(f"daemon not ready in {timeout}s:\n{self.log()}")

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
        try:
            return bool(self.api("GET", "/v1/status").get("ready"))
        except Exception:
            return False

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except FileNotFoundError:
            return ""

    def api(self, method: str, path: str, **params: object) -> dict:
        async def go() -> dict:
            async with Client(self.socket, timeout=30) as c:
                return await c.request(method, path, **params)

        return asyncio.run(go())

    def status(self) -> dict:
        return self.api("GET", "/v1/status")

    def generation(self) -> int:
        return self.status()["policy"]["generation"]

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, MICROSEG_SOCKET=self.socket)
        return subprocess.run([sys.executable, "-m", "microseg", *args], capture_output=True,
                              text=True, timeout=timeout, env=env)

    def write_policy(self, text: str) -> None:
        """Replace the file in place (open, truncate, write), as `>` does."""
        with open(os.path.realpath(self.policy_path), "w") as f:
            f.write(text)

    def wait_generation_above(self, gen: int, timeout: float = 10) -> int:
        assert wait_for(lambda: self.generation() > gen, timeout=timeout), self.log()
        return self.generation()

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, check: bool = True, timeout: float = 20) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
        rc = self.proc.returncode
        self.proc = None
        if check:
            assert rc == 0, f"daemon exit {rc}:\n{self.log()}"
            assert not os.path.exists(self.pin_dir), "pins left behind"
            assert not os.path.exists(self.socket), "socket left behind"
        return rc

    def kill(self) -> None:
        """SIGKILL, leaving pins and filters as a crash would."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self._log.close()
        self.proc = None

    def cleanup_pins(self) -> None:
        if os.path.isdir(self.pin_dir):
            for name in os.listdir(self.pin_dir):
                os.unlink(os.path.join(self.pin_dir, name))
            os.rmdir(self.pin_dir)


def wait_until(cond, timeout: float = 5.0) -> float | None:
    """Seconds until cond() held, or None."""
    t0 = time.monotonic()
    if wait_for(cond, timeout=timeout, interval=0.02):
        return time.monotonic() - t0
    return None
