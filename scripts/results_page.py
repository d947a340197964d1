"""docs/results.md from the evaluation runs of ``scripts/reproduce.py``: facts (command, commit,
budget, hardware, wall time), per-K tables with standard errors, metric-vs-K plots, labelled grids
and findings computed from the numbers. Text between the discussion markers of an existing page is
kept, so a hand-written discussion survives a rerun."""

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

from fusionvae.report import headers_for, markdown_table, plot_metrics_vs_k  # noqa: E402

LIKELIHOOD = ["nelbo", "iw_nll", "class_best", "class_mean", "diversity"]
PIXEL = ["mse_best", "mse_mean", "psnr_best", "psnr_mean", "ssim_best", "ssim_mean"]
HIGHER_IS_BETTER = {"class_best", "class_mean", "psnr_best", "psnr_mean", "ssim_best", "ssim_mean"}
COMPARED = ["iw_nll", "psnr_best", "psnr_mean", "ssim_best", "class_best", "class_mean"]
GRID_KS = (1, 3)
BEGIN, END = "<!-- discussion: kept when the page is regenerated -->", "<!-- end of discussion -->"


def load_runs(runs, work: Path) -> dict[str, dict]:
    return {run.name: json.loads((work / "eval" / run.name / "metrics.json").read_text()) for run in runs}


def table(names: list[str], data: dict[str, dict], columns: list[str]) -> str:
    """One row per run and K: ``mean ± standard error``."""
    rows, errors = [], []
    for name in names:
        for row, err in zip(data[name]["per_k"], data[name]["stderr"]):
            rows.append({"run": name, **row})
            errors.append(err)
    headers = {**headers_for(data[names[0]].get("units")), "run": "run", "K": "K"}
    return markdown_table(rows, ["run", "K", *columns], headers, errors)


def falls_with_k(name: str, result: dict) -> str:
    """Whether IW-NLL falls at each step K -> K+1 by more than twice the (unpaired) standard error."""
    rows, errs = result["per_k"], result["stderr"]
    steps = []
    for a, b, ea, eb in zip(rows, rows[1:], errs, errs[1:]):
        drop, se = a["iw_nll"] - b["iw_nll"], (ea["iw_nll"] ** 2 + eb["iw_nll"] ** 2) ** 0.5
        verdict = "falls" if drop > 2 * se else ("rises" if drop < -2 * se else "no clear change")
        steps.append(f"K={a['K']}→{b['K']}: {drop:+.2f} ± {se:.2f} ({verdict})")
    values = ", ".join(f"{r['iw_nll']:.2f}" for r in rows)
    return f"- **{name}**: IW-NLL over K = {values}; drop per added view: " + "; ".join(steps) + "\n"


def compare(a: str, b: str, data: dict[str, dict]) -> str:
    """``a`` minus ``b`` per K and metric, ± the unpaired standard error, with who is ahead."""
    lines = [f"| K | {' | '.join(headers_for(None).get(m, m) for m in COMPARED)} |", "|---:|" + "---|" * len(COMPARED)]
    for ra, rb, ea, eb in zip(data[a]["per_k"], data[b]["per_k"], data[a]["stderr"], data[b]["stderr"]):
        cells = []
        for m in COMPARED:
            diff, se = ra[m] - rb[m], (ea[m] ** 2 + eb[m] ** 2) ** 0.5
            better = diff > 0 if m in HIGHER_IS_BETTER else diff < 0
            verdict = "tie" if abs(diff) <= 2 * se else (a if better else b)
            cells.append(f"{diff:+.3f} ± {se:.3f} ({verdict})")
        lines.append(f"| {ra['K']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def figures(names: list[str], data: dict[str, dict], work: Path, fig_dir: Path, stem: str) -> list[str]:
    """The metric-vs-K plot of ``names`` and their K = 1, 3 grids copied into ``fig_dir``; markdown lines."""
    fig_dir.mkdir(parents=True, exist_ok=True)
    items = data[names[0]].get("items")
    plot = plot_metrics_vs_k(
        {n: data[n]["per_k"] for n in names},
        fig_dir / f"{stem}.png",
        data[names[0]].get("units"),
        {n: data[n]["stderr"] for n in names},
        items,
    )
    lines = [f"![{stem}](results/{plot.name})\n"]
    for name in names if stem.endswith("comparison") else []:
        for k in GRID_KS:
            src = work / "eval" / name / "images" / f"grid_k{k}.png"
            if src.is_file():
                shutil.copyfile(src, fig_dir / f"grid_{name}_k{k}.png")
                lines.append(f"**{name}, K = {k}**\n\n![{name} K={k}](results/grid_{name}_k{k}.png)\n")
    return lines


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


def facts_section(runs, facts: dict, data: dict[str, dict]) -> str:
    budget = facts["budget_settings"]
    first = data[runs[0].name]
    per_run = "\n".join(
        f"| {r.name} | {' '.join(r.overrides)} | {r.seconds['train']:.0f} | {r.seconds['eval']:.0f} |" for r in runs
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
        f"- evaluation: the first {first.get('items')} test items (fixed corruption, `dataset.val_seed`), "
        f"S = {budget.iw_samples} importance samples, N = {budget.num_samples} samples at t = 1 (mean images); "
        f"± are standard errors over items\n"
        f"- digit classifier (`fusionvae.classifier`): {facts['classifier_accuracy']:.4f} accuracy on clean "
        f"MNIST test digits\n"
        f"- wall time: {sum(i['minutes'] for i in made):.1f} min; {total / 60:.1f} min of run time summed over "
        f"runs (train + eval seconds per run below)\n\n"
        f"| run | overrides | train s | eval s |\n|---|---|---:|---:|\n{per_run}\n"
    )


def kept_discussion(page: Path) -> str:
    text = page.read_text() if page.is_file() else ""
    if BEGIN in text and END in text:
        return text[text.index(BEGIN) + len(BEGIN) : text.index(END)].strip("\n")
    return "_(not written yet)_"


def write_page(runs, work: Path, out: Path, facts: dict) -> Path:
    data = load_runs(runs, work)
    groups = {table: [r.name for r in runs if r.table == table] for table in ("comparison", "ablation", "skips")}
    groups["ablation"] = ["fusionvae", *groups["ablation"]]
    page, fig_dir = out / "results.md", out / "results"
    parts = [
        f"# Results: FusionMNIST (budget `{facts['budget']}`)\n\nMade by `scripts/reproduce.py`; rerun the "
        f"command below to regenerate every number, plot and grid on this page.\n\n",
        facts_section(runs, facts, data),
    ]
    parts.append(f"\n## Discussion\n\n{BEGIN}\n{kept_discussion(page)}\n{END}\n")
    parts.append("\n## Does each added view help? (IW-NLL per K)\n\n")
    parts += [falls_with_k(name, data[name]) for name in groups["comparison"] + groups["skips"]]
    for rival in groups["comparison"][1:]:
        parts.append(f"\n### FusionVAE minus {rival} (negative IW-NLL and positive PSNR / class = FusionVAE ahead)\n\n")
        parts.append(compare("fusionvae", rival, data))
    for title, names in (
        ("Comparison", groups["comparison"] + groups["skips"]),
        ("Aggregation ablation", groups["ablation"]),
    ):
        stem = f"mnist_{title.split()[-1].lower()}"
        parts += [
            f"\n## {title}\n\nLikelihood (nats, central 28x28), semantic accuracy and diversity:\n\n",
            table(names, data, LIKELIHOOD),
            "\nPixel metrics against the clean target:\n\n",
            table(names, data, PIXEL),
            "\n",
            *figures(names, data, work, fig_dir, stem),
        ]
    out.mkdir(parents=True, exist_ok=True)
    page.write_text("".join(parts))
    return page
