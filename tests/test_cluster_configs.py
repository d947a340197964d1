"""The cluster path: the SLURM launcher sized by the trainer, Lightning's SLURM requeue plugin,
the sbatch example (its SBATCH lines agree with its train.py overrides) and the Optuna search."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess

import pytest
from conftest import ROOT, compose_cfg
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fusionvae.errors import BadInputError
from fusionvae.jobs.slurm import size_launcher
from fusionvae.training.checkpoint_io import AtomicCheckpointIO

SBATCH = ROOT / "scripts" / "slurm" / "train.sbatch"


def launcher(overrides: list[str], name: str = "slurm") -> dict:
    """The launcher node as train.py gets it: sized by ``size_launcher``, then composed."""
    argv = size_launcher(["train.py", f"hydra/launcher={name}", *overrides], ROOT / "conf")
    cfg = compose_cfg("train", argv[1:], return_hydra_config=True)
    return OmegaConf.to_container(cfg.hydra.launcher, resolve=True)


@pytest.mark.parametrize("trainer, devices, nodes", [("ddp", 4, 2), ("multi_node", 8, 3), ("slurm", 2, 1)])
def test_launcher_follows_the_trainer(trainer, devices, nodes):
    got = launcher([f"trainer={trainer}", f"trainer.devices={devices}", f"trainer.num_nodes={nodes}"])
    assert (got["tasks_per_node"], got["gpus_per_node"], got["nodes"]) == (devices, devices, nodes)
    assert got["_target_"].endswith("SlurmLauncher")  # the plugin's config, extended


def test_launcher_defaults_and_signal():
    got = launcher(["trainer=gpu"])  # no num_nodes in this trainer: one node
    assert (got["tasks_per_node"], got["gpus_per_node"], got["nodes"]) == (1, 1, 1)
    # SLURM must send the signal Lightning's requeue handler listens to, not submitit's USR2
    assert got["additional_parameters"] == {"signal": f"USR1@{got['signal_delay_s']}", "requeue": True}
    assert got["signal_delay_s"] == 90 and got["max_num_timeout"] == 0 and got["partition"] is None


def test_launcher_refuses_devices_auto_and_swept_sizes():
    with pytest.raises(BadInputError, match="trainer.devices=auto"):
        launcher(["trainer=ddp", "trainer.devices=auto"])
    with pytest.raises(BadInputError, match="trainer.devices=2,4: the jobs of one SLURM sweep share one job size"):
        launcher(["trainer=ddp", "trainer.devices=2,4"])


def test_sizes_come_from_experiment_configs_and_explicit_values_win():
    got = launcher(["experiment=mnist_paper"], name="submitit_slurm")  # the plugin's own config: sized too
    assert (got["tasks_per_node"], got["gpus_per_node"], got["nodes"]) == (2, 2, 1)
    got = launcher(["trainer=multi_node", "hydra.launcher.nodes=3"])
    assert (got["tasks_per_node"], got["nodes"]) == (4, 3)
    assert size_launcher(["train.py", "trainer=ddp"], ROOT / "conf") == ["train.py", "trainer=ddp"]


def test_cfg_hydra_shows_the_job_size():
    """The literal command of the issue: `--cfg hydra` prints the sizes, not interpolations."""
    out = subprocess.run(
        [
            "python",
            "train.py",
            "hydra/launcher=submitit_slurm",
            "trainer=ddp",
            "trainer.devices=4",
            "trainer.num_nodes=2",
            "--cfg",
            "hydra",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    node = OmegaConf.create(out.stdout).hydra.launcher
    assert (node.tasks_per_node, node.gpus_per_node, node.nodes) == (4, 4, 2)


def test_submitit_writes_usr1_and_the_job_size(tmp_path):
    from submitit.slurm.slurm import _make_sbatch_string

    got = launcher(["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"])
    text = _make_sbatch_string(
        command="python -m x",
        folder=tmp_path,
        nodes=got["nodes"],
        ntasks_per_node=got["tasks_per_node"],
        gpus_per_node=got["gpus_per_node"],
        signal_delay_s=got["signal_delay_s"],
        additional_parameters=got["additional_parameters"],
    )
    for line in ("--signal=USR1@90", "--requeue", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4"):
        assert f"#SBATCH {line}\n" in text
    assert "USR2" not in text


def test_slurm_trainer_has_the_requeue_plugin_and_keeps_atomic_writes():
    plugins = [instantiate(p) for p in compose_cfg("train", ["trainer=slurm"]).trainer.plugins]
    slurm = [p for p in plugins if type(p).__name__ == "SLURMEnvironment"]
    assert len(slurm) == 1 and slurm[0].auto_requeue is True and slurm[0].requeue_signal == signal.SIGUSR1
    assert any(isinstance(p, AtomicCheckpointIO) for p in plugins)
    assert not any(
        type(p).__name__ == "SLURMEnvironment"
        for p in compose_cfg("train", ["trainer=ddp"]).trainer.plugins
        for p in [instantiate(p)]
    )


def sbatch_command() -> tuple[dict[str, str], list[str]]:
    """The #SBATCH options and the overrides of the script's one `srun python train.py` line."""
    text = SBATCH.read_text()
    options = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, re.M))
    (line,) = [ln for ln in text.splitlines() if ln.startswith("srun ") and "train.py" in ln]
    words = shlex.split(line)
    return options, [w for w in words[words.index("train.py") + 1 :] if w != "$@"]


def test_sbatch_is_valid_bash_and_asks_for_requeue():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    options, _ = sbatch_command()
    assert options["signal"] == "SIGUSR1@90" and "requeue" in options


def test_sbatch_overrides_compose_and_match_its_job_size(monkeypatch):
    options, overrides = sbatch_command()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    cfg = compose_cfg("train", overrides, return_hydra_config=True)
    assert cfg.trainer.devices == int(options["ntasks-per-node"]) == int(options["gpus-per-node"])
    assert cfg.trainer.num_nodes == int(options["nodes"])
    assert any(p._target_.endswith("SLURMEnvironment") for p in cfg.trainer.plugins)
    # the run folder is the job id's, which a requeued job keeps: it finds its hpc_ckpt there
    assert cfg.hydra.run.dir.endswith("/train/runs/slurm_4242")


def test_optuna_search_minimises_with_a_seeded_tpe():
    cfg = compose_cfg("train", ["hparams_search=optuna"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed == cfg.seed
    assert set(sweeper.params) == {
        "model.optim.lr",
        "model.loss.kl_warmup_portion",
        "model.loss.weight_decay_norm",
        "dataset.batch_size",
    }
    assert sweeper.params["model.optim.lr"].startswith("tag(log, interval(")
    for key in sweeper.params:  # every searched key exists in the training config
        assert OmegaConf.select(cfg, key) is not None, key
