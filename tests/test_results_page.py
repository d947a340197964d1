"""The results page's statistics (scripts/page_stats.py) on numbers worked out by hand, and its
discussion checks: stale-run banners and cited numbers that the tables do not hold."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from scripts import page_discussion
from scripts.page_stats import model_difference, over_seeds, view_change

ROOT = Path(__file__).resolve().parents[1]


def run(k0: list[float], k1: list[float]) -> dict:
    return {0: {"m": k0}, 1: {"m": k1}}


def test_view_change_pairs_items_and_seeds():
    # seed 0: item differences (k0 - k1) 1, 3 -> D0 = 2; seed 1: 3, 5 -> D1 = 4
    runs = [run([10.0, 13.0], [9.0, 10.0]), run([20.0, 25.0], [17.0, 20.0])]
    d = view_change(runs, "m", 0, 1)
    assert d.per_seed == (2.0, 4.0) and d.mean == 3.0 and d.seeds == 2 and d.consistent
    # seed-averaged item differences 2, 4: sd sqrt(2), se 1; per-seed means 2, 4: se 1
    assert d.se_items == pytest.approx(1.0) and d.se_seeds == pytest.approx(1.0)
    assert d.se == pytest.approx(math.sqrt(2.0))
    assert d.clear() and d.cell("falls", "rises") == "+3.00 ± 1.41 (falls)"


def test_pairing_removes_the_item_spread_that_an_unpaired_error_keeps():
    """Items differ by hundreds, the paired change by about 1: the paired error is tiny."""
    k0 = [100.0, 400.0, 700.0, 1000.0]
    k1 = [99.0, 398.9, 699.1, 998.9]
    d = view_change([run(k0, k1), run([x + 1 for x in k0], [x + 1 for x in k1])], "m", 0, 1)
    unpaired = math.sqrt(2) * (sum((x - 550) ** 2 for x in k0) / 3 / 4) ** 0.5
    assert d.se < unpaired / 100 and d.clear()


def test_disagreeing_seeds_are_never_clear():
    runs = [run([10.0, 10.0], [0.0, 0.0]), run([10.0, 10.0], [10.5, 10.5])]  # +10 and -0.5
    d = view_change(runs, "m", 0, 1)
    assert not d.consistent and not d.clear() and d.cell("falls", "rises").endswith("(no clear difference)")


def test_one_seed_says_so():
    d = view_change([run([3.0, 4.0], [1.0, 1.0])], "m", 0, 1)
    assert d.se_seeds == 0.0 and d.cell("falls", "rises").endswith("(one seed)")


def test_model_difference_uses_the_between_seed_spread():
    a = [{1: {"m": [1.0, 3.0]}}, {1: {"m": [3.0, 5.0]}}]  # run means 2, 4
    b = [{1: {"m": [0.0, 0.0]}}, {1: {"m": [0.0, 2.0]}}, {1: {"m": [2.0, 2.0]}}]  # run means 0, 1, 2
    d = model_difference(a, b, "m", 1)
    assert d.mean == pytest.approx(3.0 - 1.0)
    assert d.se_seeds == pytest.approx(math.sqrt(2 / 2 + 1 / 3))
    # seed-averaged items: a (2, 4), b (2/3, 4/3): differences 4/3, 8/3 -> se = (4/3) / sqrt(2) / sqrt(2)
    assert d.se_items == pytest.approx((4 / 3) / 2)
    assert not d.consistent  # run means 2 vs 2: one pair is a tie
    assert over_seeds(b, "m", 1) == (pytest.approx(1.0), pytest.approx(1.0))


def test_runs_on_different_items_are_refused():
    with pytest.raises(ValueError, match="different numbers of items"):
        view_change([run([1.0], [0.0]), run([1.0, 2.0], [0.0, 0.0])], "m", 0, 1)


def test_missing_numbers_finds_stale_citations():
    tables = "| fcn | 3 | 709.70 ± 8.44 |\n- budget: 1,000 steps; IW-NLL drop -12.30"
    assert page_discussion.missing_numbers("It fell by 12.30 nats to 709.70 in 1,000 steps (K = 3).", tables) == []
    cited = "IW-NLL 903 → 814 → 709.70, PSNR 13.3 dB at K = 1 with 3 seeds"
    assert page_discussion.missing_numbers(cited, tables) == ["13.3", "814", "903"]


def test_a_discussion_for_other_runs_gets_a_banner():
    section = page_discussion.discussion_section("We saw 1.5.", "budget=cpu, runs made at commit abc", "budget=smoke, "
                                              "runs made at commit def", "| 1.5 |")  # fmt: skip
    assert "Stale discussion:** written for budget=cpu, runs made at commit abc" in section
    assert "(written for: budget=cpu, runs made at commit abc)" in section  # the stamp is kept, not rewritten
    fresh = page_discussion.discussion_section("We saw 1.5.", "budget=smoke", "budget=smoke", "| 1.5 |")
    assert "Stale" not in fresh and "cites numbers" not in fresh


def test_the_published_page_cites_only_numbers_of_its_tables():
    page = (ROOT / "docs" / "results.md").read_text()
    body, written_for = page_discussion.kept_discussion(ROOT / "docs" / "results.md")
    generated = page.replace(body, "")
    assert written_for and body != page_discussion.NOT_WRITTEN
    assert page_discussion.missing_numbers(body, generated) == []
    assert "Stale discussion" not in page and "cites numbers the tables do not hold" not in page
    # no claim about what the paper found without a quote and its source
    for line in body.splitlines():
        if re.search(r"paper (finds|found|shows|showed|reports)", line, re.I):
            assert '"' in line and "arXiv" in line, line
