"""The table that ends a sweep: one row per job, written to ``<sweep dir>/summary.md`` and
``summary.csv`` and printed.

A row holds the job's overrides that vary across the sweep (``fusionvae.training.run_name``), its best
``val/nelbo`` and the last ``val/nelbo_k<K>``, read from the job folder's ``result.json`` (written
by ``fusionvae.training.run_log.write_result`` at the end of training), else from its CSV log
(``csv/version_*/metrics.csv``), else the job's status: the ``error:`` line of its train.log.
An evaluation sweep's rows hold the evaluated NELBO per K (``metrics.json``).

``SweepSummary`` is the Hydra callback (``conf/hydra/default.yaml``, ``hydra.callbacks``); it
imports neither torch nor Lightning, so Hydra starts (and ``--help`` answers) as fast as before.
It writes the table at the end of the sweep, and also when the sweep stops early (a failed job
ends the process: then at exit, with the jobs run so far).
"""

from __future__ import annotations

import atexit
import csv
import json
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from fusionvae.files import write_csv, write_text
from fusionvae.training.run_name import varying_items

BEST = "best val/nelbo"


class SweepSummary(Callback):
    def __init__(self) -> None:
        self._sweep_dir: Path | None = None  # set while a sweep runs

    def on_multirun_start(self, config, **kwargs) -> None:
        if self._sweep_dir is None:
            atexit.register(self._at_exit)
        self._sweep_dir = Path(str(config.hydra.sweep.dir))

    def on_multirun_end(self, config, **kwargs) -> None:
        self._sweep_dir = None
        print(write_summary(Path(str(config.hydra.sweep.dir))), flush=True)

    def _at_exit(self) -> None:
        if self._sweep_dir is not None and self._sweep_dir.is_dir():
            sweep_dir, self._sweep_dir = self._sweep_dir, None
            print("the sweep stopped early:\n" + write_summary(sweep_dir), flush=True)


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The sweep's job folders (those with ``.hydra/overrides.yaml``), in job order."""
    jobs = [p for p in sweep_dir.iterdir() if (p / ".hydra" / "overrides.yaml").is_file()]
    return sorted(jobs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def job_metrics(job: Path) -> tuple[dict[str, float], str]:
    """``({column: value}, status)`` of one job folder."""
    if (job / "result.json").is_file():
        result = json.loads((job / "result.json").read_text())
        best = result.get("best") or {}
        last = result.get("last") or {}
        metrics = {k: v for k, v in last.items() if k.startswith("val/nelbo_k") and v is not None}
        if best.get("monitor") == "val/nelbo" and best.get("score") is not None:
            metrics[BEST] = best["score"]
        return metrics, "done"
    if (job / "metrics.json").is_file():  # an evaluate.py job
        rows = json.loads((job / "metrics.json").read_text()).get("per_k") or []
        return {f"nelbo_k{row['K']}": row["nelbo"] for row in rows if "nelbo" in row}, "done"
    metrics = csv_metrics(job)
    return metrics, error_line(job) or ("stopped (no result.json)" if metrics else "no result")


def csv_metrics(job: Path) -> dict[str, float]:
    """From the newest CSV log: the lowest ``val/nelbo`` and the last ``val/nelbo_k<K>``."""
    logs = sorted(job.glob("csv/version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    out: dict[str, float] = {}
    if not logs:
        return out
    with open(logs[-1], newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if not value or not key or not key.startswith("val/nelbo"):
                    continue
                if key == "val/nelbo":
                    out[BEST] = min(float(value), out.get(BEST, float("inf")))
                else:
                    out[key] = float(value)
    return out


def error_line(job: Path) -> str | None:
    """The last ``error:`` / ``preempted:`` / ``interrupted:`` line of the job's log file."""
    found = None
    for log in job.glob("*.log"):
        for line in log.read_text(errors="replace").splitlines():
            text = line.split("] - ", 1)[-1].strip()  # Hydra's "[time][name][LEVEL] - message"
            if text.startswith(("error:", "preempted:", "interrupted:")):
                found = text
    return found


def _per_k(column: str) -> tuple[int, str]:
    name, _, k = column.rpartition("_k")
    return (int(k), name) if k.isdigit() else (-1, column)


def summary_rows(sweep_dir: Path) -> tuple[list[dict], list[str]]:
    """One row per job (``job``, ``overrides``, metrics, ``status``) and the metric columns."""
    jobs = job_dirs(sweep_dir)
    overrides = {job: [str(a) for a in OmegaConf.load(job / ".hydra" / "overrides.yaml")] for job in jobs}
    labels = varying_items(overrides)
    rows = []
    for job in jobs:
        metrics, status = job_metrics(job)
        rows.append({"job": job.name, "overrides": ",".join(labels[job]), **metrics, "status": status})
    present = {k for row in rows for k in row} - {"job", "overrides", "status"}
    columns = ([BEST] if BEST in present else []) + sorted(present - {BEST}, key=_per_k)
    return rows, columns


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
    return "" if value is None else str(value).replace("|", "\\|")


def write_summary(sweep_dir: Path) -> str:
    """``summary.md`` and ``summary.csv`` in ``sweep_dir``; returns the markdown."""
    rows, columns = summary_rows(sweep_dir)
    header = ["job", "overrides", *columns, "status"]
    lines = [
        f"# Sweep {sweep_dir.name}: {len(rows)} jobs",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---:" if c in columns else "---" for c in header) + "|",
        *("| " + " | ".join(_cell(row.get(c)) for c in header) + " |" for row in rows),
    ]
    scored = [row for row in rows if isinstance(row.get(BEST), float)]
    if scored:
        best = min(scored, key=lambda row: row[BEST])
        lines += ["", f"lowest {BEST}: job {best['job']} ({best['overrides'] or 'no overrides'}) {best[BEST]:.4f}"]
    text = "\n".join(lines) + "\n"
    write_text(sweep_dir / "summary.md", text)
    write_csv(rows, header, sweep_dir / "summary.csv")
    return text
