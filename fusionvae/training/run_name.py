"""Short run names from a job's command-line overrides (the W&B run name, the sweep summary's rows).

- A sweep's job is named by the overrides whose key takes more than one value in the sweep
  (``model=cvae,seed=1``; also an excluded key such as ``ckpt_path``: what varies tells the jobs
  apart; a path by the folders where the sweep's paths differ, ``ckpt_path=…/3/…``). The sweep's
  own overrides are read from ``<sweep dir>/multirun.yaml`` (written by Hydra's basic sweeper
  before its jobs start) and ``hydra.sweeper.params`` (``hparams_search`` configs, Optuna's space).
- A single run is named by its overrides less the excluded keys (``hydra.job.config.override_dirname
  .exclude_keys``: ckpt_path, tags, run_name, logger), settings that do not change what the run
  computes (``HOUSEKEEPING``: callbacks, loader workers, ...), paths and long values.
- Either is cut at whole overrides to about ``LIMIT`` characters: ``a=1,b=2,+3 more``.

Only Hydra and OmegaConf are imported: the sweep summary (a Hydra callback) uses this at Hydra's start.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from omegaconf import OmegaConf

LIMIT = 60  # characters of a name
LONG_VALUE = 24  # a single run's override with a longer value is left out of its name
EXCLUDE = ("ckpt_path", "tags", "run_name", "logger")  # when the Hydra config names none
_PATH_KEYS = ("paths.", "hydra.")
# settings that do not change what a run computes: left out of a single run's name (not of a sweep's)
HOUSEKEEPING = (
    "callbacks",
    "dataset.num_workers",
    "dataset.pin_memory",
    "dataset.persistent_workers",
    "dataset.download",
    "trainer.enable_model_summary",
    "trainer.enable_progress_bar",
    "trainer.num_sanity_val_steps",
)
_PATH_SUFFIXES = ("dir", "path", "file")


def split(arg: str) -> tuple[str, str]:
    """``[+|++|~]key=value`` -> ``(key, value)``."""
    key, _, value = str(arg).partition("=")
    return key.lstrip("+~"), value


def excluded(key: str, exclude: Iterable[str]) -> bool:
    """``key`` is one of ``exclude`` or below one (``logger.wandb.project`` below ``logger``)."""
    return any(key == k or key.startswith((f"{k}.", f"{k}/")) for k in exclude)


def sweep_values(sweep_overrides: Iterable[str]) -> dict[str, list[str]]:
    """The keys of ``sweep_overrides`` that take more than one value, in order, with their values
    when the sweep lists them (``1,2``, ``range(3)``; ``[]`` for ``interval(0, 1)``, ``glob(*)``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser, out = OverridesParser.create(), {}
    for arg in sweep_overrides:
        key, value = split(arg)
        try:
            override = parser.parse_override(arg)
            if not override.is_sweep_override():
                continue
            values = list(override.sweep_string_iterator()) if override.is_discrete_sweep() else []
        except Exception:  # glob() needs Hydra's config loader (options of a group); else a list?
            if not ("," in value or value.startswith("glob(")):
                continue
            values = [] if value.startswith("glob(") else value.split(",")
        if len(values) != 1:
            out.setdefault(key, values)
    return out


def sweep_keys(sweep_overrides: Iterable[str]) -> list[str]:
    """The keys of ``sweep_overrides`` that take more than one value, in order."""
    return list(sweep_values(sweep_overrides))


def short_value(value: str) -> str:
    """A long float as 4 significant digits; any other value over ``LONG_VALUE`` characters cut."""
    try:
        number = float(value)
    except ValueError:
        number = None
    if number is not None and len(value) > 8:
        return f"{number:.4g}"
    return value if len(value) <= LONG_VALUE else value[: LONG_VALUE - 1] + "…"


def distinct_paths(values: Iterable[str | None]) -> dict[str, str]:
    """Paths by the folders where they differ: ``runs/0/last.ckpt``, ``runs/1/last.ckpt`` -> ``…/0/…``,
    ``…/1/…`` (values that are not all paths: unchanged)."""
    values = [v for v in dict.fromkeys(values) if v is not None]
    parts = [v.replace("\\", "/").split("/") for v in values]
    if len(values) < 2 or not all(len(p) > 1 for p in parts):
        return {v: v for v in values}
    head = tail = 0
    while all(len(p) > head + 1 for p in parts) and len({p[head] for p in parts}) == 1:
        head += 1
    while all(len(p) - tail - 1 > head for p in parts) and len({p[-tail - 1] for p in parts}) == 1:
        tail += 1
    ends = ("…/" if head else "", "/…" if tail else "")
    return {v: ends[0] + "/".join(p[head : len(p) - tail]) + ends[1] for v, p in zip(values, parts)}


def pathlike(key: str, value: str) -> bool:
    """An override of a folder or file (``paths.data_dir=...``, ``ckpt_path=...``, any ``a/b`` value)."""
    leaf = key.rsplit(".", 1)[-1]
    return key.startswith(_PATH_KEYS) or leaf.endswith(_PATH_SUFFIXES) or "/" in value or "\\" in value


def single_run_items(overrides: Iterable[str], exclude: Iterable[str] = EXCLUDE) -> list[str]:
    """A single run's overrides for its name: without excluded keys, ``HOUSEKEEPING``, paths and
    long values."""
    items = []
    for arg in overrides:
        key, value = split(arg)
        if not (excluded(key, (*exclude, *HOUSEKEEPING)) or pathlike(key, value) or len(value) > LONG_VALUE):
            items.append(f"{key}={value}")
    return items


def picked_items(overrides: Iterable[str], values: Mapping[str, Iterable[str | None]]) -> list[str]:
    """``key=value`` of ``overrides`` whose key is in ``values`` (key -> all the values it takes: paths
    are shown by the part that differs), long values shortened, in order."""
    shown = {key: distinct_paths(vals) for key, vals in values.items()}
    return [
        f"{key}={short_value(shown[key].get(value, value))}" for key, value in map(split, overrides) if key in shown
    ]


def join_capped(items: list[str], limit: int = LIMIT) -> str:
    """``items`` joined by commas, cut at whole items to at most ~``limit`` characters, ending with
    ``+N more`` when N were left out (an only item longer than ``limit`` is cut itself)."""
    text = ",".join(items)
    if len(text) <= limit:
        return text
    kept: list[str] = []
    for i, item in enumerate(items):
        rest = len(items) - i - 1
        if len(",".join([*kept, item])) + (len(f",+{rest} more") if rest else 0) > limit:
            break
        kept.append(item)
    if not kept:
        return items[0][: limit - 1] + "…"
    left = len(items) - len(kept)
    return ",".join(kept) + (f",+{left} more" if left else "")


def sweep_overrides(hydra_cfg) -> list[str]:
    """The overrides that define the sweep this job belongs to: ``hydra.sweeper.params`` and the
    sweep's command line (``hydra.overrides.task`` of ``<sweep dir>/multirun.yaml``)."""
    params = OmegaConf.select(hydra_cfg, "sweeper.params", default=None)
    params = OmegaConf.to_container(params, resolve=False) if params is not None else {}
    args = [f"{k}={v}" for k, v in (params or {}).items()]
    sweep_dir = OmegaConf.select(hydra_cfg, "sweep.dir", default=None)
    master = Path(str(sweep_dir)) / "multirun.yaml" if sweep_dir else None
    if master is not None and master.is_file():
        task = OmegaConf.select(OmegaConf.load(master), "hydra.overrides.task", default=None)
        args += [str(a) for a in (task or [])]
    return args


def run_name(hydra_cfg) -> str:
    """This job's short name ('' without overrides) from its Hydra config (``HydraConfig.get()``)."""
    from hydra.types import RunMode

    overrides = [str(a) for a in (OmegaConf.select(hydra_cfg, "overrides.task", default=None) or [])]
    exclude = OmegaConf.select(hydra_cfg, "job.config.override_dirname.exclude_keys", default=None)
    exclude = list(EXCLUDE if exclude is None else exclude)
    if OmegaConf.select(hydra_cfg, "mode", default=None) == RunMode.MULTIRUN:
        items = picked_items(overrides, sweep_values(sweep_overrides(hydra_cfg)))
        if items:
            return join_capped(items)
    return join_capped(single_run_items(overrides, exclude))


def varying_items(job_overrides: Mapping[str, list[str]], exclude: Iterable[str] = EXCLUDE) -> dict[str, list[str]]:
    """For the jobs of a finished sweep (job -> its overrides): each job's overrides whose key has
    more than one value across the jobs (missing in some counts as a value); a sweep of one job, or
    of jobs that differ in nothing, gets the single-run items."""
    values: dict[str, set[str | None]] = {}
    parsed = {job: dict(map(split, args)) for job, args in job_overrides.items()}
    for args in parsed.values():
        for key in args:
            values.setdefault(key, set())
    for args in parsed.values():
        for key in values:
            values[key].add(args.get(key))
    varying = {k: v for k, v in values.items() if len(v) > 1}
    if not varying:
        return {job: single_run_items(args, exclude) for job, args in job_overrides.items()}
    return {job: picked_items(args, varying) for job, args in job_overrides.items()}
