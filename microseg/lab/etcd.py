"""A real etcd for tests, benchmarks and the demo: one member, on its own
data directory, optionally inside a network namespace and optionally
demanding TLS client certificates.

    with Etcd("10.244.0.250", netns="msh-etcd", tls=True) as etcd:
        etcd.start()          # returns once it answers a range request
        ... etcd.endpoint, etcd.cacert, etcd.cert, etcd.key ...
        etcd.restart()        # same data directory: the keys survive
        etcd.kill(); etcd.start()

Everything it makes — data, certificates, its log — is in one temporary
directory that ``close()`` (or leaving the ``with``) removes after killing the
member, also when the test failed. With ``tls=True`` it makes a CA, a server
certificate for its address and 127.0.0.1, a client certificate (CN=microseg)
and, for tests of refusal, a client certificate from a second CA that the
member does not trust (``foreign_cert``/``foreign_key``).

Nothing here talks to etcd over gRPC: the readiness check, and
``python -m microseg.lab.etcd put|get`` for a look by hand, use the JSON
gateway (``POST /v3/kv/...``, keys and values base64) with the standard
library, run inside the member's namespace.

    python -m microseg.lab.etcd run --ip 127.0.0.1 --tls   # until Ctrl-C
"""

from __future__ import annotations

import atexit
import base64
import collections
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

CLIENT_PORT = 2379
PEER_PORT = 2380


class EtcdError(RuntimeError):
    """The member did not start, or its certificates could not be made."""


class Etcd:
    def __init__(self, ip: str = "127.0.0.1", netns: str | None = None, tls: bool = False,
                 name: str = "microseg", client_port: int = CLIENT_PORT,
                 peer_port: int = PEER_PORT) -> None:
        """ip: the client address (in netns, which the caller made; None: this
        namespace). The peer URL is on 127.0.0.1: one member has no peers."""
        self.ip = ip
        self.netns = netns
        self.tls = tls
        self.name = name
        self.client_port = client_port
        self.peer_port = peer_port
        self.dir = Path(tempfile.mkdtemp(prefix="msetcd-"))
        self.data_dir = self.dir / "data"
        self.log_path = self.dir / "etcd.log"
        # With tls: the CA, the member's certificate, a client's, and a
        # client's from a CA the member does not trust.
        self.cacert: Path | None = None
        self.server_cert: Path | None = None
        self.server_key: Path | None = None
        self.cert: Path | None = None
        self.key: Path | None = None
        self.foreign_cert: Path | None = None
        self.foreign_key: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._closed = False
        atexit.register(self.close)  # a test that forgot close() leaves no member
        try:
            if tls:
                self._make_certificates()
        except BaseException:
            self.close()
            raise

    # -- addresses and credentials -------------------------------------------

    @property
    def endpoint(self) -> str:
        host = f"[{self.ip}]" if ipaddress.ip_address(self.ip).version == 6 else self.ip
        return f"{'https' if self.tls else 'http'}://{host}:{self.client_port}"

    @property
    def client_tls(self) -> list[str]:
        """--cacert/--cert/--key for this member (curl's and `wait`'s options)."""
        if not self.tls:
            return []
        return ["--cacert", str(self.cacert), "--cert", str(self.cert), "--key", str(self.key)]

    def _make_certificates(self) -> None:
        ca = _certificate(self.dir / "ca", "microseg-test-ca")
        sans = {self.ip, "127.0.0.1"}
        # The gateway inside etcd dials etcd itself with the server
        # certificate as its client certificate: it needs clientAuth too.
        server = _certificate(self.dir / "server", "etcd", ca,
                              "subjectAltName=" + ",".join(f"IP:{a}" for a in sorted(sans)),
                              "extendedKeyUsage=serverAuth,clientAuth")
        self.server_cert, self.server_key = server
        self.cacert = ca[0]
        self.cert, self.key = _certificate(self.dir / "client", "microseg", ca,
                                           "extendedKeyUsage=clientAuth")
        foreign_ca = _certificate(self.dir / "foreign-ca", "not-microseg-ca")
        self.foreign_cert, self.foreign_key = _certificate(
            self.dir / "foreign", "microseg", foreign_ca, "extendedKeyUsage=clientAuth")

    # -- the process -----------------------------------------------------------

    @property
    def up(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _in_netns(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *argv] if self.netns else list(argv)

    def _argv(self) -> list[str]:
        peer = f"http://127.0.0.1:{self.peer_port}"
        argv = ["etcd", "--name", self.name, "--data-dir", str(self.data_dir),
                "--listen-client-urls", self.endpoint, "--advertise-client-urls", self.endpoint,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"{self.name}={peer}", "--initial-cluster-state", "new",
                # One member: elect at once, not after the default 1 s x 10.
                "--heartbeat-interval", "100", "--election-timeout", "1000",
                "--logger", "zap", "--log-outputs", "stderr"]
        if self.tls:
            argv += ["--cert-file", str(self.server_cert), "--key-file", str(self.server_key),
                     "--trusted-ca-file", str(self.cacert), "--client-cert-auth"]
        return self._in_netns(argv)

    def start(self, timeout: float = 15.0) -> float:
        """Run the member and wait until it answers; seconds it took. On
        failure nothing keeps running and the error has the log's end."""
        if self._closed or self.up:
            raise EtcdError("closed" if self._closed else "already running")
        started = time.monotonic()
        if self.netns:  # a fresh namespace's lo is down: no 127.0.0.1 for the peer URL
            subprocess.run(["ip", "-n", self.netns, "link", "set", "lo", "up"],
                           capture_output=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self._argv(), stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.kill()
            raise
        return time.monotonic() - started

    def _wait_ready(self, timeout: float) -> None:
        # The member may be in another namespace: one waiter inside it polls.
        waiter = subprocess.Popen(
            self._in_netns([sys.executable, "-m", "microseg.lab.etcd", "wait", self.endpoint,
                            "--timeout", str(timeout), *self.client_tls]),
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout + 5  # the waiter's own, and its start
        try:
            while waiter.poll() is None:
                if not self.up:
                    raise EtcdError(f"etcd exited with {self.proc.returncode}: "
                                    f"{self.log_tail()}")
                if time.monotonic() > deadline:
                    raise EtcdError(f"no answer from the waiter in {timeout:g} s: "
                                    f"{self.log_tail()}")
                time.sleep(0.02)
        finally:
            with contextlib.suppress(ProcessLookupError):
                waiter.kill()
            _, err = waiter.communicate()
        if waiter.returncode != 0:
            raise EtcdError(f"etcd did not answer in {timeout:g} s ({err.strip()}): "
                            f"{self.log_tail()}")

    def _signal(self, sig: signal.Signals, timeout: float) -> bool:
        """Send sig to the member; True once it is gone and reaped."""
        if self.proc is None or self.proc.poll() is not None:
            return True  # reaped: its pid may be another process's by now
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait (SIGKILL if it does not go in time)."""
        if not self._signal(signal.SIGTERM, timeout):
            self.kill()

    def kill(self) -> None:
        """SIGKILL, as a crash would; the data directory stays."""
        self._signal(signal.SIGKILL, 10)

    def restart(self, timeout: float = 15.0) -> float:
        """stop() and start() on the same data directory."""
        self.stop()
        return self.start(timeout)

    def log_tail(self, lines: int = 10) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(collections.deque(f, maxlen=lines)).strip() or "(empty log)"
        except OSError:
            return "(no log)"

    def close(self) -> None:
        """Kill the member and remove its directory; a second call does nothing."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Etcd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _certificate(base: Path, cn: str, ca: tuple[Path, Path] | None = None,
                 *extensions: str) -> tuple[Path, Path]:
    """base.crt and base.key: a P-256 key and a certificate for it, signed by
    ca (certificate, key) or, without one, self-signed as a CA."""
    crt, key = base.with_suffix(".crt"), base.with_suffix(".key")
    argv = ["openssl", "req", "-new", "-nodes", "-newkey", "ec",
            "-pkeyopt", "ec_paramgen_curve:P-256", "-keyout", str(key), "-out", str(crt),
            "-days", "7", "-subj", f"/CN={cn}"]
    if ca is None:
        argv += ["-x509", "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign"]
    else:
        argv += ["-CA", str(ca[0]), "-CAkey", str(ca[1]),
                 "-addext", "basicConstraints=critical,CA:FALSE",
                 "-addext", "keyUsage=critical,digitalSignature"]
    for ext in extensions:
        argv += ["-addext", ext]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except FileNotFoundError as e:
        raise EtcdError("TLS needs openssl") from e
    if r.returncode:
        raise EtcdError(f"openssl could not make {crt.name}: {r.stderr.strip()[-400:]}")
    return crt, key


# -- the JSON gateway, from inside the member's namespace ------------------------

def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def request(endpoint: str, path: str, body: dict, cacert: str | None = None,
            cert: str | None = None, key: str | None = None,
            timeout: float = 2.0) -> dict:
    """POST body to etcd's JSON gateway (path: /v3/kv/range, ...); its answer."""
    context = None
    if endpoint.startswith("https:"):
        context = ssl.create_default_context(cafile=cacert)
        if cert:
            context.load_cert_chain(cert, key)
    # No proxy from the environment: the member is on a lab address.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                         urllib.request.HTTPSHandler(context=context))
    req = urllib.request.Request(endpoint + path, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with opener.open(req, timeout=timeout) as answer:
        return json.loads(answer.read())


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m microseg.lab.etcd",
                                 description="Run a throw-away etcd member, or talk to one "
                                 "through its JSON gateway.")
    sub = ap.add_subparsers(dest="action", required=True)
    run = sub.add_parser("run", help="run a member until Ctrl-C")
    run.add_argument("--ip", default="127.0.0.1")
    run.add_argument("--netns")
    run.add_argument("--tls", action="store_true")
    for action in ("wait", "put", "get"):
        p = sub.add_parser(action, help={"wait": "wait until the member answers",
                                         "put": "put KEY VALUE", "get": "get KEY"}[action])
        p.add_argument("endpoint")
        p.add_argument("args", nargs="*")
        p.add_argument("--timeout", type=float, default=10.0)
        for opt in ("--cacert", "--cert", "--key"):
            p.add_argument(opt)
    args = ap.parse_args(argv)
    if args.action == "run":
        return _run(args.ip, args.netns, args.tls)
    tls = {"cacert": args.cacert, "cert": args.cert, "key": args.key}
    if args.action == "wait":
        return _wait(args.endpoint, args.timeout, tls)
    if args.action == "put":
        key, value = args.args
        request(args.endpoint, "/v3/kv/put", {"key": b64(key), "value": b64(value)}, **tls)
        return 0
    kvs = request(args.endpoint, "/v3/kv/range", {"key": b64(args.args[0])}, **tls)
    for kv in kvs.get("kvs", []):
        print(base64.b64decode(kv.get("value", "")).decode(errors="replace"))
    return 0


def _wait(endpoint: str, timeout: float, tls: dict) -> int:
    deadline = time.monotonic() + timeout
    while True:
        try:
            request(endpoint, "/v3/kv/range", {"key": b64("microseg")}, timeout=1.0, **tls)
            return 0
        except (OSError, ValueError) as e:  # refused, TLS, HTTP errors, a bad answer
            if time.monotonic() > deadline:
                print(f"last error: {e}", file=sys.stderr)
                return 1
            time.sleep(0.05)


def _run(ip: str, netns: str | None, tls: bool) -> int:
    with Etcd(ip, netns=netns, tls=tls) as etcd:
        print(f"etcd up in {etcd.start():.2f} s at {etcd.endpoint}, log {etcd.log_path}")
        if tls:
            print(f"  TLS: {' '.join(etcd.client_tls)}")
        with contextlib.suppress(KeyboardInterrupt):
            etcd.proc.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
