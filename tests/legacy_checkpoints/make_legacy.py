"""Writes the legacy checkpoints of this folder. Run it at commit 1f31b6e (the last commit before
``model.aggregation_level``), from a checkout of that commit:

    git worktree add /tmp/old 1f31b6e && cd /tmp/old && python <this file> <this folder>

It saves two tiny models (FusionVAE with max aggregation; the CVAE with max skips) whose weights
are perturbed so that every head matters, and what that code computed for them in ``numbers.json``:
KL, log q, log p and the mean image of fixed inputs per K, and evaluate_batch's metrics.
tests/test_legacy_checkpoints.py checks that today's code loads them and computes the same.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, ".")
from fusionvae.evaluation.evaluator import EvalSettings, evaluate_batch  # noqa: E402
from fusionvae.model.objective import split_views  # noqa: E402
from fusionvae.training.module import FusionVAEModule  # noqa: E402
from tests.conftest import save_checkpoint  # noqa: E402

OUT = Path(sys.argv[1])
SIZE = dict(num_channels=4, num_preprocess_blocks=1, num_preprocess_cells=1, num_postprocess_blocks=1,
            num_postprocess_cells=1, num_latent_scales=2, num_groups_per_scale=2, num_latent_per_group=2,
            num_mix=3)  # fmt: skip
MODELS = {
    "fusionvae_max": dict(aggregation="max", skip="none"),
    "cvae_skip_max": dict(aggregation="max", skip="max", num_latent_scales=1, num_groups_per_scale=1),
}
SETTINGS = EvalSettings(iw_samples=3, iw_chunk=3, num_samples=2, grid_images=0)


def inputs() -> torch.Tensor:
    return torch.rand(4, 4, 1, 32, 32, generator=torch.Generator().manual_seed(7))


def numbers(m: FusionVAEModule) -> dict:
    m.eval()
    out = {}
    for k in range(4):
        views, target = split_views(inputs(), k)
        torch.manual_seed(11)
        with torch.no_grad():
            o = m.net(views, target)
            mean_image = m.net(views, None, t=0.0).likelihood.mean()
        torch.manual_seed(13)
        metrics = evaluate_batch(m, inputs(), k, SETTINGS)
        out[k] = {"kl": o.kl.sum(1).tolist(), "log_q": o.log_q.tolist(), "log_p": o.log_p.tolist(),
                  "mean_image_sum": float(mean_image.double().sum()),
                  "metrics": {name: v.tolist() for name, v in metrics.items()}}  # fmt: skip
    return out


result = {}
for name, extra in MODELS.items():
    torch.manual_seed(0)
    module = FusionVAEModule(image_size=32, channels=1, k_max=3, crop=2, **{**SIZE, **extra})
    with torch.no_grad():  # away from the initialisation, so that every head and skip matters
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_checkpoint(module, OUT / f"{name}.ckpt")
    result[name] = numbers(module)
(OUT / "numbers.json").write_text(json.dumps(result, indent=1))
