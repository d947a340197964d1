"""Reproduce the FusionMNIST comparison and ablation and publish them as docs/results.md.

    FUSIONVAE_DATA_DIR=/path/to/data python scripts/reproduce.py mnist               # CPU budget (README: time)
    FUSIONVAE_DATA_DIR=... python scripts/reproduce.py mnist --budget paper --jobs 1   # the paper's settings (GPUs)

Trains every model of the budget (``Budget.seeds``: FusionVAE at both aggregation levels, the CVAE
and FCN baselines; ``--runs`` adds the ablation) once per seed with ``train.py`` (``seed=<s>``:
initialisation, data order, corruption and K draws all change), evaluates each run with
``evaluate.py`` on the same first ``eval_items`` test items (with the digit classifier of
``fusionvae.evaluation.classifier``, trained once and cached) and writes the page (``scripts/results_page.py``).
Runs live in ``<log_dir>/reproduce/<budget>/`` as ``<model>_s<seed>``; a finished run is not
redone, an interrupted one resumes from its last.ckpt, so rerunning the command continues.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fusionvae.evaluation.classifier import ensure_classifier  # noqa: E402
from scripts.results_page import commit, hardware, write_page  # noqa: E402


@dataclass(frozen=True)
class Budget:
    """How long each model trains and how thoroughly it is evaluated."""

    train: tuple[str, ...]  # train.py overrides shared by every run
    eval_items: int  # first test items evaluated (a multiple of eval_batch)
    eval_batch: int
    iw_samples: int  # S of the IW-NLL
    num_samples: int  # N of best-/mean-of-N and of the semantic metrics
    classifier_epochs: int
    classifier_items: int | None = None  # None: all 60,000 training digits
    jobs: int = 2  # runs in parallel (each with cpu_count / jobs threads)
    note: str = ""
    seeds: tuple[tuple[str, int], ...] = (("fusionvae", 3), ("fusionvae_params", 3), ("cvae", 2), ("fcn", 2))


BUDGETS = {
    "cpu": Budget(
        (
            "trainer=cpu",
            "+trainer.max_steps=600",
            "dataset.batch_size=64",
            "trainer.limit_val_batches=4",
            "dataset.num_workers=0",
        ),
        eval_items=256,
        eval_batch=32,
        iw_samples=20,
        num_samples=10,
        classifier_epochs=2,
        note="600 steps of batch 64 (0.64 epochs) per run on the CPU",
        seeds=(
            ("fusionvae", 3),
            ("fusionvae_params", 3),
            ("cvae", 2),
            ("fcn", 2),
            ("fusionvae_mean", 2),
            ("fusionvae_mean_params", 2),
        ),
    ),
    "paper": Budget(
        ("experiment=mnist_paper",),
        eval_items=10000,
        eval_batch=100,
        iw_samples=1000,
        num_samples=10,
        classifier_epochs=2,
        jobs=1,
        note="the paper's settings: 400 epochs, batch 800 on 2 GPUs",
    ),
    "smoke": Budget(
        (
            "trainer=cpu",
            "+trainer.max_steps=2",
            "dataset.batch_size=8",
            "model/size=tiny",
            "trainer.limit_val_batches=1",
            "dataset.num_workers=0",
            "dataset.val_batch_size=8",
        ),
        eval_items=8,
        eval_batch=8,
        iw_samples=2,
        num_samples=2,
        classifier_epochs=1,
        classifier_items=512,
        jobs=1,
        note="a few steps of the tiny model: checks the pipeline",
        seeds=(("fusionvae", 2), ("fusionvae_params", 1), ("fcn", 1)),
    ),
}

# model -> (table, train.py overrides): "comparison" rows are the paper's models and FusionVAE at
# the params level, "ablation" rows FusionVAE with each aggregation (its max rows are the
# comparison's FusionVAE runs); each is trained once per seed
PARAMS = "model.aggregation_level=params"
RUNS = {
    "fusionvae": ("comparison", ("model=fusionvae",)),
    "fusionvae_params": ("comparison", ("model=fusionvae", PARAMS)),
    "cvae": ("comparison", ("model=cvae",)),
    "fcn": ("comparison", ("model=fcn",)),
    "fusionvae_mean": ("ablation", ("model=fusionvae", "model.aggregation=mean")),
    "fusionvae_mean_params": ("ablation", ("model=fusionvae", "model.aggregation=mean", PARAMS)),
    "fusionvae_bayes": ("ablation", ("model=fusionvae", "model.aggregation=bayes", PARAMS)),
    "fusionvae_bayes_official": ("ablation", ("model=fusionvae", "model.aggregation=bayes_official", PARAMS)),
}
SKIP_RUNS = {f"{name}_skip": ("skips", (f"model={name}_skip",)) for name in ("cvae", "fcn")}
QUIET = (
    "logger=csv",
    "callbacks.progress_bar=null",
    "+trainer.enable_progress_bar=false",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_model_summary=false",
)


@dataclass
class Run:
    model: str  # a key of RUNS / SKIP_RUNS
    seed: int
    table: str
    overrides: tuple[str, ...]
    seconds: dict = field(default_factory=dict)  # train / eval wall time (this invocation or the one that made it)
    made: bool = False  # trained or evaluated by this invocation

    @property
    def name(self) -> str:
        return f"{self.model}_s{self.seed}"


def run_step(cmd: list[str], log: Path, env: dict) -> float:
    """Run one entry point, its output in ``log``; the wall time, or exit naming the log on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log, "w") as out:
        rc = subprocess.call(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)
    if rc != 0:
        tail = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{' '.join(cmd[1:3])} failed (exit {rc}): {tail[0]} (full log: {log})")
    return time.time() - start


def train_and_evaluate(run: Run, budget: Budget, work: Path, classifier: Path, env: dict) -> Run:
    """Train (or resume, or reuse) and evaluate one run; wall times are kept in ``done.json``."""
    train_dir, eval_dir, marker = (
        work / "train" / run.name,
        work / "eval" / run.name,
        work / "done" / f"{run.name}.json",
    )
    if marker.is_file():
        run.seconds = json.loads(marker.read_text())
        return run
    last = train_dir / "checkpoints" / "last.ckpt"
    resume = [f"ckpt_path={last}"] if last.is_file() else []
    train = [
        sys.executable,
        "train.py",
        *budget.train,
        *run.overrides,
        f"seed={run.seed}",
        *QUIET,
        *resume,
        f"task_name=reproduce_{run.name}",
        f"hydra.run.dir={train_dir}",
    ]
    run.seconds["train"] = run_step(train, work / "logs" / f"{run.name}.train.log", env)
    evaluate = [
        sys.executable,
        "evaluate.py",
        f"ckpt_path={last}",
        f"hydra.run.dir={eval_dir}",
        "trainer=cpu" if "trainer=cpu" in budget.train else "trainer=default",
        "logger=csv",
        f"dataset.val_batch_size={budget.eval_batch}",
        f"trainer.limit_test_batches={budget.eval_items // budget.eval_batch}",
        f"eval.iw_samples={budget.iw_samples}",
        f"eval.num_samples={budget.num_samples}",
        f"eval.classifier={classifier}",
        "eval.grid_images=6",
        "+trainer.enable_progress_bar=false",
    ]
    run.seconds["eval"] = run_step(evaluate, work / "logs" / f"{run.name}.eval.log", env)
    run.made = True
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(run.seconds))
    return run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=["mnist"], help="the dataset to reproduce (FusionMNIST)")
    parser.add_argument("overrides", nargs="*", help="more train.py overrides for every run, e.g. trainer.devices=1")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="cpu")
    parser.add_argument("--jobs", type=int, default=None, help="runs in parallel (default: the budget's)")
    parser.add_argument("--runs", default=None, help="comma-separated models (default: the budget's, see Budget.seeds)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per model (default: the budget's)")
    parser.add_argument("--skips", action="store_true", help="also the CVAE / FCN skip-connection variants")
    parser.add_argument("--eval-items", type=int, default=None, help="test items evaluated (default: the budget's)")
    parser.add_argument("--iw-samples", type=int, default=None, help="S of the IW-NLL (default: the budget's)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where results.md and its figures go")
    parser.add_argument("--data-dir", default=os.environ.get("FUSIONVAE_DATA_DIR", "data"))
    parser.add_argument("--log-dir", type=Path, default=Path(os.environ.get("FUSIONVAE_LOG_DIR", "logs")))
    return parser.parse_args(argv)


def chosen(args: argparse.Namespace) -> tuple[Budget, list[Run]]:
    """The budget with the command line's changes, and the runs to make."""
    budget = BUDGETS[args.budget]
    budget = dataclasses.replace(
        budget,
        train=(*budget.train, *args.overrides),
        eval_items=args.eval_items or budget.eval_items,
        iw_samples=args.iw_samples or budget.iw_samples,
    )
    if budget.eval_items % budget.eval_batch:
        raise SystemExit(f"--eval-items must be a multiple of {budget.eval_batch} (the evaluation batch)")
    known, seeds = {**RUNS, **SKIP_RUNS}, dict(budget.seeds)
    names = args.runs.split(",") if args.runs else [*seeds, *(SKIP_RUNS if args.skips else {})]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown run(s) {', '.join(unknown)}; known: {', '.join(known)}")
    count = {n: args.seeds or seeds.get(n, min(seeds.values())) for n in names}
    # seed-major: an interrupted page has every model at its first seeds
    return budget, [Run(n, seed, *known[n]) for seed in range(max(count.values())) for n in names if seed < count[n]]


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    budget, runs = chosen(args)
    jobs = max(1, args.jobs or budget.jobs)
    work = (args.log_dir / "reproduce" / args.budget).absolute()
    env = {
        **os.environ,
        "FUSIONVAE_DATA_DIR": str(Path(args.data_dir).absolute()),
        "HYDRA_FULL_ERROR": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs))),
    }
    start = time.time()
    classifier, accuracy = ensure_classifier(
        args.data_dir, work / "digit_classifier.pt", epochs=budget.classifier_epochs, items=budget.classifier_items
    )
    print(f"digit classifier {classifier}: clean test accuracy {accuracy:.4f}", flush=True)
    with ThreadPoolExecutor(jobs) as pool:
        futures = [pool.submit(train_and_evaluate, run, budget, work, classifier, env) for run in runs]
        for future in futures:
            run = future.result()
            print(f"{run.name}: train {run.seconds['train']:.0f} s, eval {run.seconds['eval']:.0f} s", flush=True)
    command = " ".join(["python", "scripts/reproduce.py", *(argv if argv is not None else sys.argv[1:])])
    invocation = {"command": command, "commit": commit(), "hardware": hardware(), "jobs": jobs,
                  "threads": env["OMP_NUM_THREADS"], "minutes": round((time.time() - start) / 60, 1),
                  "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(start)),
                  "made": [run.name for run in runs if run.made]}  # fmt: skip
    facts = {"budget": args.budget, "budget_settings": budget, "classifier_accuracy": accuracy,
             "invocations": record_invocation(work, invocation)}  # fmt: skip
    page = write_page(runs, work, args.out, facts)
    print(f"wrote {page}")
    return page


def record_invocation(work: Path, invocation: dict) -> list[dict]:
    """Append this invocation to ``<work>/invocations.json`` (runs keep who made them); all of them."""
    path = work / "invocations.json"
    known = json.loads(path.read_text()) if path.is_file() else []
    known.append(invocation)
    path.write_text(json.dumps(known, indent=1))
    return known


if __name__ == "__main__":
    main()
