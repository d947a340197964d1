"""Callbacks that the GPU tests add to CLI runs (``+callbacks.<name>._target_=tests.gpu_helpers.<Class>``)."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import torch.nn as nn


class SyncBatchNormProbe(L.Callback):
    """Writes ``sync_batchnorm.json`` (per rank) at the start of training: how many BatchNorms of the
    module Lightning converted to SyncBatchNorm and how many plain ones are left."""

    def on_train_start(self, trainer, pl_module):
        norms = [m for m in pl_module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        info = {
            "sync": sum(isinstance(m, nn.SyncBatchNorm) for m in norms),
            "plain": sum(not isinstance(m, nn.SyncBatchNorm) for m in norms),
            "world_size": trainer.world_size,
            "device": str(pl_module.device),
        }
        Path(trainer.default_root_dir, f"sync_batchnorm_rank{trainer.global_rank}.json").write_text(json.dumps(info))
