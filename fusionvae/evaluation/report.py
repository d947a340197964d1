"""Evaluation reports: metrics.json / metrics.csv / metrics.md and a metric-vs-K plot per run, and
the helpers ``scripts/collect_results.py`` uses for the comparison table across runs."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fusionvae.evaluation.metrics import IMAGE_METRICS
from fusionvae.files import write_csv, write_text
from fusionvae.model.network_config import NetworkConfig

# column key -> header; NELBO / IW-NLL are in the run's units (nats or bits/dim)
METRICS = {
    "nelbo": "NELBO",
    "iw_nll": "IW-NLL",
    **{
        f"{name}_{kind}": f"{metric.header} {kind}"
        for name, metric in IMAGE_METRICS.items()
        for kind in ("best", "mean")
    },
    "class_best": "Class best",  # eval.classifier: share of items with a sample of the target's class
    "class_mean": "Class mean",
    "diversity": "Diversity",
    "kl": "KL",  # the fusion diagnostic: KL(q || p) summed over groups, in the NELBO's units
    "prior_sigma": "Prior sigma",  # the prior's mean sigma over all latent dimensions
}
MODEL_KEYS = (
    "aggregation",
    "aggregation_level",
    "skip",
    "res_dist",
    "stochastic",
    "num_latent_scales",
    "num_groups_per_scale",
    "num_channels",
    "num_latent_per_group",
    "likelihood",
)


def infer_model_name(hparams: Mapping) -> str:
    """fcn (deterministic), cvae (one latent group) or fusionvae, from checkpoint hyperparameters."""
    net = NetworkConfig.from_hparams(hparams)
    if not net.stochastic:
        return "fcn"
    if net.num_latent_scales == 1 and net.num_groups_per_scale == 1:
        return "cvae"
    return "fusionvae"


def _load_yaml(path: Path):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=False) if path.is_file() else None


def training_run(ckpt_path: str | Path | None) -> dict:
    """The Hydra facts of the run that wrote ``<run>/checkpoints/<name>.ckpt``: its dir, model
    config choice and overrides (empty when the checkpoint lives elsewhere)."""
    if not ckpt_path:
        return {}
    run = Path(ckpt_path).resolve().parent.parent
    hydra = _load_yaml(run / ".hydra" / "hydra.yaml")
    overrides = _load_yaml(run / ".hydra" / "overrides.yaml")
    if hydra is None and overrides is None:
        return {}
    choices = ((hydra or {}).get("hydra") or {}).get("runtime", {}).get("choices", {})
    return {"run_dir": str(run), "model_config": choices.get("model"), "overrides": list(overrides or [])}


def describe_model(hparams: Mapping, ckpt_path: str | Path | None = None) -> dict:
    """Model facts for reports: name (the training config's ``model`` choice, else inferred),
    ablation switches and sizes, and the training run's overrides when found."""
    info = {key: hparams[key] for key in MODEL_KEYS if key in hparams}
    train = training_run(ckpt_path)
    info["name"] = train.get("model_config") or infer_model_name(hparams)
    if train:
        info["train_run"] = train["run_dir"]
        info["train_overrides"] = train["overrides"]
    return info


def per_k_rows(results: Mapping[int, Mapping[str, float]]) -> list[dict]:
    """``{K: {metric: value}}`` -> one row per K: ``{"K": K, <metric>: value, ...}``, K ascending."""
    return [{"K": int(k), **{name: float(v) for name, v in results[k].items()}} for k in sorted(results)]


def metric_columns(rows: Iterable[Mapping]) -> list[str]:
    """Metric keys present in ``rows``: the known ones in ``METRICS`` order, then any others."""
    present = {
        key
        for row in rows
        for key, value in row.items()
        if isinstance(value, float) and key != "K" and key not in MODEL_KEYS
    }
    known = [m for m in METRICS if m in present]
    return known + sorted(present - set(known))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    return "" if value is None else str(value)


def markdown_table(
    rows: list[Mapping],
    columns: list[str],
    headers: Mapping[str, str] | None = None,
    errors: list[Mapping] | None = None,
) -> str:
    """A markdown table; with ``errors`` (rows of standard errors, same order) cells read ``mean ± se``."""
    headers = headers or {}
    lines = [
        "| " + " | ".join(headers.get(c, c) for c in columns) + " |",
        "|" + "|".join("---:" if c in METRICS else "---" for c in columns) + "|",
    ]
    for i, row in enumerate(rows):
        err = errors[i] if errors else {}
        cells = [_fmt(row.get(c)) + (f" ± {_fmt(err[c])}" if c in METRICS and c in err else "") for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


SUMMARY = ("nelbo", "iw_nll", "kl", "prior_sigma", "psnr_best", "ssim_best", "class_best", "diversity")


def summary_table(results: Mapping[int, Mapping[str, float]], units: str | None) -> str:
    """A compact per-K text table of the headline metrics (the full one is metrics.md)."""
    rows = per_k_rows(results)
    columns = [c for c in SUMMARY if rows and c in rows[0]]
    headers = {**headers_for(units), "K": "K"}
    widths = [max(len(headers[c]), 9) for c in columns]
    lines = ["K  " + "  ".join(f"{headers[c]:>{w}}" for c, w in zip(columns, widths))]
    lines += [f"{row['K']:<3}" + "  ".join(f"{_fmt(row[c]):>{w}}" for c, w in zip(columns, widths)) for row in rows]
    return "\n".join(lines)


def write_per_item(per_item: Mapping[int, Mapping[str, Any]], path: Path) -> Path:
    """``per_item.csv``: one row per (item, K) with every metric (``pandas.read_csv(path)``;
    ``read_per_item`` without pandas). ``item`` is the index in the test set, the same for every K
    and every model evaluated on that set, so differences can be paired on it."""
    rows = [
        {"item": i, "K": int(k), **{name: float(v[i]) for name, v in metrics.items()}}
        for k, metrics in sorted(per_item.items())
        for i in range(len(next(iter(metrics.values()), [])))
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_csv(rows, ["item", "K", *metric_columns(rows)], path)
    return path


def read_per_item(path: Path) -> dict[int, dict[str, list[float]]]:
    """``per_item.csv`` back as ``{K: {metric: [value per item, in item order]}}``."""
    out: dict[int, dict[str, list[float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            k, item = int(row.pop("K")), int(row.pop("item"))
            for name, value in row.items():
                values = out.setdefault(k, {}).setdefault(name, [])
                if len(values) != item:
                    raise ValueError(f"{path}: item {item} of K={k} is out of order (expected {len(values)})")
                values.append(float(value))
    return out


def headers_for(units: str | None) -> dict[str, str]:
    suffix = f" ({units})" if units else ""
    return {**METRICS, "nelbo": "NELBO" + suffix, "iw_nll": "IW-NLL" + suffix}


def write_report(
    results: Mapping[int, Mapping[str, float]],
    stderr: Mapping[int, Mapping[str, float]],
    info: Mapping,
    out_dir: Path | str,
) -> dict[str, Path]:
    """metrics.json (``info``, ``per_k`` rows, their ``stderr`` and the means over K),
    metrics.csv and metrics.md (one row per K) and metrics_vs_k.png in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, errors = per_k_rows(results), per_k_rows(stderr)
    columns = ["K", *metric_columns(rows)]
    units = info.get("units")
    over_k = {
        name: sum(row[name] for row in rows) / len(rows)
        for name in ("nelbo", "iw_nll")
        if rows and all(name in row for row in rows)
    }
    paths = {name: out_dir / f"metrics.{name}" for name in ("json", "csv", "md")}
    write_text(paths["json"], json.dumps({**info, "per_k": rows, "stderr": errors, "mean_over_k": over_k}, indent=2))
    write_csv(rows, columns, paths["csv"])
    model = info.get("model") or {}
    write_text(
        paths["md"],
        f"# Evaluation: {model.get('name', 'model')}\n\n"
        + _facts(info)
        + "\n"
        + markdown_table(rows, columns, {**headers_for(units), "K": "K"}, errors),
    )
    from fusionvae.evaluation.report_plot import plot_metrics_vs_k  # matplotlib only when plotting

    paths["png"] = plot_metrics_vs_k(
        {model.get("name", "model"): rows},
        out_dir / "metrics_vs_k.png",
        units,
        {model.get("name", "model"): errors},
        info.get("items"),
    )
    return paths


def _facts(info: Mapping) -> str:
    model, eval_cfg = info.get("model") or {}, info.get("eval") or {}
    facts = [f"checkpoint: `{info.get('ckpt_path')}`"] if info.get("ckpt_path") else []
    if info.get("items"):
        facts.append(f"{info['items']} test items")
    if model:
        facts.append(
            ", ".join(
                f"{k}={model[k]}"
                for k in ("aggregation", "aggregation_level", "skip", "res_dist", "stochastic")
                if k in model
            )
        )
    if eval_cfg:
        facts.append(
            f"S={eval_cfg.get('iw_samples')} importance samples, N={eval_cfg.get('num_samples')} samples "
            f"at t={eval_cfg.get('sample_temperature')} ({eval_cfg.get('decode')} images)"
        )
    return "".join(f"- {fact}\n" for fact in facts)
