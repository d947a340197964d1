"""SLURM job sizes from the trainer: ``hydra/launcher=submitit_slurm`` (or the project's ``slurm``)
gets ``nodes = trainer.num_nodes`` and ``tasks_per_node = gpus_per_node = trainer.devices`` (one
task per GPU, as Lightning's SLURM DDP wants), whatever sets them (trainer or experiment config,
command line). The sizes are added to the command line as literal ``hydra.launcher.*`` overrides
before Hydra starts, so ``--cfg hydra`` shows them and every job of a sweep gets the same job size;
an explicit ``hydra.launcher.<key>=`` wins."""

from __future__ import annotations

from pathlib import Path

from fusionvae.errors import BadInputError
from fusionvae.jobs.run_args import compose_train, select_overrides

LAUNCHERS = ("submitit_slurm", "slurm")
# config groups and keys that can change trainer.devices / trainer.num_nodes
_SIZING = ("trainer", "experiment", "debug")


def _key(arg: str) -> str:
    return arg.lstrip("+~").split("=", 1)[0]


def _sizing_overrides(args: list[str]) -> list[str]:
    """The overrides that can change the trainer's size; a swept one (``a,b``) is refused."""
    picked = select_overrides(args, _SIZING)
    swept = [a for a in picked if "=" in a and ("," in a.split("=", 1)[1] or "(" in a.split("=", 1)[1])]
    if swept:
        raise BadInputError(
            f"{swept[0]}: the jobs of one SLURM sweep share one job size; sweep trainer sizes in separate commands"
        )
    return picked


def trainer_size(args: list[str], config_dir: Path) -> tuple[int, int]:
    """``(trainer.num_nodes, trainer.devices)`` of the train config composed with ``args``."""
    cfg = compose_train(_sizing_overrides(args), config_dir)
    nodes, devices = cfg.trainer.get("num_nodes", 1), cfg.trainer.get("devices", 1)
    if not isinstance(devices, int) or not isinstance(nodes, int):
        raise BadInputError(
            f"hydra/launcher=submitit_slurm needs numbers: trainer.devices={devices}, "
            f"trainer.num_nodes={nodes}; set e.g. trainer.devices=4 trainer.num_nodes=2"
        )
    return nodes, devices


def size_launcher(argv: list[str], config_dir: Path) -> list[str]:
    """``argv`` plus ``hydra.launcher.{nodes,tasks_per_node,gpus_per_node}`` from the trainer when a
    SLURM launcher is selected; unchanged otherwise."""
    args = list(argv[1:])
    if not any(a.startswith("hydra/launcher=") and a.split("=", 1)[1] in LAUNCHERS for a in args):
        return list(argv)
    nodes, devices = trainer_size(args, config_dir)
    given = {_key(a) for a in args}
    sizes = {"nodes": nodes, "tasks_per_node": devices, "gpus_per_node": devices}
    # first: positional overrides cannot follow options such as --cfg
    return [
        argv[0],
        *(f"hydra.launcher.{k}={v}" for k, v in sizes.items() if f"hydra.launcher.{k}" not in given),
        *args,
    ]
