"""The README's benchmark section is generated from bench/results.json: the
two never disagree."""

from __future__ import annotations

import json

from bench import readme


def test_readme_benchmarks_are_the_results_file() -> None:
    text = readme.README.read_text(encoding="utf-8")
    start, end = text.index(readme.START), text.index(readme.END) + len(readme.END)
    results = json.loads(readme.RESULTS.read_text(encoding="utf-8"))
    assert text[start:end] == readme.render(results), \
        "README.md's benchmark section is stale: run `python -m bench.readme`"


def test_every_target_is_judged() -> None:
    results = json.loads(readme.RESULTS.read_text(encoding="utf-8"))
    section = readme.render(results)
    # six packet rows, the first flow of a pair (two), and established
    # packets with a candidate staged
    assert section.count("≤ floor + ") == 9
    assert section.count("≤ unstaged + 100") == 2
    assert "**Policy lifecycle**" in section and section.count("| ≤ 10 s |") == 2
    assert "≤ 2 s:" in section and section.count("| met") + section.count("**not met**") >= 10
