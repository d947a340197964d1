"""Paired, seed-aware statistics for the results page (``scripts/results_page.py``).

Every run of a model is one training seed, evaluated on the same test items (fixed corruption),
so a difference can be paired twice over: on items (the same item at two K, or under two models)
and, within one model, on seeds (the same run at two K).

- ``view_change``: one model, K = a -> K = b. Per seed s the paired difference over items
  D_s = mean_i (x_si(a) - x_si(b)); reported: mean over seeds D, its standard error
  SE = sqrt(se_items^2 + se_seeds^2), with se_items the paired standard error of the
  seed-averaged item differences and se_seeds = sd_s(D_s) / sqrt(n_seeds) (0 for one seed).
- ``model_difference``: two models at one K. Delta = mean_s mean_i x_A - mean_t mean_i x_B;
  se_items from the item differences of the seed-averaged values, se_seeds =
  sqrt(var_s(A) / n_A + var_t(B) / n_B) from the between-seed spread of the run means.

``VERDICT_RULE`` is how a difference is called clear; it is printed once on the page.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

PerItem = dict[int, dict[str, list[float]]]  # K -> metric -> value per item (per_item.csv of one run)

VERDICT_RULE = (
    "A difference is called clear when (1) it exceeds twice its standard error, which adds the paired "
    "standard error over test items (the same items at every K and for every model) and the "
    "between-seed standard error of the run means, and (2) it has the same sign in every seed (within "
    "a model: every seed's own paired difference; between models: every pair of one seed of each). "
    "With one seed, (2) cannot be checked and the verdict reads 'one seed'. Otherwise it is 'no clear "
    "difference'."
)


@dataclass(frozen=True)
class Difference:
    mean: float  # over seeds
    se: float  # total standard error (items and seeds)
    se_items: float
    se_seeds: float
    per_seed: tuple[float, ...]  # within a model: each seed's paired difference; between: each run's mean
    consistent: bool  # same sign in every seed (pair)
    seeds: int

    def clear(self) -> bool:
        return self.seeds > 1 and self.consistent and abs(self.mean) > 2 * self.se

    def cell(self, good: str, bad: str, digits: int = 2) -> str:
        """``+1.23 ± 0.45 (good)``: ``good`` when clearly positive, ``bad`` when clearly negative."""
        if self.seeds < 2:
            verdict = "one seed"
        elif self.clear():
            verdict = good if self.mean > 0 else bad
        else:
            verdict = "no clear difference"
        return f"{self.mean:+.{digits}f} ± {self.se:.{digits}f} ({verdict})"


def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _var(xs: Sequence[float]) -> float:
    """Sample variance (n - 1); 0 for fewer than two values."""
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


def _se_of_mean(xs: Sequence[float]) -> float:
    return math.sqrt(_var(xs) / len(xs))


def _seed_average(seeds: Sequence[Sequence[float]]) -> list[float]:
    """Per item, the mean over seeds (every seed holds the same items)."""
    n = {len(s) for s in seeds}
    if len(n) != 1:
        raise ValueError(f"runs were evaluated on different numbers of items: {sorted(n)}")
    return [_mean(col) for col in zip(*seeds)]


def view_change(runs: Sequence[PerItem], metric: str, a: int, b: int) -> Difference:
    """``metric`` at K = ``a`` minus at K = ``b`` for one model's seeds (positive: it fell)."""
    diffs = [[x - y for x, y in zip(run[a][metric], run[b][metric])] for run in runs]
    per_seed = tuple(_mean(d) for d in diffs)
    se_items = _se_of_mean(_seed_average(diffs))
    se_seeds = _se_of_mean(per_seed)
    mean = _mean(per_seed)
    consistent = all(d * mean > 0 for d in per_seed)
    return Difference(mean, math.hypot(se_items, se_seeds), se_items, se_seeds, per_seed, consistent, len(runs))


def model_difference(runs_a: Sequence[PerItem], runs_b: Sequence[PerItem], metric: str, k: int) -> Difference:
    """``metric`` of model A minus model B at K = ``k``, paired on items, seeds unpaired."""
    means_a = [_mean(run[k][metric]) for run in runs_a]
    means_b = [_mean(run[k][metric]) for run in runs_b]
    items_a = _seed_average([run[k][metric] for run in runs_a])
    items_b = _seed_average([run[k][metric] for run in runs_b])
    se_items = _se_of_mean([x - y for x, y in zip(items_a, items_b)])
    se_seeds = math.sqrt(_var(means_a) / len(means_a) + _var(means_b) / len(means_b))
    mean = _mean(means_a) - _mean(means_b)
    consistent = all((x - y) * mean > 0 for x in means_a for y in means_b)
    seeds = min(len(means_a), len(means_b))
    return Difference(mean, math.hypot(se_items, se_seeds), se_items, se_seeds, (*means_a, *means_b), consistent, seeds)


def over_seeds(runs: Sequence[PerItem], metric: str, k: int) -> tuple[float, float]:
    """Mean over seeds of the run means and the between-seed standard deviation."""
    means = [_mean(run[k][metric]) for run in runs]
    return _mean(means), math.sqrt(_var(means))
