"""Other nodes' workloads in the policy a node compiles (microseg/policy/
inventory.py merge): selected by labels and name like local ones; a name
taken here or on a third node kept apart as NAME@NODE, still selected by
`{workload: NAME}`; verdicts from the same evaluator the datapath's tests
compare against."""

from __future__ import annotations

from microseg.inventory.model import DiscoveredWorkload
from microseg.policy.evaluate import Evaluator
from microseg.policy.inventory import REMOTE, merge
from microseg.policy.parse import parse_policy

# Names of other nodes' workloads are names no static workload has: with
# discovery they are warnings, as containers' names are (docs/many-hosts.md).
POLICY = b"""\
version: 1
default: deny
discover:
  docker: {}
workloads:
  db: {addresses: [10.1.0.5], labels: {tier: db}}
rules:
  - name: api-to-db
    from: [{labels: {app: api}}]
    to: [{labels: {tier: db}}]
    protocol: tcp
    ports: [5432]
    action: allow
  - name: cache-by-name
    from: [{workload: cache}]
    to: [{workload: db}]
    protocol: tcp
    ports: [6379]
    action: allow
"""


def remote(name: str, node: str, addr: str, **labels: str) -> DiscoveredWorkload:
    return DiscoveredWorkload.make(name, labels, [addr], REMOTE, f"{node}/{name}", node=node)


def inventory(*ws: DiscoveredWorkload) -> dict:
    return {REMOTE: {f"workloads/{w.node}/{w.name}": w for w in ws}}


def test_a_remote_workload_is_selected_by_its_labels_and_known_with_its_node() -> None:
    policy = parse_policy(POLICY, "p.yaml").policy
    m = merge(policy, inventory(remote("api", "b", "10.2.0.7", app="api"),
                                remote("rogue", "b", "10.2.0.8", app="rogue")))
    assert m.known["api"].node == "b" and m.known["api"].source == REMOTE
    assert m.known["api"].as_dict()["node"] == "b"
    assert "node" not in m.known["db"].as_dict()  # this node's
    ev = Evaluator(m.policy)
    assert ev.verdict("10.2.0.7", "10.1.0.5", 6, 5432) == ("allowed", "api-to-db")
    assert ev.verdict("10.2.0.8", "10.1.0.5", 6, 5432) == ("denied", None)
    assert ev.owner("10.2.0.7") == "api"


def test_one_name_on_two_nodes_is_kept_apart_and_selected_by_name() -> None:
    policy = parse_policy(POLICY, "p.yaml").policy
    m = merge(policy, inventory(remote("cache", "b", "10.2.0.9"),
                                remote("cache", "c", "10.3.0.9"),
                                remote("db", "c", "10.3.0.5", tier="db")))
    # Both caches, by node; the remote db beside this node's static one.
    assert {k: v.node for k, v in m.known.items()} == {
        "db": None, "cache@b": "b", "cache@c": "c", "db@c": "c"}
    assert len(m.warnings) == 3 and all("both kept" in w for w in m.warnings)
    ev = Evaluator(m.policy)
    for src in ("10.2.0.9", "10.3.0.9"):
        assert ev.verdict(src, "10.1.0.5", 6, 6379) == ("allowed", "cache-by-name")
        # ... and to the other node's db, a workload named db too.
        assert ev.verdict(src, "10.3.0.5", 6, 6379) == ("allowed", "cache-by-name")
    assert ev.owner("10.3.0.9") == "cache@c"
    # Nothing else is a cache.
    assert ev.verdict("10.3.0.5", "10.1.0.5", 6, 6379) == ("denied", None)


def test_a_remote_workload_whose_name_frees_up_takes_its_plain_name() -> None:
    policy = parse_policy(POLICY, "p.yaml").policy
    two = merge(policy, inventory(remote("cache", "b", "10.2.0.9"),
                                  remote("cache", "c", "10.3.0.9")))
    one = merge(policy, inventory(remote("cache", "b", "10.2.0.9")))
    assert set(two.known) == {"db", "cache@b", "cache@c"}
    assert set(one.known) == {"db", "cache"} and not one.warnings


def test_a_client_merges_the_daemons_rows_into_the_same_names_and_verdicts() -> None:
    """trace, diff and suggest evaluate the daemon's policy from its `known`
    rows (microseg/control/client.py): other nodes' workloads, renamed or
    not, come out as the daemon has them."""
    from microseg.control.client import discovered_from_rows

    policy = parse_policy(POLICY, "p.yaml").policy
    daemon = merge(policy, inventory(remote("cache", "b", "10.2.0.9"),
                                     remote("cache", "c", "10.3.0.9"),
                                     remote("api", "b", "10.2.0.7", app="api")))
    rows = [k.as_dict() for k in daemon.known.values()]
    client = merge(policy, discovered_from_rows(rows))
    assert client.known == daemon.known
    a, b = Evaluator(daemon.policy), Evaluator(client.policy)
    for src in ("10.2.0.9", "10.3.0.9", "10.2.0.7"):
        assert a.verdict(src, "10.1.0.5", 6, 6379) == b.verdict(src, "10.1.0.5", 6, 6379)
        assert a.verdict(src, "10.1.0.5", 6, 5432) == b.verdict(src, "10.1.0.5", 6, 5432)


def test_another_node_cannot_claim_an_address_that_is_a_workloads_here() -> None:
    """A node publishing db's address with labels the rules allow gets
    nothing of db's: the address stays db's (and a second claimant's is
    dropped too), with a warning each."""
    policy = parse_policy(POLICY, "p.yaml").policy
    m = merge(policy, inventory(remote("fake", "evil", "10.1.0.5", app="api"),
                                remote("api", "b", "10.2.0.7", app="api"),
                                remote("copy", "evil", "10.2.0.7", app="api")))
    assert m.known["fake"].addresses == () and m.known["copy"].addresses == ()
    assert m.known["api"].addresses == ("10.2.0.7",)
    assert sum("claims" in w for w in m.warnings) == 2
    ev = Evaluator(m.policy)
    assert ev.owner("10.1.0.5") == "db" and ev.owner("10.2.0.7") == "api"


def test_remote_forms_are_reused_and_only_the_live_ones_kept() -> None:
    """The daemon's merges reuse each unchanged remote workload's compiled
    form; a workload that went away is not kept (churn does not grow it)."""
    from microseg.policy.inventory import RemoteForms

    policy = parse_policy(POLICY, "p.yaml").policy
    forms = RemoteForms()
    one = merge(policy, inventory(remote("api", "b", "10.2.0.7", app="api"),
                                  remote("old", "b", "10.2.0.8")), forms)
    two = merge(policy, inventory(remote("api", "b", "10.2.0.7", app="api"),
                                  remote("new", "b", "10.2.0.9")), forms)
    assert two.known["api"] is one.known["api"]
    assert next(w for w in two.policy.workloads if w.name == "api") is \
        next(w for w in one.policy.workloads if w.name == "api")
    kept = {key[1] for key in forms._last if key[0] == "f"}
    assert kept == {"api", "new"}
