"""A private Docker engine for tests and benchmarks: its own dockerd (and the
containerd it starts) on directories and a socket of its own, never the
host's /var/run/docker.sock, with an image built locally from busybox-static
and user networks with subnets of the tests' own."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import orjson

from microseg.inventory.model import DiscoveredWorkload

IMAGE = "msbusybox:1"
# name, IPv4 subnet, IPv6 subnet: a container starts on the first; the
# second is there to be connected to.
NETWORKS = (("msnet0", "10.240.0.0/24", "fd00:240::/64"),
            ("msnet1", "10.241.0.0/24", "fd00:241::/64"))
NETWORK = NETWORKS[0][0]
BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "sleep", "nc", "httpd", "wget", "ip", "true")


class EngineUnavailable(Exception):
    """This machine cannot run the private engine or its containers."""


def docker_cli() -> str | None:
    # Debian's client matches the 20.10 engine; a newer one negotiates too.
    for candidate in ("/usr/bin/docker", shutil.which("docker")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


class Engine:
    def __init__(self) -> None:
        # Unix socket paths are limited to 107 bytes: keep it short.
        self.root = Path(tempfile.mkdtemp(prefix=f"msdk-{os.getpid()}-", dir="/tmp"))
        self.data, self.exec_root = self.root / "d", self.root / "e"
        self.sock = self.root / "d.sock"
        self.pidfile = self.root / "d.pid"
        self.logfile = self.root / "dockerd.log"
        self.cli = docker_cli()
        self.proc: subprocess.Popen[bytes] | None = None
        self.bridges: set[str] = set()  # br-<id> of every network we made
        self.crashed = False

    # --- the daemon ---

    def start(self, timeout: float = 30.0) -> float:
        """Start dockerd on our directories; seconds until /_ping answered."""
        started = time.monotonic()
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(
                ["dockerd", "--data-root", str(self.data), "--exec-root", str(self.exec_root),
                 "-H", f"unix://{self.sock}", "--pidfile", str(self.pidfile),
                 "--iptables=false", "--ip6tables=false", "--bridge=none"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True)
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise EngineUnavailable(f"dockerd exited with {self.proc.returncode}: "
                                        f"{self.log_tail()}")
            if self.ping():
                return time.monotonic() - started
            time.sleep(0.05)
        raise EngineUnavailable(f"dockerd did not answer /_ping in {timeout:.0f} s: "
                                f"{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL (and the containerd it started) if it hangs."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            containerd = self.exec_root / "containerd" / "containerd.pid"
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(containerd.read_text().strip()), signal.SIGKILL)

    def crash(self) -> None:
        """SIGKILL dockerd and its containerd, as a crash would: the
        containers live on in their shims, and nothing tells anyone."""
        proc, self.proc = self.proc, None
        assert proc is not None
        pidfile = self.exec_root / "containerd" / "containerd.pid"
        containerd = int(pidfile.read_text().strip())
        proc.kill()
        os.kill(containerd, signal.SIGKILL)
        proc.wait(10)
        # PID 1 here reaps orphans lazily: dockerd would take containerd's
        # zombie for a live containerd and wait for its socket in vain.
        pidfile.unlink()
        self.crashed = True

    def ping(self) -> bool:
        conn = http.client.HTTPConnection("docker", timeout=1)
        conn.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.sock.settimeout(1)
            conn.sock.connect(str(self.sock))
            conn.request("GET", "/_ping")
            return conn.getresponse().read() == b"OK"
        except OSError:
            return False
        finally:
            conn.close()

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.logfile.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:])

    # --- the CLI ---

    def docker(self, *args: str, stdin: bytes | None = None, check: bool = True,
               timeout: float = 60) -> str:
        assert self.cli is not None
        done = subprocess.run([self.cli, "-H", f"unix://{self.sock}", *args], input=stdin,
                              capture_output=True, timeout=timeout)
        if check and done.returncode:
            raise RuntimeError(f"docker {' '.join(args)}: "
                               f"{done.stderr.decode(errors='replace').strip()}")
        return done.stdout.decode().strip()

    async def adocker(self, *args: str) -> str:
        """docker(...) without blocking the loop the source runs on."""
        return await asyncio.to_thread(self.docker, *args)

    @staticmethod
    def run_args(name: str, *, labels: Mapping[str, str] | None = None, ip: str | None = None,
                 ip6: str | None = None, network: str = NETWORK,
                 restart: str | None = None) -> list[str]:
        # --init: tini as PID 1 passes SIGTERM on, so `docker stop` is quick.
        args = ["run", "-d", "--init", "--network", network, "--name", name]
        for key, value in (labels or {}).items():
            args += ["--label", f"{key}={value}"]
        if ip:
            args += ["--ip", ip]
        if ip6:
            args += ["--ip6", ip6]
        if restart:
            args += ["--restart", restart]
        return [*args, IMAGE, "sleep", "3600"]

    def run(self, name: str, **options: object) -> str:
        return self.docker(*self.run_args(name, **options))  # type: ignore[arg-type]

    def create_network(self, name: str, subnet4: str, subnet6: str) -> str:
        ident = self.docker("network", "create", "--subnet", subnet4, "--ipv6",
                            "--subnet", subnet6, name)
        self.bridges.add(f"br-{ident[:12]}")
        return ident

    def remove_containers(self) -> None:
        ids = self.docker("ps", "-aq").split()
        if ids:
            self.docker("rm", "-f", *ids, timeout=120)

    def running(self) -> dict[str, DiscoveredWorkload]:
        """What `docker ps` says runs, read through the CLI's templates (not
        through the code under test): name, labels, addresses."""
        ids = self.docker("ps", "-q", "--no-trunc").split()
        if not ids:
            return {}
        template = ('{{.Id}}\t{{.Name}}\t{{json .Config.Labels}}\t'
                    '{{range .NetworkSettings.Networks}}{{.IPAddress}} '
                    '{{.GlobalIPv6Address}} {{end}}')
        found = {}
        for line in self.docker("inspect", "--format", template, *ids).splitlines():
            ident, name, labels, addresses = line.split("\t")
            found[name.lstrip("/")] = DiscoveredWorkload.make(
                name.lstrip("/"), orjson.loads(labels) or {}, addresses.split(), "docker", ident)
        return found

    # --- set-up and teardown ---

    def build_image(self) -> None:
        """busybox-static and its applets as an image: no registry needed."""
        with tempfile.TemporaryDirectory(prefix="msimg-") as tmp:
            bin_dir = Path(tmp, "bin")
            bin_dir.mkdir()
            shutil.copy2(BUSYBOX, bin_dir / "busybox")
            for applet in APPLETS:
                (bin_dir / applet).symlink_to("busybox")
            Path(tmp, "tmp").mkdir()
            tar = subprocess.run(["tar", "-C", tmp, "-c", "."], capture_output=True, check=True)
        self.docker("import", "-", IMAGE, stdin=tar.stdout)

    def teardown(self) -> list[str]:
        """Remove everything; return what had to be cleaned up by force."""
        problems: list[str] = []
        if self.proc is not None and self.proc.poll() is None:
            for step in (self.remove_containers, self._remove_networks):
                try:
                    step()
                except (RuntimeError, EngineUnavailable, subprocess.TimeoutExpired) as e:
                    problems.append(str(e))
        self.stop()
        for mount in self._mounts():
            if subprocess.run(["umount", mount], capture_output=True).returncode:
                subprocess.run(["umount", "-l", mount], capture_output=True)
            # After a crash the data root's bind mount is stacked: the next
            # dockerd finds it mounted and so does not unmount it.
            if not (self.crashed and mount == str(self.data)):
                problems.append(f"{mount} was still mounted")
        links = self._links()
        for link in sorted(links & (self.bridges | {"docker0"})):
            subprocess.run(["ip", "link", "del", link], capture_output=True)
            problems.append(f"link {link} was left behind")
        shutil.rmtree(self.root, ignore_errors=True)
        return problems

    def _remove_networks(self) -> None:
        custom = self.docker("network", "ls", "-q", "--filter", "type=custom").split()
        if not custom:
            return
        try:
            self.docker("network", "rm", *custom)
            return
        except RuntimeError as e:
            # dockerd 20.10 may keep an endpoint of a container removed amid
            # a burst ("has active endpoints"): force it out, else restart
            # the engine, which drops stale endpoints as it starts.
            print(f"\nprivate dockerd: {e}; forcing the endpoints out")
        for network in custom:
            names = self.docker("network", "inspect", network, "--format",
                                "{{range .Containers}}{{.Name}} {{end}}", check=False)
            for name in names.split():
                self.docker("network", "disconnect", "-f", network, name, check=False)
        left = self.docker("network", "ls", "-q", "--filter", "type=custom").split()
        if not left:
            return
        try:
            self.docker("network", "rm", *left)
        except RuntimeError:
            self.stop()
            self.start()
            self.docker("network", "rm", *left)

    def _mounts(self) -> list[str]:
        """Mount points under our directories, deepest first."""
        prefix = f"{self.root}/"
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
        return sorted({p for p in points if p.startswith(prefix)},
                      key=lambda p: p.count("/"), reverse=True)

    @staticmethod
    def _links() -> set[str]:
        out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        return {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}


def missing_tools() -> Iterable[str]:
    if shutil.which("dockerd") is None:
        yield "dockerd (apt-get install docker.io)"
    if docker_cli() is None:
        yield "the docker CLI (apt-get install docker.io)"
    if not BUSYBOX.exists():
        yield f"{BUSYBOX} (apt-get install busybox-static)"
