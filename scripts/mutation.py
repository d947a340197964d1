"""Mutation testing of the core modules with mutmut, one run per module (docs/mutation.md).

    OMP_NUM_THREADS=1 FUSIONVAE_DATA_DIR=/path/to/data python scripts/mutation.py [--modules NAME ...]

mutmut reads one ``[tool.mutmut]`` table, so it cannot give each module its own test files. This
script runs it once per module in ``mutants/<name>/``: a copy of the sources, tests and the files
of ``also_copy``, with a ``pyproject.toml`` whose ``[tool.mutmut]`` table is the project's table
with ``only_mutate`` and ``pytest_add_cli_args_test_selection`` set for that module. mutmut then
runs, for each mutant, only the tests of that list that execute the mutated function.

It prints one table (killed / survived / timeout / no tests / other / equivalent / total, score =
(killed + timeout) / (total - equivalent), where "equivalent" counts the survivors listed under
"Equivalent mutants" in docs/mutation.md) and every live survivor, marking those listed under
"Accepted survivors" there (they count as survived); exit status 1 if a module scores below
``--fail-under``. ``--report-only`` tabulates the last run again (after editing the docs).
Inspect a mutant with ``cd mutants/<name> && python -m mutmut show <mutant>``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "mutants"
EQUIVALENTS_DOC = ROOT / "docs" / "mutation.md"

# name -> (module file, the fast unit tests that exercise it). Keep every file in the
# [tool.mutmut] table of pyproject.toml (only_mutate, and the tests in the test selection).
MODULES: dict[str, tuple[str, list[str]]] = {
    "distributions": (
        "fusionvae/model/distributions.py",
        ["tests/test_distributions.py", "tests/test_sampling_values.py", "tests/test_aggregation.py"],
    ),
    "aggregation": ("fusionvae/model/aggregation.py", ["tests/test_aggregation.py"]),
    "corruption": ("datamodules/corruption.py", ["tests/test_corruption.py"]),
    "lmdb_store": ("datamodules/lmdb_store.py", ["tests/test_lmdb_store.py", "tests/test_safety_paths.py"]),
    "checkpoint_io": (
        "fusionvae/training/checkpoint_io.py",
        ["tests/test_checkpoint_io.py", "tests/test_safety_paths.py"],
    ),
    "lmdb_env": ("datamodules/lmdb_env.py", ["tests/test_lmdb_store.py"]),
    "objective": (
        "fusionvae/model/objective.py",
        [
            "tests/test_objective.py",
            "tests/test_regularizers.py",
            "tests/test_objective_values.py",
            "tests/test_lit_module.py",
        ],
    ),
    "optim": (
        "fusionvae/training/optim.py",
        ["tests/test_optim.py", "tests/test_regularizers.py", "tests/test_objective_values.py"],
    ),
    "flat": ("fusionvae/training/flat.py", ["tests/test_flat.py", "tests/test_objective_values.py"]),
    "lit_module": (
        "fusionvae/training/module.py",
        ["tests/test_lit_module.py", "tests/test_objective_values.py", "tests/test_lit_module_mutants.py"],
    ),
    "step": (
        "fusionvae/training/step.py",
        ["tests/test_step.py", "tests/test_host_copy.py", "tests/test_lit_module_mutants.py"],
    ),
    "evaluation": (
        "fusionvae/evaluation/evaluator.py",
        ["tests/test_eval_values.py", "tests/test_evaluation.py", "tests/test_evaluation_mutants.py"],
    ),
}

DETECTED = ("killed", "timeout")  # a mutant that makes the tests hang is detected, too
COLUMNS = ("killed", "survived", "timeout", "no tests", "other", "equivalent", "total", "score")


def mutmut_table() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text("utf-8"))["tool"]["mutmut"]


def check_scope(table: dict) -> None:
    """The per-module list and the [tool.mutmut] table must name the same modules and tests."""
    files = {f for f, _ in MODULES.values()}
    tests = {t.split("::")[0] for _, ts in MODULES.values() for t in ts}
    if set(table["only_mutate"]) != files:
        sys.exit(f"scripts/mutation.py MODULES {sorted(files)} != [tool.mutmut] only_mutate {table['only_mutate']}")
    missing = tests - {t.split("::")[0] for t in table["pytest_add_cli_args_test_selection"]}
    if missing:
        sys.exit(f"[tool.mutmut] pytest_add_cli_args_test_selection lacks {sorted(missing)}")


def toml_table(name: str, values: dict) -> str:
    # JSON strings and arrays of strings are valid TOML (no control characters in these values)
    return f"[{name}]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())


def project_toml_with(table: dict) -> str:
    """pyproject.toml with its [tool.mutmut] table replaced by ``table``."""
    text = (ROOT / "pyproject.toml").read_text("utf-8")
    start = text.index("\n[tool.mutmut]\n") + 1
    end = re.search(r"^\[", text[start + 1 :], flags=re.M)
    rest = text[start + 1 + end.start() :] if end else ""
    return text[:start] + toml_table("tool.mutmut", table) + ("\n" + rest if rest else "")


def prepare(workdir: Path, table: dict, module: str, tests: list[str]) -> None:
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for rel in [*table["source_paths"], *table.get("also_copy", []), "tests"]:
        src = ROOT / rel
        if src.is_dir():
            shutil.copytree(src, workdir / rel, ignore=ignore)
        elif src.is_file():
            (workdir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, workdir / rel)
    (workdir / "pyproject.toml").write_text(
        project_toml_with({**table, "only_mutate": [module], "pytest_add_cli_args_test_selection": tests}), "utf-8"
    )


def results(workdir: Path, module: str) -> dict[str, str]:
    """mutant name -> mutmut status of one module's run."""
    from mutmut.stats import status_by_exit_code

    meta = json.loads((workdir / "mutants" / f"{module}.meta").read_text("utf-8"))
    return {k: status_by_exit_code[v] for k, v in meta["exit_code_by_key"].items()}


def doc_table(heading: str) -> dict[str, str]:
    """mutant name -> reason, from the rows ``| `name` | reason |`` under ``## <heading>`` in docs/mutation.md."""
    if not EQUIVALENTS_DOC.is_file():
        return {}
    text = EQUIVALENTS_DOC.read_text("utf-8")
    start = text.find(f"\n## {heading}")
    if start < 0:
        return {}
    end = text.find("\n## ", start + 1)
    section = text[start : end if end > 0 else len(text)]
    return dict(re.findall(r"^\|\s*`([^`]+__mutmut_\d+)`\s*\|\s*(.*?)\s*\|\s*$", section, re.M))


def summarise(status: dict[str, str], equivalent: dict[str, str]) -> dict:
    row = dict.fromkeys(COLUMNS[:-1], 0)
    for name, s in status.items():
        if s == "survived" and name in equivalent:
            row["equivalent"] += 1
        elif s in row:
            row[s] += 1
        else:
            row["other"] += 1
    row["total"] = len(status)
    live = row["total"] - row["equivalent"]
    row["score"] = sum(row[s] for s in DETECTED) / live if live else 1.0
    return row


def print_table(rows: dict[str, dict]) -> None:
    print(f"\n{'module':<30}" + "".join(f"{c:>11}" for c in COLUMNS))
    for name, row in rows.items():
        cells = [f"{row[c]:>11}" for c in COLUMNS[:-1]] + [f"{100 * row['score']:>10.1f}%"]
        print(f"{MODULES[name][0]:<30}" + "".join(cells))


def run_module(name: str, workdir: Path, table: dict, env: dict, max_children: int) -> tuple[int, float]:
    """One mutmut run for module ``name`` in ``workdir``; its exit code and wall time."""
    module, tests = MODULES[name]
    prepare(workdir, table, module, tests)
    print(f"{name}: mutating {module}, tests {' '.join(tests)} (log: {workdir / 'mutmut.log'})", flush=True)
    start = time.monotonic()
    with open(workdir / "mutmut.log", "w") as log:
        rc = subprocess.call(
            [sys.executable, "-m", "mutmut", "run", "--max-children", str(max_children)],
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    seconds = time.monotonic() - start
    print(f"{name}: mutmut exited {rc} after {seconds:.0f} s", flush=True)
    if rc != 0:
        print((workdir / "mutmut.log").read_text("utf-8", "replace")[-3000:])
    return rc, seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modules", nargs="+", choices=list(MODULES), default=list(MODULES))
    parser.add_argument("--max-children", type=int, default=2, help="parallel mutant workers (default 2)")
    parser.add_argument("--fail-under", type=float, default=85.0, help="minimum score per module, percent")
    parser.add_argument("--report-only", action="store_true", help="tabulate the last run's results, run nothing")
    args = parser.parse_args()

    table = mutmut_table()
    check_scope(table)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "MKL_NUM_THREADS": "1"}
    equivalent = doc_table("Equivalent mutants")  # excluded from the score
    accepted = doc_table("Accepted survivors")  # not equivalent: counted as survived, listed apart
    rows, survivors, seconds = {}, {}, {}
    for name in args.modules:
        module, tests = MODULES[name]
        workdir = RUNS / name
        if not args.report_only:
            missing = [t for t in tests if not (ROOT / t.split("::")[0]).exists()]
            if missing:
                sys.exit(f"{name}: test files {missing} do not exist")
            rc, seconds[name] = run_module(name, workdir, table, env, args.max_children)
            if rc != 0:
                return rc
        status = results(workdir, module)
        rows[name] = summarise(status, equivalent)
        survivors[name] = sorted(k for k, s in status.items() if s not in DETECTED and k not in equivalent)
        listed = {**equivalent, **accepted}
        stale = sorted(k for k in listed if k in status and status[k] in DETECTED)
        if stale:
            print(f"{name}: listed in docs/mutation.md but now killed (remove them there): {', '.join(stale)}")
        prefix = module[:-3].replace("/", ".") + "."
        unknown = sorted(k for k in listed if k.startswith(prefix) and k not in status)
        if unknown:
            print(f"{name}: listed in docs/mutation.md but not generated (renumbered? recheck): {', '.join(unknown)}")

    print_table(rows)
    if seconds:
        print(
            f"\nwall time: {sum(seconds.values()) / 60:.1f} min ("
            + ", ".join(f"{n} {s:.0f} s" for n, s in seconds.items())
            + ")"
        )
    for name, names in survivors.items():
        status = results(RUNS / name, MODULES[name][0])
        unlisted = [n for n in names if n not in accepted]
        if names:
            print(
                f"\n{name}: {len(names)} live mutants not detected, {len(unlisted)} not listed in docs/mutation.md "
                f"(cd mutants/{name} && python -m mutmut show NAME):"
            )
            for n in names:
                print(f"    {n}  [{status[n]}{', accepted in docs/mutation.md' if n in accepted else ''}]")
    (RUNS / "summary.json").write_text(json.dumps(dict(rows=rows, seconds=seconds, survivors=survivors), indent=1))
    low = [n for n, r in rows.items() if 100 * r["score"] < args.fail_under]
    if low:
        print(f"\nbelow {args.fail_under:g}%: {', '.join(low)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
