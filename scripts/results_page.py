"""docs/results.md from the evaluation runs of ``scripts/reproduce.py``: facts (command, commit,
budget, hardware, wall time), the verdict rule, paired and seed-aware differences per K and between
models (``scripts/page_stats.py``), the fusion diagnostic, per-K tables over seeds, metric-vs-K plots
and labelled grids.

The hand-written discussion between the markers of an existing page is kept. Its opening marker
records what it was written for (budget and the commit that made the runs); a page regenerated for
other runs gets a visible banner above it, and so does a discussion that cites a number the
generated sections do not hold (``missing_numbers``)."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fusionvae.report import headers_for, markdown_table, plot_metrics_vs_k, read_per_item  # noqa: E402
from scripts.page_stats import VERDICT_RULE, model_difference, over_seeds, view_change  # noqa: E402

LIKELIHOOD = ["nelbo", "iw_nll", "kl", "prior_sigma", "class_best", "class_mean", "diversity"]
PIXEL = ["mse_best", "mse_mean", "psnr_best", "psnr_mean", "ssim_best", "ssim_mean"]
HIGHER_IS_BETTER = {"class_best", "class_mean", "psnr_best", "psnr_mean", "ssim_best", "ssim_mean"}
COMPARED = ["iw_nll", "psnr_best", "psnr_mean", "ssim_best", "class_best", "class_mean"]
PLOTTED = ["iw_nll", "kl", "prior_sigma", "psnr_best", "ssim_best", "class_best", "class_mean", "diversity"]
VIEW_STEPS = ((0, 1), (1, 2), (2, 3), (1, 3))
GRID_KS = (1, 3)
REFERENCE = "fusionvae"  # the model every other one is compared with
BEGIN = "<!-- discussion (written for: {stamp}); kept when the page is regenerated -->"
END = "<!-- end of discussion -->"
_BEGIN_RE = re.compile(r"<!-- discussion(?: \(written for: (?P<stamp>[^)]*)\))?[^>]*-->")
NOT_WRITTEN = "_(not written yet)_"


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
    rows, sds = seed_rows(models, data, ks, PLOTTED)
    series, errors = {}, {}
    for row, sd in zip(rows, sds):
        n = len(models[row["run"].split(" (")[0]])
        series.setdefault(row["run"], []).append({k: v for k, v in row.items() if k != "run"})
        errors.setdefault(row["run"], []).append({"K": row["K"], **{m: s / n**0.5 for m, s in sd.items()}})
    first = data[next(iter(models.values()))[0].name]
    plot = plot_metrics_vs_k(series, fig_dir / f"{stem}.png", first.get("units"), errors, first.get("items"))
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
        f"- digit classifier (`fusionvae.classifier`): {facts['classifier_accuracy']:.4f} accuracy on clean "
        f"MNIST test digits\n"
        f"- wall time: {sum(i['minutes'] for i in made):.1f} min; {total / 60:.1f} min of run time summed over "
        f"runs (train + eval seconds per run below)\n\n"
        f"| run | overrides | train s | eval s |\n|---|---|---:|---:|\n{per_run}\n"
    )


# ---- the discussion -----------------------------------------------------------------------------
def kept_discussion(page: Path) -> tuple[str, str | None]:
    """The hand-written discussion of an existing page and the stamp it was written for."""
    text = page.read_text() if page.is_file() else ""
    match = _BEGIN_RE.search(text)
    if not match or END not in text[match.end() :]:
        return NOT_WRITTEN, None
    body = text[match.end() : text.index(END, match.end())].strip("\n")
    return body, match.group("stamp")


_NUMBER = re.compile(r"(?<![\w.])[-+−]?\d[\d,]*(?:\.\d+)?(?![\w])")


def _numbers(text: str) -> set[str]:
    return {n.lstrip("+-−").replace(",", "") for n in _NUMBER.findall(text)}


def missing_numbers(discussion: str, generated: str) -> list[str]:
    """Numbers the discussion cites (any with a decimal point, and integers of 100 or more) that
    the generated sections do not print, sign aside: a stale or mistyped citation."""
    cited = {n for n in _numbers(discussion) if "." in n or int(n) >= 100}
    return sorted(cited - _numbers(generated), key=lambda n: float(n))


def discussion_section(body: str, written_for: str | None, current: str, generated: str) -> str:
    """The discussion under its marker, with a banner when it was written for other runs or cites
    numbers the tables do not hold."""
    banners = []
    if body != NOT_WRITTEN and written_for != current:
        banners.append(
            f"> **Stale discussion:** written for {written_for or 'unrecorded runs'}; the numbers below are "
            f"for {current}. Read it against the tables, or rewrite it and update its marker."
        )
    missing = missing_numbers(body, generated) if body != NOT_WRITTEN else []
    if missing:
        banners.append(f"> **The discussion cites numbers the tables do not hold:** {', '.join(missing)}.")
    stamp_for = current if body == NOT_WRITTEN else written_for or "unrecorded runs"
    banner = "".join(f"{b}\n\n" for b in banners)
    return f"\n## Discussion\n\n{banner}{BEGIN.format(stamp=stamp_for)}\n{body}\n{END}\n"


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
        view_section({**groups["comparison"], **groups["skips"]}, data),
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
    tmp = page.with_name(page.name + ".tmp")
    tmp.write_text(head + generated[0] + discussion + "".join(generated[1:]))
    os.replace(tmp, page)
    return page
