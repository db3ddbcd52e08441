"""`microseg run --run-time-stats`: what it accepts (docs/metrics.md)."""

from __future__ import annotations

import pytest

from microseg.control.runstats import DEFAULT, parse_mode


def test_modes() -> None:
    assert parse_mode(DEFAULT) == ("sampled", 1.0, 15.0)
    assert parse_mode("0.5/10") == ("sampled", 0.5, 10.0)
    assert parse_mode("on")[0] == "on" and parse_mode("off")[0] == "off"


@pytest.mark.parametrize("bad", ["", "1", "1/", "/2", "2/1", "1/1", "0/5", "-1/5", "a/b",
                                 "nan/5", "1/inf", "1/inf/2", "sampled"])
def test_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="run-time-stats"):
        parse_mode(bad)
