"""Collect evaluation runs into one comparison table (markdown + CSV) and a metric-vs-K plot.

    python scripts/collect_results.py logs/evaluate/multiruns/<date> [more dirs ...] --out comparison

Walks the given directories (Hydra run or multirun dirs) for ``metrics.json`` files written by
``evaluate.py``. Each run is described by the model facts saved in metrics.json (the training
config's ``model`` choice, aggregation, skip, res_dist), else by its ``.hydra/config.yaml`` and
``.hydra/overrides.yaml`` (or those of the training run that wrote ``ckpt_path``). Writes
``<out>.md``, ``<out>.csv`` and ``<out>.png``: one row per run and K.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fusionvae.report import (  # noqa: E402
    MODEL_KEYS, headers_for, infer_model_name, markdown_table, metric_columns, per_k_rows,
    plot_metrics_vs_k, training_run, write_csv,
)

DEFAULTS = {"aggregation": "max", "skip": "none", "res_dist": False}
MODEL_ORDER = ("fusionvae", "cvae", "fcn")  # table order; other names follow in the order found


def _yaml(path: Path):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) if path.is_file() else None


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
    """Model facts of one evaluation run: from metrics.json, else from the Hydra files."""
    model = dict(data.get("model") or {})
    overrides = _yaml(run_dir / ".hydra" / "overrides.yaml") or []
    if not model or "name" not in model:
        cfg = _yaml(run_dir / ".hydra" / "config.yaml") or {}
        node = cfg.get("model") if isinstance(cfg.get("model"), dict) else {}
        train = training_run(data.get("ckpt_path"))
        model = {**{k: node[k] for k in MODEL_KEYS if k in node}, **model}
        hydra = _yaml(run_dir / ".hydra" / "hydra.yaml") or {}
        choice = ((hydra.get("hydra") or {}).get("runtime") or {}).get("choices", {}).get("model")
        model.setdefault("name", train.get("model_config") or choice or infer_model_name(model))
        if train:
            model.setdefault("train_overrides", train["overrides"])
        for item in list(overrides) + list(model.get("train_overrides", [])):  # e.g. model.skip=max
            key, _, value = str(item).lstrip("+~").partition("=")
            if key.startswith("model.") and key[6:] in DEFAULTS and key[6:] not in model:
                model[key[6:]] = value.lower() == "true" if value.lower() in ("true", "false") else value
    for key, value in DEFAULTS.items():
        model.setdefault(key, value)
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


def collect(roots: list[Path]) -> tuple[list[dict], dict[str, list[dict]], str | None]:
    """Rows (one per run and K), per-label rows for the plot, and the common units (or None)."""
    rows, series, units = [], {}, set()
    base = Path.cwd()
    for path in find_metrics(roots):
        data = json.loads(path.read_text())
        per_k = per_k_rows(data)
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
        for row in per_k:
            rows.append({"label": label, "model": model.get("name"), "aggregation": model.get("aggregation"),
                         "skip": model.get("skip"), "res_dist": model.get("res_dist"),
                         "stochastic": model.get("stochastic"), "units": data.get("units"), "run": run,
                         "ckpt_path": data.get("ckpt_path"),
                         "train_overrides": " ".join(model.get("train_overrides", [])),
                         "eval_overrides": " ".join(model.get("eval_overrides", [])), **row})
        series[label] = per_k
    rank = {name: i for i, name in enumerate(MODEL_ORDER)}
    first = {label: i for i, label in enumerate(series)}
    names = {row["label"]: str(row["model"]) for row in rows}
    order = {label: (rank.get(names[label].removesuffix("_skip"), len(rank)), first[label]) for label in series}
    rows.sort(key=lambda r: (r["K"], order[r["label"]]))
    series = dict(sorted(series.items(), key=lambda item: order[item[0]]))
    return rows, series, units.pop() if len(units) == 1 else None


def write_comparison(roots: list[Path], out: Path) -> dict[str, Path]:
    rows, series, units = collect(roots)
    if not rows:
        raise SystemExit(f"no metrics.json with per-K metrics under {', '.join(map(str, roots))}")
    metrics = metric_columns(rows)
    headers = {**headers_for(units), "label": "model", "K": "K", "units": "units"}
    md_cols = ["K", "label", *(["units"] if units is None else []), *metrics]
    csv_cols = ["label", "K", "model", "aggregation", "skip", "res_dist", "stochastic", "units", *metrics,
                "run", "ckpt_path", "train_overrides", "eval_overrides"]
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = {"md": out.with_suffix(".md"), "csv": out.with_suffix(".csv"), "png": out.with_suffix(".png")}
    paths["md"].write_text(f"# Comparison ({len(series)} runs)\n\n" + markdown_table(rows, md_cols, headers))
    write_csv(rows, csv_cols, paths["csv"])
    plot_metrics_vs_k(series, paths["png"], units)
    return paths


def main(argv: list[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path, help="run / multirun directories (searched recursively)")
    parser.add_argument("--out", type=Path, default=Path("comparison"),
                        help="output path without suffix: writes <out>.md, <out>.csv, <out>.png (default ./comparison)")
    args = parser.parse_args(argv)
    paths = write_comparison(args.dirs, args.out)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return paths


if __name__ == "__main__":
    main()
