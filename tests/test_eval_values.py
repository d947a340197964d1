"""Evaluator accumulation: the reported per-K metrics are item-weighted means over every
test item, also over batches of unequal size and across ranks (the gather path)."""

from __future__ import annotations

import types

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from fusionvae.evaluation.evaluator import EvalSettings, Evaluator, evaluate_batch
from fusionvae.training.module import FusionVAEModule
from tests.test_network import TINY
from tests.test_objective_values import ForwardRng, replaying

VIEWS = 3
SETTINGS = EvalSettings(iw_samples=3, iw_chunk=2, num_samples=2, grid_images=0)
NAMES = ("nelbo", "iw_nll", "kl", "prior_sigma", "mse_best", "mse_mean", "psnr_best", "psnr_mean", "ssim_best",
         "ssim_mean", "diversity")  # fmt: skip


def model(**kw) -> FusionVAEModule:
    torch.manual_seed(0)
    return FusionVAEModule(**{**TINY, "crop": 2, **kw}).eval()


def items(n: int, seed: int = 2) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(VIEWS + 1, 1, 32, 32, generator=g) for _ in range(n)]


def per_item(
    m: FusionVAEModule, batches: list[torch.Tensor], rng: list[torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """``{name_k<K>: [N]}`` for the items of ``batches``, replaying the recorded RNG state of every
    network forward (``rng``, from ``ForwardRng``) when given."""
    out: dict[str, list[torch.Tensor]] = {}
    with replaying(m.net, rng) if rng is not None else torch.no_grad():
        for batch in batches:
            for k in range(VIEWS + 1):  # Evaluator.test_step's order
                for name, values in evaluate_batch(m, batch, k, SETTINGS).items():
                    out.setdefault(f"{name}_k{k}", []).append(values.double())
    return {key: torch.cat(v) for key, v in out.items()}


def check_results(results: dict[int, dict[str, float]], values: dict[str, torch.Tensor]) -> None:
    assert sorted(results) == list(range(VIEWS + 1)) and all(set(row) == set(NAMES) for row in results.values())
    for key, v in values.items():
        name, k = key.rsplit("_k", 1)
        assert results[int(k)][name] == pytest.approx(v.mean().item(), rel=1e-6, abs=1e-9), key


def flat(results: dict[int, dict[str, float]]) -> dict[str, float]:
    """The logged form: ``eval/<metric>_k<K>``."""
    return {f"eval/{name}_k{k}": v for k, row in results.items() for name, v in row.items()}


class Batches(L.Callback):
    def __init__(self):
        self.batches = []

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.batches.append(batch.detach().clone().float())


def test_metrics_are_item_weighted_means_over_unequal_batches():
    m = model()
    rec, forwards = Batches(), ForwardRng(m.net)
    evaluator = Evaluator(m, SETTINGS)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[rec],
    )
    trainer.test(evaluator, DataLoader(items(5), batch_size=3), verbose=False)
    assert [b.shape[0] for b in rec.batches] == [3, 2]
    values = per_item(m, rec.batches, forwards.states)
    assert all(v.shape == (5,) for v in values.values())
    # the batch means differ: a mean of batch means would be off by a tenth of that, above the tolerance
    nelbo = values["nelbo_k3"]
    assert abs(nelbo[:3].mean() - nelbo[3:].mean()) / 10 > 1e-5 * nelbo.mean()
    check_results(evaluator.results, values)
    for key, v in values.items():  # per item, in item order: what per_item.csv holds
        name, k = key.rsplit("_k", 1)
        assert torch.equal(evaluator.per_item[int(k)][name], v), key
    se = evaluator.stderr[3]["nelbo"]  # standard error over the 5 items
    assert se == pytest.approx(nelbo.std().item() / 5**0.5, rel=1e-6)
    for key, value in flat(evaluator.results).items():  # and that is what the loggers got
        assert float(trainer.callback_metrics[key]) == pytest.approx(value, rel=1e-6)


def test_rank_totals_are_summed_before_dividing():
    """The world_size > 1 branch of on_test_epoch_end, with all_gather stubbed by a second
    evaluator's totals (two "ranks" holding 3 and 2 items)."""
    m = model()
    forwards = ForwardRng(m.net)
    batches = [torch.stack(items(5)[:3]), torch.stack(items(5)[3:])]
    ranks = [Evaluator(m, SETTINGS) for _ in batches]
    for evaluator, batch in zip(ranks, batches):
        evaluator.on_test_epoch_start()
        evaluator.test_step(batch, 0)
    other = ranks[1].totals()[1]
    logged = {}
    main = ranks[0]
    main._trainer = types.SimpleNamespace(world_size=2)
    main.all_gather = lambda totals: torch.stack([totals, other])
    main.log_dict = lambda metrics, **kw: logged.update(metrics)
    main._gather_items = dict  # 3 + 2 items cannot be stacked; test_per_item_gather_restores_item_order
    main.on_test_epoch_end()
    check_results(main.results, per_item(m, batches, forwards.states))
    assert set(logged) == set(flat(main.results))


def _ddp_results(tmp_path) -> dict[int, dict[str, float]]:
    evaluator = Evaluator(model(stochastic=False), SETTINGS)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_fork",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.test(evaluator, DataLoader(items(6), batch_size=2), verbose=False)
    assert trainer.world_size == 2
    results: dict[int, dict[str, float]] = {}
    for key, value in trainer.callback_metrics.items():
        name, k = key.removeprefix("eval/").rsplit("_k", 1)
        results.setdefault(int(k), {})[name] = float(value)
    return results


def test_two_process_gloo_gather_gives_the_single_process_means(tmp_path):
    """Real DDP (2 forked CPU processes, gloo): each rank sees 3 items as batches of 2 and 1. The
    deterministic FCN makes every metric a function of the item alone, so the gathered result
    must equal the mean over the 6 items computed here in one process."""
    results = _ddp_results(tmp_path)
    values = per_item(model(stochastic=False), [torch.stack(items(6))])
    check_results(results, values)
    # rank 0 alone (items 0, 2, 4) would give another value: the totals were really gathered
    assert results[3]["nelbo"] != pytest.approx(values["nelbo_k3"][::2].mean().item(), rel=1e-6)


def test_per_item_gather_restores_item_order():
    """Lightning's test sampler deals item i to rank i % 2: rank 0 holds items 0, 2, 4 and rank 1
    items 1, 3, 5; the gathered values come back in item order, on the CPU."""
    e = Evaluator(model(), SETTINGS)
    e._values = {2: {"nelbo": [torch.tensor([0.0, 2.0]), torch.tensor([4.0])]}}
    e._trainer = types.SimpleNamespace(world_size=2)
    e.all_gather = lambda values: torch.stack([values, values + 1])
    assert e._gather_items()[2]["nelbo"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
