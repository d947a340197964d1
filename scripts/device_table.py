"""One markdown table from the benchmark records of benchmarks/device_check.sh.

    python scripts/device_table.py results.jsonl [--title "H100, torch 2.11"]

Each input line is a JSON record ``{"label", "compile", "status", "seconds", "result"}``, where
``result`` is the last (JSON) line of benchmarks/throughput.py or null when the run failed, timed
out or was skipped. Lines that are not JSON objects are ignored.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

COLUMNS = [
    "run",
    "compile",
    "batch",
    "K",
    "precision",
    "images/s",
    "ms/step",
    "peak MiB",
    "ATen ops/step (kernels)",
    "vs eager",
    "wall s",
    "status",
]


def read_records(lines) -> list[dict]:
    records = []
    for line in lines:
        line = line.strip()
        if line.startswith("{"):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "label" in record:
                records.append(record)
    return records


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def table(records: list[dict], title: str | None = None) -> str:
    """The markdown table; ``vs eager`` is images/s over the eager run of the same label."""
    eager = {r["label"]: r["result"]["images_per_s"] for r in records if not r.get("compile") and r.get("result")}
    lines = [f"**{title}**", ""] if title else []
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for r in records:
        res = r.get("result") or {}
        base = eager.get(r["label"]) if r.get("compile") else None
        speedup = f"{res['images_per_s'] / base:.2f}x" if base and res.get("images_per_s") else "–"
        k = res.get("k", r.get("k"))
        ops = _fmt(res.get("ops_per_step"))
        if res.get("kernel_ops_per_step") is not None:
            ops += f" ({_fmt(res['kernel_ops_per_step'])})"
        cells = [
            r["label"],
            "yes" if r.get("compile") else "no",
            _fmt(res.get("batch")),
            "random" if res and k is None else _fmt(k),
            _fmt(res.get("precision")),
            _fmt(res.get("images_per_s")),
            _fmt(res.get("ms_per_step")),
            _fmt(res.get("peak_mib")),
            ops,
            speedup,
            _fmt(r.get("seconds"), 0),
            r.get("status", "?"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("records", nargs="?", help="JSON-lines file (default: stdin)")
    parser.add_argument("--title")
    args = parser.parse_args()
    lines = Path(args.records).read_text().splitlines() if args.records else sys.stdin.read().splitlines()
    print(table(read_records(lines), args.title))


if __name__ == "__main__":
    main()
