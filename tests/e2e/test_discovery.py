"""Discovery end to end: a real `microseg run -i 'veth*'` following the
session's private Docker engine (tests/conftest.py `engine`), with real
containers and real traffic between them (docs/policy.md "Discovery").

Verdicts by labels both ways; a stopped container's address reused by one
with other labels; the engine crashing and coming back while the daemon
enforces; 200 containers started and stopped with the inventory and the
pinned identity maps exactly right at the end; a socket that is no Docker
API.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import orjson
import pytest

from microseg.kernel import bpfsys
from microseg.lab.dockerd import IMAGE, NETWORK, Engine

from .harness import DaemonProcess, Daemons, wait_until

VETHS = SimpleNamespace(glob="veth*")  # the host side of every container's link

RULES = """\
rules:
  - {name: client-to-web, from: [{labels: {role: client}}], to: [{labels: {tier: web}}],
     protocol: tcp, ports: [80], action: allow}
  - {name: client-to-api, from: [{labels: {role: client}}], to: [{workload: api}],
     protocol: tcp, ports: [80], action: allow}
"""


def policy(sock: Path | str) -> str:
    return f"version: 1\ndefault: deny\ndiscover:\n  docker: {{socket: {sock}}}\n" + RULES


def serve(engine: Engine, name: str, ip: str | None = None, **labels: str) -> str:
    """A container answering HTTP on port 80 with its own name."""
    args = ["run", "-d", "--init", "--network", NETWORK, "--name", name]
    for k, v in labels.items():
        args += ["--label", f"{k}={v}"]
    if ip:
        args += ["--ip", ip]
    return engine.docker(*args, IMAGE, "sh", "-c",
                         f"echo {name} > /tmp/index.html && exec httpd -f -p 80 -h /tmp")


def idle(engine: Engine, name: str, **labels: str) -> str:
    args = ["run", "-d", "--init", "--network", NETWORK, "--name", name]
    for k, v in labels.items():
        args += ["--label", f"{k}={v}"]
    return engine.docker(*args, IMAGE, "sleep", "3600")


def address(engine: Engine, name: str) -> str:
    return engine.docker("inspect", "--format",
                         "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", name)


def fetch(engine: Engine, client: str, ip: str, timeout: int = 2) -> str | None:
    """The page `client` gets from http://ip/, or None when it got nothing.
    (busybox nc, with a connect timeout: this busybox's `wget -T` crashes.)"""
    request = 'printf "GET / HTTP/1.0\\r\\n\\r\\n"'
    done = subprocess.run([engine.cli or "docker", "-H", f"unix://{engine.sock}", "exec", client,
                           "sh", "-c", f"{request} | nc -w {timeout} {ip} 80"],
                          capture_output=True, text=True, timeout=timeout + 20)
    if done.returncode != 0 or " 200 OK" not in done.stdout:
        return None
    return done.stdout.strip().splitlines()[-1]


def workloads(d: DaemonProcess, *args: str) -> dict[str, dict]:
    out = d.cli("workloads", "--json", *args)
    assert out.returncode == 0, out.stderr
    return {w["workload"]: w for w in map(orjson.loads, out.stdout.splitlines())}


def as_listed(engine: Engine) -> dict[str, dict]:
    """What `docker ps`/`inspect` say runs, in `microseg workloads`'s terms."""
    return {name: {"labels": dict(w.labels), "addresses": [str(a) for a in w.addresses]}
            for name, w in engine.running().items()}


def same(listed: dict[str, dict], expected: dict[str, dict]) -> bool:
    return {n: {"labels": w["labels"], "addresses": w["addresses"]}
            for n, w in listed.items() if w["source"] == "docker"} == expected


@pytest.fixture
def daemons(engine: Engine, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemons]:
    engine.remove_containers()
    made = Daemons(lambda: tmp_path_factory.mktemp("disc"))
    try:
        yield made
    finally:
        try:
            made.close()
        finally:
            if engine.ping():
                engine.remove_containers()


def start(daemons: Daemons, text: str, *extra: str) -> DaemonProcess:
    return daemons.start(VETHS, text, *extra)  # type: ignore[arg-type]


def test_containers_are_workloads_judged_by_their_labels(engine: Engine,
                                                         daemons: Daemons) -> None:
    serve(engine, "web", tier="web", app="shop")
    idle(engine, "client", role="client")
    idle(engine, "other", role="other")
    d = start(daemons, policy(engine.sock))
    web = address(engine, "web")

    listed = workloads(d)
    assert same(listed, as_listed(engine)), listed
    assert listed["web"]["labels"] == {"tier": "web", "app": "shop"}
    assert any(":" in a for a in listed["web"]["addresses"])  # and its IPv6 address
    assert d.status()["discovery"]["docker"]["up"] is True
    assert d.status()["workloads"] == {"docker": 3}

    assert fetch(engine, "client", web) == "web"       # role=client -> tier=web: allowed
    assert fetch(engine, "other", web) is None         # role=other: nothing allows it
    assert workloads(d, "--source", "docker")["web"]["sessions"] >= 1
    # Sessions (what `top`'s flows and matrix show) are named by container.
    rows = [orjson.loads(x) for x in d.cli("sessions", "--json").stdout.splitlines()]
    assert ("client", "web") in {(r["src"]["workload"], r["dst"]["workload"]) for r in rows}

    # A container that starts while the daemon runs is named by a rule.
    serve(engine, "api")
    api = address(engine, "api")
    assert wait_until(lambda: "api" in workloads(d), timeout=5) is not None
    assert fetch(engine, "client", api) == "api"
    assert fetch(engine, "other", api) is None

    text = d.cli("workloads")
    assert text.returncode == 0 and re.search(r"^api\s+docker\s+" + re.escape(api),
                                              text.stdout, re.M), text.stdout
    metrics = urllib.request.urlopen(f"http://{d.status()['metrics']}/metrics",
                                     timeout=5).read().decode()
    assert 'microseg_workloads{source="docker"} 4.0' in metrics
    assert re.search(r'microseg_discovery_events_total\{action="added",source="docker"\} '
                     r'[1-9]', metrics), metrics
    assert 'microseg_discovery_errors_total{source="docker"} 0.0' in metrics

    d.stop()
    events = [orjson.loads(x) for x in d.flow_log.read_text().splitlines()]
    added = {e["workload"] for e in events if e["type"] == "workload" and e["action"] == "added"}
    assert added == {"web", "client", "other", "api"}
    denied = [e for e in events if e["type"] == "verdict" and e["verdict"] == "denied"
              and e["dst"]["port"] == 80]
    assert {(e["src"]["workload"], e["dst"]["workload"]) for e in denied} == \
        {("other", "web"), ("other", "api")}


def test_a_reused_address_is_judged_by_the_new_containers_labels(engine: Engine,
                                                                 daemons: Daemons) -> None:
    ip = "10.240.0.80"
    serve(engine, "web", ip=ip, tier="web")
    idle(engine, "client", role="client")
    d = start(daemons, policy(engine.sock))
    assert fetch(engine, "client", ip) == "web"

    engine.docker("rm", "-f", "web")
    serve(engine, "impostor", ip=ip, tier="batch")  # the same address, other labels
    assert wait_until(lambda: "impostor" in workloads(d), timeout=5) is not None
    assert "web" not in workloads(d)
    assert fetch(engine, "client", ip) is None  # never web's identity

    # An edit that drops `discover` stops following the engine and forgets
    # its containers; putting it back follows it again.
    d.apply_policy("version: 1\ndefault: deny\n" + RULES.split("  - {name: client-to-api")[0])
    assert workloads(d) == {} and d.status()["discovery"] == {}
    d.apply_policy(policy(engine.sock))
    assert wait_until(lambda: set(workloads(d)) == {"client", "impostor"},
                      timeout=10) is not None

    d.stop()
    events = [orjson.loads(x) for x in d.flow_log.read_text().splitlines()]
    changes = [(e["action"], e["workload"]) for e in events if e["type"] == "workload"
               and e["workload"] in ("web", "impostor")]
    assert changes == [("added", "web"), ("removed", "web"), ("added", "impostor"),
                       ("removed", "impostor"), ("added", "impostor")]


def test_the_engine_crashing_keeps_enforcing_then_resyncs(engine: Engine,
                                                         daemons: Daemons) -> None:
    serve(engine, "web", ip="10.240.0.81", tier="web")
    idle(engine, "client", role="client")
    d = start(daemons, policy(engine.sock))
    assert fetch(engine, "client", "10.240.0.81") == "web"
    before = workloads(d)

    engine.crash()
    try:
        assert wait_until(lambda: not d.status()["discovery"]["docker"]["up"],
                          timeout=10) is not None
        docker = d.status()["discovery"]["docker"]
        assert docker["last_error"]
        # The containers run on in their shims; the last inventory is enforced.
        assert workloads(d) == before
        time.sleep(2)  # a few retries
    finally:
        engine.start()
    assert wait_until(lambda: d.status()["discovery"]["docker"]["up"], timeout=30) is not None
    # Back without live-restore, dockerd stopped what survived the crash.
    assert wait_until(lambda: same(workloads(d), as_listed(engine)), timeout=15) is not None
    log = d.log()
    assert len(re.findall(r"docker engine at \S+ is down", log)) == 1, log
    assert "is back" in log
    metrics = urllib.request.urlopen(f"http://{d.status()['metrics']}/metrics",
                                     timeout=5).read().decode()
    assert re.search(r'microseg_discovery_errors_total\{source="docker"\} [1-9]', metrics)


def pinned_addresses(d: DaemonProcess) -> set[str]:
    """The host addresses the active generation's identity maps hold."""
    active = bpfsys.BpfMap.from_pin(f"{d.pin_dir}/active_map")
    try:
        raw = active.lookup(struct.pack("<I", 0))
        assert raw is not None
        slot = struct.unpack_from("<I", raw)[0] & 1
    finally:
        active.close()
    found: set[str] = set()
    for name, size in (("host4_map", 4), ("host6_map", 16)):
        m = bpfsys.BpfMap.from_pin(f"{d.pin_dir}/{name}")
        try:
            for key, _value in m.lookup_batch():
                if struct.unpack_from("<I", key)[0] == slot:
                    found.add(str(ipaddress.ip_address(key[4:4 + size])))
        finally:
            m.close()
    return found


def test_churn_of_200_containers_ends_with_exact_inventory_and_maps(
        engine: Engine, daemons: Daemons) -> None:
    d = start(daemons, policy(engine.sock))
    rounds, per_round = 4, 50

    def stop_some(names: list[str]) -> None:
        for verb in (("stop", "-t", "1"), ("kill",), ("rm", "-f")):
            batch = names[len(verb) % 3::3]
            for i in range(0, len(batch), 5):
                engine.docker(*verb, *batch[i:i + 5])

    previous: list[str] = []
    began = time.monotonic()
    with ThreadPoolExecutor(max_workers=6) as pool:
        for r in range(rounds):
            names = [f"churn-{r}-{i}" for i in range(per_round)]
            jobs = [pool.submit(idle, engine, name, round=str(r), index=str(i))
                    for i, name in enumerate(names)]
            jobs += [pool.submit(stop_some, previous[k::3]) for k in range(3)]
            for job in jobs:
                job.result()
            previous = names
        pool.submit(stop_some, previous[::2]).result()
    took = time.monotonic() - began

    expected = as_listed(engine)
    assert len(expected) == per_round // 2
    settled = wait_until(lambda: same(workloads(d), expected), timeout=30)
    assert settled is not None, (workloads(d), expected)
    want = {a for w in expected.values() for a in w["addresses"]}
    assert wait_until(lambda: pinned_addresses(d) == want, timeout=5) is not None, \
        (pinned_addresses(d) ^ want)
    st = d.status()
    print(f"\nchurn through the daemon: {rounds * per_round} started in {took:.1f} s; "
          f"inventory and maps exact {settled:.2f} s after the last command; generation "
          f"{st['policy']['generation']}")
    assert st["discovery"]["docker"]["errors"] == 0


def test_a_socket_that_is_no_docker_api(tmp_path: Path, daemons: Daemons) -> None:
    """`policy check` refuses it in one line; the daemon starts, says so in
    one line and in status, and enforces the file's workloads meanwhile."""
    tmp_path.chmod(0o755)
    missing = tmp_path / "missing.sock"
    text = policy(missing) + "workloads:\n  fixed: {addresses: [10.240.0.99]}\n"
    f = tmp_path / "p.yaml"
    f.write_text(text)
    out = subprocess.run([sys.executable, "-m", "microseg", "policy", "check", str(f)],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == \
        f"{f}: discover: docker socket {missing}: does not exist"

    silent = tmp_path / "silent.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(silent))
    listener.listen()
    try:
        f.write_text(policy(silent))
        out = subprocess.run([sys.executable, "-m", "microseg", "policy", "check", str(f)],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 1 and "does not answer" in out.stderr

        d = start(daemons, text)
        docker = d.status()["discovery"]["docker"]
        assert docker["up"] is False and "does not exist" in docker["last_error"]
        assert workloads(d).keys() == {"fixed"}
        errors = [line for line in d.log().splitlines() if " ERROR " in line]
        assert len(errors) == 1 and "does not exist" in errors[0], errors
    finally:
        listener.close()


def test_the_readmes_docker_walkthrough(engine: Engine) -> None:
    """examples/docker/walkthrough.sh, as the README tells a user to run it,
    against the private engine."""
    engine.remove_containers()
    script = Path(__file__).parents[2] / "examples" / "docker" / "walkthrough.sh"
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/bin",
           "DOCKER_HOST": f"unix://{engine.sock}", "IMAGE": IMAGE,
           "MICROSEG": f"{sys.executable} -m microseg"}
    out = subprocess.run(["sh", str(script)], capture_output=True, text=True, env=env,
                         timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert re.search(r"^shop-web\s+docker\s+10\.250\.0\.\d+", text, re.M), text
    assert "hello from shop-web" in text and "(nothing: denied)" in text
    # `watch` names both ends of the denial by container.
    assert re.search(r"DENIED +tcp \S+ \(stranger\) -> \S+ \(shop-web\)", text), text
    assert text.rstrip().endswith("walkthrough: done")
    # It cleaned up after itself.
    assert "msdemo" not in engine.docker("network", "ls", "--format", "{{.Name}}")
    assert engine.docker("ps", "-aq") == ""
