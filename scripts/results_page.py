"""docs/results.md from the evaluation runs of ``scripts/reproduce.py``: facts (command, commit,
budget, hardware, wall time), the verdict rule, paired and seed-aware differences per K and between
models (``scripts/page_stats.py``), the fusion diagnostic, per-K tables over seeds, metric-vs-K plots
and labelled grids.

The hand-written discussion of an existing page is kept, with banners when it was written for other
runs or cites numbers the tables do not hold (``scripts/page_discussion.py``)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fusionvae.evaluation.report import headers_for, markdown_table, read_per_item  # noqa: E402
from fusionvae.evaluation.report_plot import plot_metrics_vs_k  # noqa: E402
from fusionvae.files import write_text  # noqa: E402
from scripts.page_discussion import discussion_section, kept_discussion  # noqa: E402
from scripts.page_stats import VERDICT_RULE, model_difference, over_seeds, view_change  # noqa: E402

LIKELIHOOD = ["nelbo", "iw_nll", "kl", "prior_sigma", "class_best", "class_mean", "diversity"]
PIXEL = ["mse_best", "mse_mean", "psnr_best", "psnr_mean", "ssim_best", "ssim_mean"]
HIGHER_IS_BETTER = {"class_best", "class_mean", "psnr_best", "psnr_mean", "ssim_best", "ssim_mean"}
COMPARED = ["iw_nll", "psnr_best", "psnr_mean", "ssim_best", "class_best", "class_mean"]
PLOTTED = ["iw_nll", "kl", "prior_sigma", "psnr_best", "ssim_best", "class_best", "class_mean", "diversity"]
VIEW_STEPS = ((0, 1), (1, 2), (2, 3), (1, 3))
GRID_KS = (1, 3)
REFERENCE = "fusionvae"  # the model every other one is compared with


# ---- data ---------------------------------------------------------------------------------------
def load_runs(runs, work: Path) -> dict[str, dict]:
    """Run name -> its metrics.json, with its per-item values under ``"items"``."""
    data = {}
    for run in runs:
        folder = work / "eval" / run.name
        data[run.name] = json.loads((folder / "metrics.json").read_text())
        data[run.name]["items_by_k"] = read_per_item(folder / "per_item.csv")
    return data


def by_model(runs) -> dict[str, list]:
    """Model -> its runs (seeds ascending), models in the order they first appear."""
    models: dict[str, list] = {}
    for run in sorted(runs, key=lambda r: r.seed):
        models.setdefault(run.model, []).append(run)
    return {m: models[m] for m in dict.fromkeys(r.model for r in runs)}


def seed_items(model_runs, data: dict[str, dict]) -> list[dict]:
    return [data[run.name]["items_by_k"] for run in model_runs]


# ---- generated sections ---------------------------------------------------------------------------
def view_section(models: dict[str, list], data: dict[str, dict]) -> str:
    """Per model, the paired change from K = a to K = b of IW-NLL, KL, prior sigma and PSNR best."""
    metrics = {"iw_nll": ("falls", "rises"), "kl": ("falls", "rises"), "prior_sigma": ("falls", "rises"),
               "psnr_best": ("rises", "falls")}  # fmt: skip
    heads = {"iw_nll": "IW-NLL drop", "kl": "KL drop", "prior_sigma": "prior sigma drop", "psnr_best": "PSNR best gain"}
    parts = []
    for model, runs in models.items():
        items = seed_items(runs, data)
        lines = [
            f"**{model}** ({len(runs)} seed{'s' if len(runs) > 1 else ''}; per seed: the IW-NLL drop of each run)\n",
            "| K | " + " | ".join(heads.values()) + " | IW-NLL drop per seed |",
            "|---|" + "---|" * (len(heads) + 1),
        ]
        for a, b in VIEW_STEPS:
            cells = []
            for metric, (good, bad) in metrics.items():
                diff = view_change(items, metric, a, b)
                if metric == "psnr_best":  # a gain is good: report b - a
                    diff = view_change(items, metric, b, a)
                cells.append(diff.cell(good, bad, 3 if metric == "prior_sigma" else 2))
            per_seed = ", ".join(f"{d:+.2f}" for d in view_change(items, "iw_nll", a, b).per_seed)
            lines.append(f"| {a}→{b} | " + " | ".join(cells) + f" | {per_seed} |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def comparison_section(models: dict[str, list], data: dict[str, dict], ks: list[int]) -> str:
    """``REFERENCE`` minus every other model per K: paired on items, seeds unpaired."""
    ref = seed_items(models[REFERENCE], data)
    parts = []
    for rival, runs in models.items():
        if rival == REFERENCE:
            continue
        items = seed_items(runs, data)
        lines = [
            f"### {REFERENCE} minus {rival} (negative IW-NLL, positive PSNR / SSIM / class: {REFERENCE} ahead)\n",
            f"| K | {' | '.join(headers_for(None).get(m, m) for m in COMPARED)} |",
            "|---:|" + "---|" * len(COMPARED),
        ]
        for k in ks:
            cells = []
            for m in COMPARED:
                diff = model_difference(ref, items, m, k)
                ahead, behind = (REFERENCE, rival) if m in HIGHER_IS_BETTER else (rival, REFERENCE)
                cells.append(diff.cell(ahead, behind, 3))
            lines.append(f"| {k} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def seed_rows(models: dict[str, list], data: dict[str, dict], ks: list[int], columns: list[str]):
    """Rows ``{run: model (n seeds), K, metric: mean over seeds}`` and their between-seed SDs."""
    rows, errors = [], []
    for model, runs in models.items():
        items = seed_items(runs, data)
        for k in ks:
            stats = {m: over_seeds(items, m, k) for m in columns if m in items[0][k]}
            rows.append({"run": f"{model} ({len(runs)})", "K": k, **{m: s[0] for m, s in stats.items()}})
            errors.append({m: s[1] for m, s in stats.items()})
    return rows, errors


def table(models, data, ks, columns, units) -> str:
    rows, errors = seed_rows(models, data, ks, columns)
    headers = {**headers_for(units), "run": "model (seeds)", "K": "K"}
    return markdown_table(rows, ["run", "K", *columns], headers, errors)


def figures(models: dict[str, list], data: dict[str, dict], ks, work: Path, fig_dir: Path, stem: str) -> list[str]:
    """The metric-vs-K plot (means over seeds, bars: between-seed standard error) and each model's
    labelled K = 1, 3 grids of its first seed, copied into ``fig_dir``; markdown lines."""
    fig_dir.mkdir(parents=True, exist_ok=True)
    series, errors = {}, {}
    for model, runs in models.items():
        rows, sds = seed_rows({model: runs}, data, ks, PLOTTED)
        label, n = rows[0]["run"], len(runs)
        series[label] = [{k: v for k, v in row.items() if k != "run"} for row in rows]
        errors[label] = [{"K": row["K"], **{m: s / n**0.5 for m, s in sd.items()}} for row, sd in zip(rows, sds)]
    first = data[next(iter(models.values()))[0].name]
    plot = plot_metrics_vs_k(series, fig_dir / f"{stem}.png", first.get("units"), errors)  # bars: not item errors
    lines = [f"![{stem}](results/{plot.name})\n\nMeans over seeds; bars: between-seed standard error.\n"]
    for model, runs in models.items():
        for k in GRID_KS:
            src = work / "eval" / runs[0].name / "images" / f"grid_k{k}.png"
            if src.is_file():
                shutil.copyfile(src, fig_dir / f"grid_{model}_k{k}.png")
                image = f"![{model} K={k}](results/grid_{model}_k{k}.png)"
                lines.append(f"**{model}, K = {k}** (seed {runs[0].seed})\n\n{image}\n")
    return lines


# ---- facts --------------------------------------------------------------------------------------
def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    cores = len(os.sched_getaffinity(0))
    return f"{cpu}, {cores} cores{gpu}; Python {platform.python_version()}, torch {torch.__version__}"


def commit() -> str:
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return (git("rev-parse", "--short", "HEAD") or "unknown") + (" (with uncommitted changes)" if dirty else "")


def stamp(facts: dict) -> str:
    """What the numbers come from: the budget and the commit(s) whose invocations made the runs."""
    made = sorted({i["commit"] for i in facts["invocations"] if i["made"]}) or ["unknown"]
    return f"budget={facts['budget']}, runs made at commit {'+'.join(made)}"


def facts_section(runs, facts: dict, data: dict[str, dict]) -> str:
    budget = facts["budget_settings"]
    first = data[runs[0].name]
    per_run = "\n".join(
        f"| {r.name} | {' '.join(r.overrides)} seed={r.seed} | {r.seconds['train']:.0f} | {r.seconds['eval']:.0f} |"
        for r in runs
    )
    total = sum(r.seconds["train"] + r.seconds["eval"] for r in runs)
    made = [i for i in facts["invocations"] if i["made"]]
    invocations = "".join(
        f"  - `{i['command']}` at commit `{i['commit']}`, started {i['started']}: {i['minutes']:.1f} min wall "
        f"on {i['hardware']}, {i['jobs']} run(s) in parallel with {i['threads']} thread(s) each; "
        f"made {', '.join(i['made'])}\n"
        for i in made
    )
    return (
        f"- made by (with `FUSIONVAE_DATA_DIR` pointing at MNIST):\n{invocations}"
        f"- page written at commit `{commit()}`, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n"
        f"- budget `{facts['budget']}`: {budget.note}; shared overrides `{' '.join(budget.train)}`\n"
        f"- evaluation: the same first {first.get('items')} test items for every run (fixed corruption, "
        f"`dataset.val_seed`), S = {budget.iw_samples} importance samples, N = {budget.num_samples} samples at "
        f"t = 1 (mean images); per-item values in each run's `per_item.csv`\n"
        f"- digit classifier (`fusionvae.evaluation.classifier`): {facts['classifier_accuracy']:.4f} accuracy on clean "
        f"MNIST test digits\n"
        f"- wall time: {sum(i['minutes'] for i in made):.1f} min; {total / 60:.1f} min of run time summed over "
        f"runs (train + eval seconds per run below)\n\n"
        f"| run | overrides | train s | eval s |\n|---|---|---:|---:|\n{per_run}\n"
    )


# ---- the page -----------------------------------------------------------------------------------
def write_page(runs, work: Path, out: Path, facts: dict) -> Path:
    data = load_runs(runs, work)
    models = by_model(runs)
    groups = {t: {m: rs for m, rs in models.items() if rs[0].table == t} for t in ("comparison", "ablation", "skips")}
    ablation = {m: models[m] for m in ("fusionvae", "fusionvae_params") if m in models} | groups["ablation"]
    ks = [row["K"] for row in data[runs[0].name]["per_k"]]
    units = data[runs[0].name].get("units")
    page, fig_dir = out / "results.md", out / "results"
    generated = [
        facts_section(runs, facts, data),
        f"\n## How to read the numbers\n\n{VERDICT_RULE} Tables of means show ± the between-seed standard "
        "deviation of the run means (the number of seeds in brackets).\n",
        "\n## Does each added view help?\n\nPaired over items and seeds, K = a minus K = b (for PSNR: b minus a); "
        "the fusion diagnostic is the KL of the posterior to the prior, summed over the latent groups, and the "
        "prior's mean sigma: if the views inform the prior, both fall as K grows.\n\n",
        view_section(models, data),
    ]
    if REFERENCE in models and len(models) > 1:
        generated += ["\n## FusionVAE against the other models, per K\n\n", comparison_section(models, data, ks)]
    compared = {**groups["comparison"], **groups["skips"]}
    for title, chosen in (("Comparison", compared), ("Aggregation ablation", ablation)):
        if not chosen:
            continue
        stem = f"mnist_{title.split()[-1].lower()}"
        generated += [
            f"\n## {title}\n\nLikelihood ({units}, central 28x28), fusion diagnostic, semantic accuracy and "
            "diversity:\n\n",
            table(chosen, data, ks, LIKELIHOOD, units),
            "\nPixel metrics against the clean target:\n\n",
            table(chosen, data, ks, PIXEL, units),
            "\n",
            *figures(chosen, data, ks, work, fig_dir, stem),
        ]
    body, written_for = kept_discussion(page)
    head = (
        f"# Results: FusionMNIST (budget `{facts['budget']}`)\n\nMade by `scripts/reproduce.py`; rerun the "
        f"command below to regenerate every number, plot and grid on this page.\n\n"
    )
    text = "".join(generated)
    discussion = discussion_section(body, written_for, stamp(facts), text)
    out.mkdir(parents=True, exist_ok=True)
    return write_text(page, head + generated[0] + discussion + "".join(generated[1:]))
