"""Time to the first training step, for ``model.compile=true`` (or eager, for comparison): the real
Lightning training step of any model/dataset config, as benchmarks/throughput.py runs it.

    python benchmarks/compile_time.py [hydra overrides ...] [--k 3] [--steps 3] [--warm-cache]
e.g. FUSIONVAE_DATA_DIR=/path/to/data OMP_NUM_THREADS=1 python benchmarks/compile_time.py \
         dataset.batch_size=64 dataset.num_workers=0 --k 3 model.compile=true

Reports the seconds from the script's start to the end of the first training step (imports, data
set-up and, compiled, the compilation of that step's graphs), the seconds of each step, and the
graphs Dynamo compiled. Inductor's on-disk cache is a fresh folder unless ``--warm-cache``: a cold
compile, as on a new machine. The last line is JSON.
"""

from __future__ import annotations

import time

START = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402


def parse():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--k", type=int, default=None, help="fixed number of input views (default: random per step)")
    parser.add_argument("--warm-cache", action="store_true", help="keep inductor's on-disk cache")
    return parser.parse_known_args()


def main() -> None:
    args, overrides = parse()
    if args.warm_cache:
        measure(args, overrides)
        return
    with tempfile.TemporaryDirectory(prefix="fusionvae_inductor_") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # before torch is imported: inductor reads it
        measure(args, overrides)


def measure(args, overrides: list[str]) -> None:
    import lightning as L
    from throughput import build, training_only
    from torch._dynamo.utils import counters

    class StepClock(L.Callback):
        def __init__(self):
            self.ends: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.ends.append(time.perf_counter() - START)

    cfg, dm, model = build(overrides, args.k)
    clock = StepClock()
    trainer = training_only(clock, args.steps)
    trainer.fit(model, datamodule=dm)
    steps = [b - a for a, b in zip(clock.ends, clock.ends[1:])]
    result = dict(
        compile=bool(cfg.model.compile),
        backend=os.environ.get("FUSIONVAE_COMPILE_BACKEND", "inductor") if cfg.model.compile else None,
        cache="warm" if args.warm_cache else "cold",
        batch=cfg.dataset.batch_size,
        k=args.k,
        first_step_s=round(clock.ends[0], 1),
        later_steps_s=[round(s, 3) for s in steps],
        graphs=counters["stats"]["unique_graphs"],
    )
    print(
        f"compile={result['compile']} batch={result['batch']} K={args.k if args.k is not None else 'random'}: "
        f"first step done {result['first_step_s']} s after the start ({result['graphs']} graphs compiled, "
        f"{result['cache']} cache); later steps {result['later_steps_s']} s"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
