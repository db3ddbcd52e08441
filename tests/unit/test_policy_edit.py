"""`rule add` / `rule delete` change exactly the rule's lines: comments,
order and quoting elsewhere stay as they were."""

from __future__ import annotations

import difflib

import pytest

from microseg.policy.edit import EditError, add_rule, delete_rule, parse_selector, validated

from .test_policy_parse import GOOD


def changed_lines(before: str, after: str) -> tuple[list[str], list[str]]:
    removed, added = [], []
    for line in difflib.ndiff(before.splitlines(), after.splitlines()):
        if line.startswith("- "):
            removed.append(line[2:])
        elif line.startswith("+ "):
            added.append(line[2:])
    return removed, added


def test_add_appends_after_the_last_rule_and_touches_nothing_else() -> None:
    out = add_rule(GOOD, "p.yaml", name="web-dns", sources=["workload:web"],
                   destinations=["cidr:fd00:53::/64;labels:tier=db,app=shop"],
                   action="allow", protocol="udp", ports="53,5300-5310")
    removed, added = changed_lines(GOOD, out)
    assert removed == []
    assert added == [
        "  - name: web-dns",
        "    from: {workload: web}",
        '    to: [{cidr: "fd00:53::/64"}, {labels: {tier: db, app: shop}}]',
        "    protocol: udp",
        '    ports: [53, "5300-5310"]',
        "    action: allow",
    ]
    rule = validated(out, "p.yaml").policy.rules[-1]
    assert rule.name == "web-dns" and rule.ports == ((53, 53), (5300, 5310))
    assert out.startswith(GOOD)


def test_delete_takes_the_rule_and_its_own_comment() -> None:
    text = GOOD.replace("  - name: no-ssh-to-db", "  # SSH never reaches the db.\n"
                                                  "  - name: no-ssh-to-db")
    out = delete_rule(text, "p.yaml", "clients-to-web")
    removed, added = changed_lines(text, out)
    assert added == []
    assert removed[0] == "  - name: clients-to-web" and len(removed) == 6
    assert "# SSH never reaches the db." in out  # the next rule's comment stays
    out2 = delete_rule(out, "p.yaml", "no-ssh-to-db")
    assert "# SSH never reaches the db." not in out2
    assert "mode: enforce            # enforce | audit" in out2
    assert [r.name for r in validated(out2, "p.yaml").policy.rules] == ["web-to-db"]


def test_first_rule_to_a_file_without_rules() -> None:
    out = add_rule("version: 1  # minimal\n", "p.yaml", name="all", sources=["any"],
                   destinations=["any"], action="allow")
    assert "# minimal" in out
    assert [r.name for r in validated(out, "p.yaml").policy.rules] == ["all"]


def test_flow_style_rules_are_edited_too() -> None:
    text = "version: 1\nrules: [{name: a, from: any, to: any, action: allow}]\n"
    out = add_rule(text, "p.yaml", name="b", sources=["any"], destinations=["any"],
                   action="deny")
    assert [r.name for r in validated(out, "p.yaml").policy.rules] == ["a", "b"]
    out = delete_rule(out, "p.yaml", "a")
    assert [r.name for r in validated(out, "p.yaml").policy.rules] == ["b"]


def test_errors() -> None:
    with pytest.raises(EditError, match="already exists"):
        add_rule(GOOD, "p.yaml", name="web-to-db", sources=["any"], destinations=["any"],
                 action="allow")
    with pytest.raises(EditError, match="no rule named 'nope'"):
        delete_rule(GOOD, "p.yaml", "nope")
    with pytest.raises(EditError, match="expected any, workload:NAME"):
        parse_selector("web")
    with pytest.raises(EditError, match="unknown kind 'host'"):
        parse_selector("host:web")
    with pytest.raises(EditError, match="does not parse"):
        add_rule("rules: [\n", "p.yaml", name="x", sources=["any"], destinations=["any"],
                 action="allow")
