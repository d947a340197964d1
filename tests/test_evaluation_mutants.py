"""Direct tests of evaluation.py's settings checks, totals / standard-error maths, checkpoint
selection, grids and run_evaluation's report fields (heavy parts faked); written against its mutants."""

import types

import pytest
import torch
from omegaconf import OmegaConf
from torchvision.io import read_image
from torchvision.utils import save_image

import fusionvae.evaluation.evaluator as ev
import fusionvae.jobs.evaluate as job
from fusionvae.errors import BadInputError, CheckpointError
from fusionvae.evaluation.evaluator import EvalSettings, Evaluator
from fusionvae.training.module import FusionVAEModule
from tests.conftest import save_checkpoint
from tests.test_network import TINY


def tiny(**kw) -> FusionVAEModule:
    torch.manual_seed(0)
    return FusionVAEModule(**{**TINY, **kw})


# ---- settings -------------------------------------------------------------------------------------
def test_settings_messages_and_bounds():
    assert EvalSettings(grid_images=0).grid_images == 0
    with pytest.raises(ValueError, match=r"^eval\.grid_images must be >= 0, got -1$"):
        EvalSettings(grid_images=-1)
    with pytest.raises(ValueError, match=r"^eval\.decode must be one of mean, sample, got 'median'$"):
        EvalSettings(decode="median")
    for bad in (
        dict(sample_temperature=-0.1),
        dict(temperatures=(0.5, -1.0)),
        dict(sample_temperature=-1.0, temperatures=(-1.0,)),
    ):
        with pytest.raises(ValueError, match=r"^temperatures must be >= 0$"):
            EvalSettings(**bad)
    assert EvalSettings(sample_temperature=0.0).sample_temperature == 0.0
    assert EvalSettings(sample_temperature=0.5, temperatures=[0, 1]).temperatures == (0.0, 1.0)
    with pytest.raises(ValueError, match=r"^eval\.num_samples must be >= 1, got 0$"):
        EvalSettings(num_samples=0)


def test_from_cfg_resolves_and_names_unknown_keys():
    with pytest.raises(ValueError, match=r"^unknown eval settings: aa, zz$"):
        EvalSettings.from_cfg({"zz": 1, "aa": 2, "iw_samples": 3})
    cfg = OmegaConf.create({"n": 7, "eval": {"iw_samples": "${n}", "temperatures": [0, "${n}"]}})
    s = EvalSettings.from_cfg(cfg.eval)
    assert s.iw_samples == 7 and s.temperatures == (0.0, 7.0)
    assert EvalSettings.from_cfg(None) == EvalSettings()


# ---- totals and standard errors -------------------------------------------------------------------
def test_totals_empty_shape():
    keys, totals = Evaluator(tiny(), EvalSettings()).totals()
    assert keys == [] and totals.shape == (0, 3)


def test_test_step_moments_exact_count_and_device(monkeypatch):
    e = Evaluator(tiny(k_max=0), EvalSettings())
    n = 2**24 + 1  # not a float32 integer
    values = {"big": torch.ones(n), "meta": torch.ones(3, device="meta")}
    monkeypatch.setattr(ev, "evaluate_batch", lambda module, batch, k, settings, classifier=None: values)
    e.on_test_epoch_start()
    e.test_step(torch.zeros(1, 1, 1, 2, 2), 0)
    big = e._sums[0]["big"]
    assert big.dtype == torch.float64 and big.tolist() == [float(n), float(n), float(n)]
    assert e._sums[0]["meta"].device.type == "meta" and e._sums[0]["meta"].shape == (3,)


def test_test_step_passes_the_loaded_classifier(monkeypatch, tmp_path):
    from fusionvae.evaluation import classifier as digits

    path = digits.save(digits.ImageClassifier(size=32), tmp_path / "digits.pt", 0.75)
    e = Evaluator(tiny(k_max=0), EvalSettings(classifier=str(path)))
    assert isinstance(e.classifier, digits.ImageClassifier) and e.classifier_accuracy == 0.75
    seen = []
    monkeypatch.setattr(
        ev, "evaluate_batch", lambda module, batch, k, settings, classifier=None: seen.append(classifier) or {}
    )
    e.on_test_epoch_start()
    e.test_step(torch.zeros(1, 1, 1, 2, 2), 0)
    assert seen == [e.classifier]
    assert Evaluator(tiny(k_max=0), EvalSettings()).classifier is None
    wrong = digits.save(digits.ImageClassifier(channels=3, size=32), tmp_path / "rgb.pt", 0.5)
    with pytest.raises(BadInputError, match=r"classifies 3x32x32 images, the model makes 1x32x32"):
        Evaluator(tiny(k_max=0), EvalSettings(classifier=str(wrong)))


def test_epoch_end_means_stderr_and_log():
    e = Evaluator(tiny(), EvalSettings())
    f64 = dict(dtype=torch.float64)
    # values [1, 3]: mean 2, sample variance 2, stderr 1; constant 5 x 3: stderr 0
    e._sums = {1: {"a": torch.tensor([2.0, 4.0, 10.0], **f64)}, 0: {"c": torch.tensor([3.0, 15.0, 75.0], **f64)}}
    e._trainer = types.SimpleNamespace(world_size=1)
    logged = []
    e.log_dict = lambda metrics, **kw: logged.append((metrics, kw))
    e.on_test_epoch_end()
    assert e.results == {0: {"c": 5.0}, 1: {"a": 2.0}}
    assert e.stderr[1]["a"] == pytest.approx(1.0, abs=1e-12) and e.stderr[0]["c"] == 0.0
    ((metrics, kw),) = logged
    assert kw == {"sync_dist": False} and set(metrics) == {"eval/c_k0", "eval/a_k1"}
    assert all(v.dtype == torch.float32 for v in metrics.values()) and float(metrics["eval/a_k1"]) == 2.0
    e.stderr, e.results = {}, {}
    e._sums = {0: {"x": torch.tensor([1.0, 4.0, 16.0], **f64)}}  # one item: stderr 0 (no n - 1 = 0 division)
    e.on_test_epoch_end()
    assert e.results[0]["x"] == 4.0 and e.stderr[0]["x"] == 0.0 and e.items == 1


def test_epoch_end_without_items_logs_nothing():
    e = Evaluator(tiny(), EvalSettings())
    e.log_dict = lambda *a, **k: pytest.fail("logged")
    e.on_test_epoch_end()
    assert e.results == {} and e.items == 0


# ---- grids ----------------------------------------------------------------------------------------
class Sliceable:
    """A loader batch whose ``.to`` calls are recorded."""

    def __init__(self, data, calls):
        self.data, self.calls = data, calls

    def __getitem__(self, idx):
        return Sliceable(self.data[idx], self.calls)

    def to(self, *args):
        self.calls.append(args)
        return self.data.to(*args)


def test_write_grids_files_layout_and_device(tmp_path, monkeypatch):
    m = tiny().eval()
    out = tmp_path / "a" / "b"
    assert job.write_grids(m, [torch.rand(4, 4, 1, 32, 32)], EvalSettings(grid_images=0), out, "cpu") == []
    assert not (tmp_path / "a").exists()
    settings = EvalSettings(grid_images=2, temperatures=(0.0, 1.0), grid_samples=2)
    device = torch.device("cpu")
    moves, calls = [], []
    to = m.to
    m.to = lambda d: (moves.append(d), to(d))[1]
    data = (torch.rand(5, 4, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    paths = job.write_grids(m, [Sliceable(data, calls)], settings, out, device)
    assert moves == [device] and calls == [(device, torch.float32)]
    assert paths == [out / f"grid_k{k}.png" for k in range(4)]
    img = read_image(str(paths[0]))
    # 3 input slots, target, mean, 2 samples at t = 1: 7 cells of 64 px (+ 2 px padding), 2 rows, 14 px header
    assert img.shape == (3, 14 + 2 * 66 + 2, 7 * 66 + 2)
    again = job.write_grids(
        tiny(k_max=1).eval(), [torch.rand(3, 2, 1, 32, 32)], EvalSettings(grid_images=1), out, "cpu"
    )
    assert [p.name for p in again] == ["grid_k0.png", "grid_k1.png"]  # the folder exists already: fine


def test_write_grids_bn_readjust_per_temperature(tmp_path, monkeypatch):
    m = tiny(k_max=0).eval()
    seen = []
    monkeypatch.setattr(
        job, "readjust_bn", lambda module, loader, t, n, device: (seen.append((t, n, device)), module)[1]
    )
    loader = [torch.rand(2, 1, 1, 32, 32)]
    job.write_grids(m, loader, EvalSettings(grid_images=1, temperatures=(0.0, 0.5)), tmp_path, "cpu")
    assert seen == []
    job.write_grids(
        m,
        loader,
        EvalSettings(grid_images=1, temperatures=(0.0, 0.5), bn_readjust=True, bn_readjust_batches=3),
        tmp_path,
        "cpu",
    )
    assert seen == [(0.0, 3, "cpu"), (0.5, 3, "cpu")]


# ---- checkpoint selection -------------------------------------------------------------------------
NEEDS = (
    "evaluate.py needs a checkpoint: add ckpt_path=<run dir>/checkpoints/last.ckpt "
    "(or ckpt_path=last for the newest training run)"
)


def test_checkpoint_to_evaluate(tmp_path):
    for value in ("???", None, ""):
        cfg = OmegaConf.create({"ckpt_path": value, "paths": {"log_dir": str(tmp_path)}, "dataset": {}})
        with pytest.raises(BadInputError) as err:
            job.checkpoint_to_evaluate(cfg)
        assert str(err.value) == NEEDS
    ckpt = save_checkpoint(tiny(), tmp_path / "train" / "runs" / "r1" / "checkpoints" / "last.ckpt")
    cfg = OmegaConf.create({"ckpt_path": "last", "paths": {"log_dir": str(tmp_path)}, "dataset": {"k_max": 3}})
    path, model = job.checkpoint_to_evaluate(cfg)
    assert path == ckpt and isinstance(model, FusionVAEModule) and model.hparams.k_max == 3
    cfg.dataset = {"k_max": 2}
    with pytest.raises(CheckpointError, match=f"checkpoint {ckpt} is a model for"):
        job.checkpoint_to_evaluate(cfg)


def test_load_model_maps_to_cpu(tmp_path, monkeypatch):
    ckpt = save_checkpoint(tiny(), tmp_path / "m.ckpt")
    seen = {}
    real = FusionVAEModule.load_from_checkpoint

    def spy(path, **kw):
        seen.update(kw)
        return real(path, **kw)

    monkeypatch.setattr(FusionVAEModule, "load_from_checkpoint", spy)
    assert isinstance(job.load_model(str(ckpt)), FusionVAEModule) and seen == {"map_location": "cpu"}


# ---- run_evaluation with its collaborators faked ---------------------------------------------------
def fake_run(tmp_path, monkeypatch, *, bits=False, hydra=None, global_zero=True, num_test_batches=(5,)):
    model = tiny(bits_per_dim=bits)
    ckpt = tmp_path / "run" / "last.ckpt"
    rec = types.SimpleNamespace(report=[], grids=[], images=[], finished=0, described=[])
    device = object()
    grid = tmp_path / "grid_k0.png"
    save_image(torch.rand(3, 6, 5, generator=torch.Generator().manual_seed(0)), grid)

    def test(evaluator, datamodule, verbose):
        assert verbose is False  # Lightning's wide table is replaced by the compact one in the log
        evaluator.results, evaluator.stderr, evaluator.items = {0: {"nelbo": 1.5}}, {0: {"nelbo": 0.1}}, 12

    trainer = types.SimpleNamespace(
        test=test,
        is_global_zero=global_zero,
        num_test_batches=list(num_test_batches),
        strategy=types.SimpleNamespace(root_device=device),
        loggers=["L"],
    )
    datamodule = types.SimpleNamespace(test_dataloader=lambda: "loader")
    monkeypatch.setattr(job, "check_run", lambda cfg: None)  # a fake config: no trainer to check
    monkeypatch.setattr(job, "checkpoint_to_evaluate", lambda cfg: (ckpt, model))
    monkeypatch.setattr(job, "build", lambda cfg: (datamodule, None, trainer))
    monkeypatch.setattr(job, "describe_model", lambda hp, path: (rec.described.append(path), {"name": "m"})[1])
    monkeypatch.setattr(job, "write_report", lambda *a: rec.report.append(a))
    monkeypatch.setattr(job, "write_grids", lambda *a: (rec.grids.append(a), [grid])[1])
    monkeypatch.setattr(job, "log_images", lambda *a: rec.images.append(a))
    monkeypatch.setattr(job, "finish", lambda t: setattr(rec, "finished", rec.finished + 1))
    times = iter([100.0, 112.349])
    monkeypatch.setattr(job.time, "time", lambda: next(times))
    if hydra is not None:
        monkeypatch.setattr(job.HydraConfig, "initialized", staticmethod(lambda: True))
        monkeypatch.setattr(
            job.HydraConfig,
            "get",
            staticmethod(lambda: types.SimpleNamespace(overrides=types.SimpleNamespace(task=hydra))),
        )
    else:
        monkeypatch.setattr(job.HydraConfig, "initialized", staticmethod(lambda: False))
    cfg = OmegaConf.create(
        {"eval": {"iw_samples": 4, "temperatures": [0, 1]}, "paths": {"output_dir": str(tmp_path / "out")}}
    )
    results = job.run_evaluation(cfg)
    return results, rec, ckpt, device, grid


def test_run_evaluation_report_fields(tmp_path, monkeypatch):
    results, rec, ckpt, device, grid = fake_run(tmp_path, monkeypatch, hydra=("a=1", "b=2"))
    assert results == {0: {"nelbo": 1.5}} and rec.finished == 1
    ((res, err, info, out_dir),) = rec.report
    assert res == results and err == {0: {"nelbo": 0.1}} and out_dir == tmp_path / "out"
    assert info == {
        "ckpt_path": str(ckpt),
        "units": "nats",
        "model": {"name": "m"},
        "eval": {**vars(EvalSettings(iw_samples=4)), "temperatures": [0.0, 1.0]},
        "test_batches": 5,
        "items": 12,
        "classifier_accuracy": None,
        "overrides": ["a=1", "b=2"],
        "seconds": 12.3,
    }
    assert rec.described == [str(ckpt)]
    ((model, loader, settings, images_dir, dev),) = rec.grids
    assert loader == "loader" and images_dir == tmp_path / "out" / "images" and dev is device
    ((loggers, tag, image, step),) = rec.images
    assert loggers == ["L"] and tag == "eval/grid_k0" and step == 0
    assert torch.equal(image, read_image(str(grid)).float() / 255) and image.max() <= 1


def test_run_evaluation_units_batches_overrides(tmp_path, monkeypatch):
    _, rec, *_ = fake_run(tmp_path, monkeypatch, bits=True, num_test_batches=())
    info = rec.report[0][2]
    assert info["units"] == "bits/dim" and info["test_batches"] is None and info["overrides"] == []


def test_run_evaluation_other_ranks_write_nothing(tmp_path, monkeypatch):
    results, rec, *_ = fake_run(tmp_path, monkeypatch, global_zero=False)
    assert results == {0: {"nelbo": 1.5}} and rec.report == [] and rec.grids == [] and rec.finished == 1
