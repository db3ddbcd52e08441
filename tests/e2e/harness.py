"""What end-to-end tests run: a lab of network namespaces (LabSpec) and a
real `microseg run` process on it (DaemonProcess), made through Daemons,
which stops each one and checks its clean-up.

A daemon is started as a user would start it (the CLI, a policy file, a
socket), driven through its control socket, files and signals, and always
stopped at the end. Every daemon writes a flow log; stopping it validates
every line against docs/events.schema.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from microseg.control.client import Client
from microseg.lab.topology import Lab, WorkloadSpec, wait_for

from ..schema import validate_ndjson


@dataclass(frozen=True)
class LabSpec:
    """A lab as a test module declares it: its workloads, a prefix and
    subnets of its own (modules run side by side on one host), and the echo
    servers each workload runs: {"web": {"tcp": [80], "udp": [53]}}."""

    workloads: Sequence[WorkloadSpec]
    prefix: str
    subnet4: str = "10.203.0.0/24"
    subnet6: str = "fd00:203::/64"
    serve: Mapping[str, Mapping[str, Sequence[int]]] = field(default_factory=dict)

    @contextlib.contextmanager
    def up(self) -> Iterator[Lab]:
        """The lab, its servers listening; afterwards (also after a failure)
        every namespace, link and process of it is gone."""
        lab = Lab(list(self.workloads), prefix=self.prefix, subnet4=self.subnet4,
                  subnet6=self.subnet6)
        with lab:
            for name, ports in self.serve.items():
                lab.serve(name, **ports)
            yield lab
        assert lab.stale_namespaces() == [] and lab.stale_links() == [], \
            (lab.stale_namespaces(), lab.stale_links())


class DaemonProcess:
    """`microseg run` on a lab's interfaces, everything of it in one work
    directory: policy.yaml, the socket, daemon.log and the flow log."""

    def __init__(self, workdir: Path, lab: Lab, policy: str | None, *extra: str) -> None:
        self.workdir = workdir
        self.lab = lab
        self.policy_path = workdir / "policy.yaml"
        self.socket = str(workdir / "microseg.sock")
        self.pin_dir = f"/sys/fs/bpf/mstest-{os.getpid()}-{workdir.name[-8:]}"
        self.log_path = workdir / "daemon.log"
        self.extra = list(extra)
        self.proc: subprocess.Popen | None = None
        self._log = None
        self._unchecked = False  # it ran since its flow log was last validated
        if policy is not None:
            self.policy_path.write_text(policy)

    @property
    def flow_log(self) -> Path:
        """The test's own --flow-log, or one in the work directory."""
        if "--flow-log" in self.extra:
            return Path(self.extra[self.extra.index("--flow-log") + 1])
        return self.workdir / "flow.ndjson"

    def argv(self) -> list[str]:
        # Metrics on a free port (tests run side by side); /v1/status says which.
        metrics = [] if "--metrics" in self.extra else ["--metrics", "127.0.0.1:0"]
        flow_log = [] if "--flow-log" in self.extra else ["--flow-log", str(self.flow_log)]
        return [sys.executable, "-m", "microseg", "run", "-i", self.lab.glob,
                "--policy", str(self.policy_path), "--socket", self.socket,
                "--pin-dir", self.pin_dir, *metrics, *flow_log, *self.extra]

    def start(self, timeout: float = 20) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(self.argv(), stdout=self._log, stderr=self._log,
                                     start_new_session=True)
        self._unchecked = True
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

    # -- the policy file ---------------------------------------------------------

    def write_policy(self, text: str) -> None:
        """Replace the file in place (open, truncate, write), as `>` does."""
        with open(os.path.realpath(self.policy_path), "w") as f:
            f.write(text)

    def apply_policy(self, text: str, timeout: float = 10) -> int:
        """Write the policy in place and wait until it runs: its generation."""
        gen = self.generation()
        self.write_policy(text)
        return self.wait_generation_above(gen, timeout=timeout)

    def wait_generation_above(self, gen: int, timeout: float = 10) -> int:
        assert wait_for(lambda: self.generation() > gen, timeout=timeout), self.log()
        return self.generation()

    # -- the process -------------------------------------------------------------

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, check: bool = True, timeout: float = 20) -> int | None:
        """SIGTERM (SIGKILL after timeout); its exit status. Then every line
        of its flow log must match the event schema, and with check: exit 0,
        no pins and no socket left (pins left are removed). A daemon already
        stopped: nothing, unless it was killed since (then its flow log)."""
        if self.proc is None:
            if self._unchecked:  # killed: what it left is a crash's, by design
                self._unchecked = False
                self.check_flow_log()
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        rc = self.proc.returncode
        self.proc = None
        self._close_log()
        self._unchecked = False
        left = [what for what, path in (("pins", self.pin_dir), ("socket", self.socket))
                if os.path.exists(path)]
        if check:
            self.cleanup_pins()
        self.check_flow_log()
        if check:
            assert rc == 0, f"daemon exit {rc}:\n{self.log()}"
            assert not left, f"{' and '.join(left)} left behind"
        return rc

    def kill(self) -> None:
        """SIGKILL, leaving pins and filters as a crash would."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        self._close_log()
        self.proc = None

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def cleanup_pins(self) -> None:
        if os.path.isdir(self.pin_dir):
            for name in os.listdir(self.pin_dir):
                os.unlink(os.path.join(self.pin_dir, name))
            os.rmdir(self.pin_dir)

    def check_flow_log(self) -> int:
        """Every line of the flow log and its rotations matches the event
        schema (AssertionError naming the file, the line and what is wrong);
        how many events they hold."""
        log = self.flow_log
        files = [log, *sorted(log.parent.glob(f"{log.name}.[0-9]*"))]
        n = 0
        for f in files:
            if f.exists():
                try:
                    n += validate_ndjson(f)
                except AssertionError as e:
                    raise AssertionError(f"the daemon wrote an event off the schema: {e}") \
                        from None
        return n


class Daemons:
    """Makes daemons, each in a work directory of its own; close() stops
    every one still running, checks its clean-up and its flow log, and
    removes any pins left, whatever happened before."""

    def __init__(self, workdir: Callable[[], Path]) -> None:
        self._workdir = workdir
        self._made: list[DaemonProcess] = []

    def new(self, lab: Lab, policy: str | None, *extra: str,
            workdir: Path | None = None) -> DaemonProcess:
        """A daemon not started yet."""
        d = DaemonProcess(workdir or self._workdir(), lab, policy, *extra)
        self._made.append(d)
        return d

    def start(self, lab: Lab, policy: str | None, *extra: str,
              workdir: Path | None = None) -> DaemonProcess:
        d = self.new(lab, policy, *extra, workdir=workdir)
        d.start()
        return d

    def close(self) -> None:
        failures = []
        for d in self._made:
            try:
                d.stop()
            except Exception as e:  # every daemon is stopped, whatever one says
                failures.append(f"{d.workdir}: {type(e).__name__}: {e}")
            finally:
                d.cleanup_pins()
        self._made.clear()
        assert not failures, "\n".join(failures)


def wait_until(cond, timeout: float = 5.0) -> float | None:
    """Seconds until cond() held, or None."""
    t0 = time.monotonic()
    if wait_for(cond, timeout=timeout, interval=0.02):
        return time.monotonic() - t0
    return None
