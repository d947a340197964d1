"""Collect evaluation runs into one comparison table (markdown + CSV) and a metric-vs-K plot.

    python scripts/collect_results.py logs/evaluate/multiruns/<date> [more dirs ...] --out comparison

Walks the given directories (Hydra run or multirun dirs) for ``metrics.json`` files written by
``evaluate.py``; each run is described by the model facts saved there (the training config's
``model`` choice, aggregation, skip, res_dist). Writes ``<out>.md``, ``<out>.csv`` and
``<out>.png``: one row per run and K, means with standard errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fusionvae.evaluation.report import headers_for, markdown_table, metric_columns  # noqa: E402
from fusionvae.evaluation.report_plot import plot_metrics_vs_k  # noqa: E402
from fusionvae.files import write_csv  # noqa: E402

MODEL_ORDER = ("fusionvae", "cvae", "fcn")  # table order; other names follow in the order found


def find_metrics(roots: list[Path]) -> list[Path]:
    """metrics.json files under ``roots``, in the order of the roots, sorted within each."""
    found: dict[Path, None] = {}
    for root in roots:
        if root.is_file() and root.name == "metrics.json":
            paths = [root]
        elif root.is_dir():
            paths = sorted(root.rglob("metrics.json"), key=lambda p: [int(x) if x.isdigit() else x for x in p.parts])
        else:
            raise FileNotFoundError(f"no such run directory: {root}")
        found.update((p.resolve(), None) for p in paths)
    return list(found)


def describe_run(run_dir: Path, data: dict) -> dict:
    """Model facts of one evaluation run (written by evaluate.py into metrics.json), plus the
    overrides the evaluation ran with."""
    model = dict(data.get("model") or {})
    if "name" not in model:
        raise ValueError(f"{run_dir / 'metrics.json'} has no model facts: it was not written by evaluate.py")
    overrides = data.get("overrides") or []
    model["eval_overrides"] = [o for o in overrides if not str(o).startswith("ckpt_path=")]
    return model


def label_for(model: dict) -> str:
    """The model's config name plus its switches that differ from the FusionVAE defaults."""
    name = str(model.get("name") or "model")
    parts = [name]
    if str(model.get("skip")) != "none" and not name.endswith("_skip"):
        parts.append(f"skip={model['skip']}")
    if str(model.get("aggregation")) != "max":
        parts.append(f"agg={model['aggregation']}")
    if model.get("res_dist") in (True, "true"):
        parts.append("res_dist")
    return " ".join(parts)


def collect(roots: list[Path]) -> tuple[list[dict], dict[str, list[dict]], dict[str, list[dict]], str | None]:
    """Rows (one per run and K), per-label rows and standard errors for the plot, and the common
    units (or None)."""
    rows, series, errors, units = [], {}, {}, set()
    base = Path.cwd()
    for path in find_metrics(roots):
        data = json.loads(path.read_text())
        per_k, stderr = data.get("per_k") or [], data.get("stderr") or []
        if not per_k:
            continue
        model = describe_run(path.parent, data)
        label = label_for(model)
        while label in series:  # two runs of one configuration: tell them apart by directory
            label = f"{label} [{path.parent.name}]"
        units.add(data.get("units"))
        try:
            run = str(path.parent.relative_to(base))
        except ValueError:
            run = str(path.parent)
        se = {row["K"]: row for row in stderr}
        for row in per_k:
            rows.append(
                {
                    "stderr": se.get(row["K"], {}),
                    "label": label,
                    "model": model.get("name"),
                    "aggregation": model.get("aggregation"),
                    "skip": model.get("skip"),
                    "res_dist": model.get("res_dist"),
                    "stochastic": model.get("stochastic"),
                    "units": data.get("units"),
                    "run": run,
                    "ckpt_path": data.get("ckpt_path"),
                    "train_overrides": " ".join(model.get("train_overrides", [])),
                    "eval_overrides": " ".join(model.get("eval_overrides", [])),
                    **row,
                }
            )
        series[label], errors[label] = per_k, stderr
    rank = {name: i for i, name in enumerate(MODEL_ORDER)}
    first = {label: i for i, label in enumerate(series)}
    names = {row["label"]: str(row["model"]) for row in rows}
    order = {label: (rank.get(names[label].removesuffix("_skip"), len(rank)), first[label]) for label in series}
    rows.sort(key=lambda r: (r["K"], order[r["label"]]))
    series = dict(sorted(series.items(), key=lambda item: order[item[0]]))
    return rows, series, errors, units.pop() if len(units) == 1 else None


def write_comparison(roots: list[Path], out: Path) -> dict[str, Path]:
    rows, series, errors, units = collect(roots)
    if not rows:
        raise SystemExit(f"no metrics.json with per-K metrics under {', '.join(map(str, roots))}")
    metrics = metric_columns(rows)
    headers = {**headers_for(units), "label": "model", "K": "K", "units": "units"}
    md_cols = ["K", "label", *(["units"] if units is None else []), *metrics]
    csv_cols = [
        "label",
        "K",
        "model",
        "aggregation",
        "skip",
        "res_dist",
        "stochastic",
        "units",
        *metrics,
        "run",
        "ckpt_path",
        "train_overrides",
        "eval_overrides",
    ]
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = {"md": out.with_suffix(".md"), "csv": out.with_suffix(".csv"), "png": out.with_suffix(".png")}
    table = markdown_table(rows, md_cols, headers, [row["stderr"] for row in rows])
    paths["md"].write_text(f"# Comparison ({len(series)} runs, mean ± standard error)\n\n" + table)
    write_csv(rows, csv_cols, paths["csv"])
    plot_metrics_vs_k(series, paths["png"], units, errors)
    return paths


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="run / multirun directories (searched recursively)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("comparison"),
        help="output path without suffix: writes <out>.md, <out>.csv, <out>.png (default ./comparison)",
    )
    args = parser.parse_args(argv)
    paths = write_comparison(args.dirs, args.out)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return paths


if __name__ == "__main__":
    main()
