"""What a node takes from, and gives to, the store, without a store: node
reports of any JSON shape, what it publishes of a workload's addresses,
when its report is written, and that https is always verified."""

from __future__ import annotations

import ssl

import orjson

from microseg.cluster.etcd import EtcdClient
from microseg.cluster.node import ClusterNode, _settled
from microseg.control.cluster import _hosts


async def _nothing(*_: object) -> None:
    return None


def node() -> ClusterNode:
    return ClusterNode(EtcdClient(["https://127.0.0.1:1"], "/t/"), "a", 5, version="t",
                       on_workloads=_nothing)


def test_a_report_of_the_wrong_types_is_read_as_unknowns() -> None:
    n = node()
    bad = orjson.dumps({"heartbeat": 1, "policy_sha256": [1], "policy_generation": "x",
                        "workloads": True, "version": {"a": 1}})
    assert n._parse_node("b", bad) == {"node": "b", "heartbeat": None, "policy_sha256": None,
                                       "policy_generation": None, "workloads": None,
                                       "version": None}
    good = orjson.dumps({"heartbeat": "2026-12-06T00:00:00Z", "policy_sha256": "ab",
                         "policy_generation": 3, "workloads": 2, "version": "0.1"})
    assert n._parse_node("b", good)["policy_generation"] == 3


def test_v4_mapped_loopback_is_refused_as_a_workloads_address() -> None:
    n = node()
    w = n._parse_workload("b", "x", b'{"addresses": ["::ffff:127.0.0.1"]}')
    assert w is None and any("cannot be a workload's" in x for x in n.warnings)


def test_only_host_addresses_are_published() -> None:
    assert _hosts(("10.0.0.5", "10.1.0.0/24", "fd00::5")) == ("10.0.0.5", "fd00::5")


def test_a_report_is_written_when_it_changes_or_a_heartbeat_is_due() -> None:
    """nodes/NODE: written at once for a new policy or another workload
    count; a generation made by another node's inventory change waits for
    the heartbeat (N nodes rewriting N reports at every change: N² events)."""
    n = node()
    n.set_report("aa", 1)
    first = n._report_due()
    assert first is not None and orjson.loads(first)["policy_sha256"] == "aa"
    n._reported = _settled(n.own())  # written
    n.set_report("aa", 2)
    assert n._report_due() is None
    n.set_report("bb", 3)
    assert orjson.loads(n._report_due() or b"{}")["policy_generation"] == 3
    n._reported = None  # the heartbeat
    assert n._report_due() is not None


def test_https_is_verified_without_a_ca_file() -> None:
    c = EtcdClient(["https://127.0.0.1:1"], "/t/")
    assert c._ssl.verify_mode == ssl.CERT_REQUIRED and c._ssl.check_hostname
