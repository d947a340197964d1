"""Direct tests of FusionVAEModule's wiring (hparams, skip policy, logging, checkpoint hooks,
optimiser) with small fakes in place of a Trainer; written against the mutants of lit_module.py."""

import types
from dataclasses import asdict

import pytest
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.trainer.states import TrainerFn

from datamodules.training_order import mix
from fusionvae.errors import TooManySkippedSteps
from fusionvae.model.network_config import NetworkConfig
from fusionvae.model.objective import kl_warmup, training_loss
from fusionvae.training.flat import is_flat
from fusionvae.training.host_waits import HostWaits
from fusionvae.training.module import FusionVAEModule
from tests.test_network import TINY


def module(**kw) -> FusionVAEModule:
    torch.manual_seed(0)
    return FusionVAEModule(**{**TINY, **kw})


class Recorder:
    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))


class FakeScaler:
    def __init__(self, scale):
        self.scale, self.events = scale, []

    def get_scale(self):
        return self.scale

    def unscale_(self, opt):
        self.events.append(("unscale", opt))

    def update(self):
        self.events.append("update")


def attach(m, *, max_epochs=2, total=100, rank=0, step=0, scaler=None, ckpt_cb=None, loggers=(), world_size=1):
    """A SimpleNamespace trainer (fitting, every step a logging step)."""
    m._trainer = types.SimpleNamespace(
        max_epochs=max_epochs,
        estimated_stepping_batches=total,
        global_rank=rank,
        global_step=step,
        world_size=world_size,
        precision_plugin=types.SimpleNamespace(scaler=scaler) if scaler else types.SimpleNamespace(),
        checkpoint_callback=ckpt_cb,
        loggers=list(loggers),
        state=types.SimpleNamespace(fn=TrainerFn.FITTING),
        _logger_connector=types.SimpleNamespace(should_update_logs=True),
    )
    m.log, m.log_dict = Recorder(), Recorder()
    m.manual_backward = lambda loss: loss.backward()


def with_optimizer(m):
    """The module's optimiser, wrapped as Lightning's LightningOptimizer is (``.optimizer``, ``.step``)."""
    opt = m.configure_optimizers()
    wrapped = types.SimpleNamespace(optimizer=opt, step=opt.step)
    m.optimizers = lambda: wrapped
    return opt


def batch(b=3, views=4, nan=False):
    x = torch.rand(b, views, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    if nan:
        x[:, -1] = float("nan")
    return x


# ---- construction ---------------------------------------------------------------------------------
def test_init_checks_and_hparams():
    with pytest.raises(ValueError, match=r"^model\.crop must be >= 0, got -1$"):
        module(crop=-1)
    with pytest.raises(ValueError, match=r"^model\.k_max must be >= 0 \(number of input views\), got -2$"):
        module(k_max=-2)
    assert module(k_max=0).hparams.k_max == 0
    m = FusionVAEModule(**TINY)
    assert dict(m.hparams) == dict(
        optim=None,
        loss=None,
        k_max=3,
        crop=0,
        bits_per_dim=False,
        seed=0,
        compile=False,
        compile_mode="default",
        # every network setting, defaults included: a checkpoint without aggregation_level is a legacy one
        **asdict(NetworkConfig(**TINY)),
    )
    assert dict(m.hparams)["aggregation_level"] == "features" and NetworkConfig.from_hparams(m.hparams) == m.net.config
    m = module(optim={"lr": 0.5}, loss={"power_iter_init": 7, "power_iter": 3})
    assert m.hparams.optim == {"lr": 0.5} and m.hparams.loss == {"power_iter_init": 7, "power_iter": 3}
    assert (m.spectral.init_steps, m.spectral.steps) == (7, 3)
    assert m.optim_settings.lr == 0.5


def test_init_buffers_and_state():
    m = module()
    sd = m.state_dict()
    assert "kl_alpha" not in sd and "kl_alpha" in dict(m.named_buffers())  # not persistent
    for name in ("skipped_steps", "train_batches"):
        assert sd[name].dtype == torch.long and sd[name].shape == () and int(sd[name]) == 0
    engine = m.step_engine
    assert engine.consecutive_skips == 0 and engine.flat is None and engine.module is m
    assert engine.max_consecutive_skips == 50 and "step_engine" not in "".join(sd)  # no state-dict keys of its own
    assert m.automatic_optimization is False and engine.clip is None


def test_draw_k_exact_seed():
    m = module(seed=5, k_max=7)
    for batches in (0, 7, 123):
        m.train_batches.fill_(batches)
        g = torch.Generator().manual_seed(5 * 1_000_003 + batches)
        assert m.draw_k() == int(torch.randint(0, 8, (1,), generator=g))
    seq = []
    for batches in range(40):
        m.train_batches.fill_(batches)
        seq.append(m.draw_k())
    ref = [
        int(torch.randint(0, 8, (1,), generator=torch.Generator().manual_seed(5 * 1_000_003 + b))) for b in range(40)
    ]
    assert seq == ref


def test_regulariser_is_fp32_spectral_plus_bn_penalty():
    m = module().eval()  # eval: the power iteration does not move u / v
    with torch.no_grad():
        expected = m.spectral() + m.bn_penalty()
        assert m.bn_penalty() > 0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = m.regulariser()
    assert got.dtype == torch.float32 and torch.equal(got, expected)


# ---- training step --------------------------------------------------------------------------------
def test_training_step_logs_exact_values_and_options():
    m = module(seed=5, loss={"kl_min_beta": 0.25})
    attach(m, rank=1, total=100)
    with_optimizer(m)
    m.step_engine.consecutive_skips = 3
    seen = {}
    terms_fn, reg_fn = m.terms, m.regulariser

    def terms(b, k):
        seen["seed"], seen["k"] = torch.initial_seed(), k
        seen["terms"] = terms_fn(b, k)
        return seen["terms"]

    def regulariser():
        seen["reg"] = reg_fn()
        return seen["reg"]

    m.terms, m.regulariser = terms, regulariser
    k = m.draw_k()
    m.training_step(batch(), 0)
    assert seen["seed"] == mix(5, 0, 1) and seen["k"] == k
    assert int(m.train_batches) == 1 and m.step_engine.consecutive_skips == 0 and int(m.skipped_steps) == 0
    (logged,), kw = m.log_dict.calls[0]
    assert kw == dict(prog_bar=False, on_step=True, on_epoch=False, batch_size=3)
    assert set(logged) == {
        "train/loss",
        "train/nelbo",
        "train/kl",
        "train/recon",
        "train/reg",
        "train/beta",
        "train/lr",
        "train/grad_norm",
        "train/k",
        "train/skipped_steps",
    }
    t = seen["terms"]
    beta = kl_warmup(0, 100, m.loss_settings.kl_warmup_portion, 0.25)
    assert beta == 0.25 and logged["train/beta"] == 0.25
    assert logged["train/k"] == float(k) and float(logged["train/skipped_steps"]) == 0.0
    assert float(logged["train/lr"]) == pytest.approx(m.optim_settings.lr / m.optimizers().optimizer.schedule[0])
    torch.testing.assert_close(
        logged["train/loss"], training_loss(t, m.kl_alpha, beta, m.loss_settings, seen["reg"]).detach()
    )
    torch.testing.assert_close(logged["train/kl"], t.kl.sum(1).mean().detach())
    torch.testing.assert_close(logged["train/recon"], t.nll.mean().detach())
    torch.testing.assert_close(logged["train/reg"], seen["reg"].detach())
    nelbo = m.units(t.nelbo, t.target).mean().detach()
    torch.testing.assert_close(logged["train/nelbo"], nelbo)
    assert torch.isfinite(logged["train/grad_norm"]) and logged["train/grad_norm"] > 0
    assert m.log.calls == []  # no progress-bar value: Lightning would read it after every batch


def test_seed_depends_on_seed_and_batch_count():
    m = module(seed=9)
    attach(m)
    with_optimizer(m)
    seeds = []
    fn = m.terms
    m.terms = lambda b, k: (seeds.append(torch.initial_seed()), fn(b, k))[1]
    m.training_step(batch(), 0)
    m.training_step(batch(), 1)
    assert seeds == [mix(9, 0, 0), mix(9, 1, 0)] and int(m.train_batches) == 2


def test_skipped_steps_restore_buffers_and_count():
    m = module(loss={"max_consecutive_skips": 5})
    attach(m)
    opt = with_optimizer(m)
    m.training_step(batch(), 0)
    before = {n: b.clone() for n, b in m.named_buffers() if n not in ("skipped_steps", "train_batches")}
    params = m.step_engine.flat.detach().clone()
    for i in (1, 2):
        m.training_step(batch(nan=True), i)
        assert int(m.skipped_steps) == i and m.step_engine.consecutive_skips == i
        logged = m.log_dict.calls[-1][0][0]
        assert torch.isnan(logged["train/grad_norm"]) and float(logged["train/skipped_steps"]) == i
    for n, b in m.named_buffers():
        if n in before:
            assert torch.equal(b, before[n]), n
    assert torch.equal(m.step_engine.flat, params) and int(opt.steps_done()) == 1
    assert int(m.train_batches) == 3
    m.training_step(batch(), 3)
    assert m.step_engine.consecutive_skips == 0 and int(m.skipped_steps) == 2 and int(opt.steps_done()) == 2


def skip(m, n: int) -> None:
    """``n`` skipped steps (a NaN loss) through the engine."""
    for _ in range(n):
        m.step_engine.begin()
        m.spectral.start_step()  # no forward pass here: the regulariser normalises the weights itself
        m.step_engine.finish(m.regulariser() * float("nan"), m.optimizers(), m._step_context())


def test_too_many_skips_message():
    m = module(loss={"max_consecutive_skips": 2})
    attach(m, step=17, ckpt_cb=types.SimpleNamespace(dirpath="/runs/x/checkpoints"))
    with_optimizer(m)
    skip(m, 2)
    m._check_skips()  # 2 is not over the limit
    assert m.step_engine.consecutive_skips == 2 and int(m.skipped_steps) == 2
    msg = (
        "3 consecutive training steps had a non-finite loss or gradients (limit model.loss.max_consecutive_skips=2), "
        "found at step 17; the checkpoints in /runs/x/checkpoints are from before them: lower model.optim.lr or "
        "check the data, then resume"
    )
    skip(m, 1)
    with pytest.raises(TooManySkippedSteps) as err:
        m._check_skips()
    assert str(err.value) == msg
    for cb in (None, types.SimpleNamespace(dirpath=None)):
        m._trainer.checkpoint_callback = cb
        skip(m, 1)
        with pytest.raises(TooManySkippedSteps) as err:
            m._check_skips()
        assert "the checkpoints in the checkpoints folder are from before them" in str(err.value)
    unlimited = module(loss={"max_consecutive_skips": None})
    attach(unlimited)
    with_optimizer(unlimited)
    unlimited.step_engine.consecutive_skips = 10_000
    skip(unlimited, 1)
    unlimited._check_skips()
    assert unlimited.step_engine.consecutive_skips == 10_001


def test_the_skip_limit_is_checked_at_logging_steps_and_before_a_checkpoint_only():
    m = module(loss={"max_consecutive_skips": 0})
    attach(m)
    with_optimizer(m)
    m._trainer._logger_connector.should_update_logs = False
    m.training_step(batch(nan=True), 0)  # not a logging step: no host read, no stop yet
    with pytest.raises(TooManySkippedSteps, match="^1 consecutive"):
        m.on_save_checkpoint({})
    m.training_step(batch(nan=True), 1)
    m._trainer._logger_connector.should_update_logs = True
    with pytest.raises(TooManySkippedSteps, match="^2 consecutive"):
        m.training_step(batch(), 2)  # a good step, but the run of two skips before it is found
    m._trainer.state.fn = TrainerFn.VALIDATING  # evaluate.py's checkpoint hooks: no check
    skip(m, 1)
    m.on_save_checkpoint({})


def test_a_skipped_step_puts_back_the_buffers_the_forward_pass_changed():
    m = module()
    attach(m)
    with_optimizer(m)
    buf = m.spectral.u0
    saved = buf.clone()
    m.step_engine.begin()
    buf.add_(1.0)
    m.step_engine.finish(m.regulariser() * float("nan"), m.optimizers(), m._step_context())
    assert torch.equal(buf, saved)


def test_save_state_excludes_counters_and_refreshes_on_new_storage():
    m = module()
    s1 = m.step_engine.begin()
    assert not any(is_flat(f, [m.skipped_steps]) or is_flat(f, [m.train_batches]) for f in s1)
    assert any(is_flat(f, [m.spectral.u0]) for f in s1)
    s2 = m.step_engine.begin()
    assert len(s1) == len(s2) and all(a is b for a, b in zip(s1, s2))  # still flat: reused
    m.spectral.u0 = m.spectral.u0.clone()  # new storage (as after a device move)
    s3 = m.step_engine.begin()
    assert any(is_flat(f, [m.spectral.u0]) for f in s3) and not any(a is b for a, b in zip(s1, s3))


def test_all_ranks_reduces_on_the_device_with_min(monkeypatch):
    m = module()
    attach(m)
    ok = torch.tensor(True)
    assert m._all_ranks(ok) is ok  # one process: nothing to ask
    calls = []

    def all_reduce(flag, op):  # another rank says False
        calls.append((flag.dtype, op))
        flag.fill_(0)

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    attach(m, world_size=2)
    got = m._all_ranks(torch.tensor(True))
    assert got.dtype == torch.bool and not bool(got) and calls == [(torch.int32, torch.distributed.ReduceOp.MIN)]


def test_finish_reports_the_unscaled_norm_and_clips_the_scaled_gradients():
    m = module()
    scaler = FakeScaler(4.0)
    attach(m, scaler=scaler)
    opt = with_optimizer(m)
    steps = []
    m.optimizers().step = lambda ok: steps.append(bool(ok))  # Lightning unscales in opt.step()
    m.step_engine.clip = 1e-3  # in true units: the scaled gradients end at norm 1e-3 * scale
    m.step_engine.begin()
    norm = m.step_engine.finish(m.regulariser(), m.optimizers(), m._step_context())
    assert scaler.events == [] and steps == [True] and norm > 1e-2 and int(opt.steps_done()) == 0
    torch.testing.assert_close(torch.linalg.vector_norm(m.step_engine.flat.grad), torch.tensor(4e-3), rtol=1e-4, atol=0)


def test_clip_epsilon_is_added():
    m = module()
    attach(m)
    with_optimizer(m)
    m.step_engine.flat.grad.zero_()
    m.step_engine.flat.grad[0] = 1e-5
    m.step_engine.clip = 0.5e-5
    m.step_engine.clip_gradients(torch.tensor(1e-5))
    torch.testing.assert_close(m.step_engine.flat.grad[0], torch.tensor(0.5e-5 / 1.1e-5 * 1e-5), rtol=1e-6, atol=0)


def test_clip_scales_gradients_to_the_limit():
    m = module()
    attach(m)
    with_optimizer(m)
    engine = m.step_engine
    engine.gradients.release()
    m.regulariser().backward()
    grads = engine.gradients.gather().clone()
    norm = torch.linalg.vector_norm(grads)
    engine.clip_gradients(norm)  # gradient_clip_val None: unchanged
    assert torch.equal(grads, engine.flat.grad)
    engine.clip = float(norm) * 10
    engine.clip_gradients(norm)  # below the limit: unchanged
    assert torch.equal(grads, engine.flat.grad)
    engine.clip = float(norm) / 4
    engine.clip_gradients(norm)
    torch.testing.assert_close(torch.linalg.vector_norm(engine.flat.grad), norm / 4, rtol=1e-5, atol=0)


def test_configure_model_compiles_only_when_asked(monkeypatch):
    import fusionvae.training.module as lm

    seen = []
    monkeypatch.setattr(lm, "compile_network", lambda *a: seen.append(a))
    m = module()
    m.configure_model()
    assert seen == []
    m = module(compile=True, compile_mode="max-autotune", k_max=2)
    m._trainer = types.SimpleNamespace(strategy=types.SimpleNamespace(root_device=torch.device("cpu")))
    m.configure_model()
    assert seen == [(m.net, "max-autotune", "cpu", 2)]


# ---- optimiser ------------------------------------------------------------------------------------
@pytest.mark.parametrize("max_epochs, warmup", [(4, 25), (1, 100), (None, 100), (-1, 100), (0, 100)])
def test_configure_optimizers_flat_and_schedule(max_epochs, warmup):
    m = module(optim={"lr": 0.1, "warmup_epochs": 1})
    attach(m, max_epochs=max_epochs, total=100)
    count = len(list(m.parameters()))
    opt = m.configure_optimizers()
    assert opt.param_groups[0]["params"] == [m.step_engine.flat] and len(list(m.parameters())) == count
    assert m.step_engine.flat.numel() == sum(p.numel() for p in m.parameters())
    assert opt.schedule == (warmup, 100, 0.1, m.optim_settings.lr_min)


# ---- validation / test ----------------------------------------------------------------------------
@pytest.mark.parametrize("step, prefix", [("validation_step", "val"), ("test_step", "test")])
def test_eval_step_logs_per_k_and_mean(step, prefix):
    m = module(k_max=2).eval()
    attach(m)
    torch.manual_seed(0)
    with torch.no_grad():
        getattr(m, step)(batch(b=2), 0)
    per_k, calls = m.log_dict.calls, m.log.calls  # per K: NELBO and the fusion diagnostic; then the mean
    assert [sorted(c[0][0]) for c in per_k] == [
        sorted([f"{prefix}/nelbo_k{k}", f"{prefix}/kl_k{k}", f"{prefix}/prior_sigma_k{k}"]) for k in range(3)
    ]
    assert [c[0][0] for c in calls] == [f"{prefix}/nelbo"]
    for _, kw in per_k:
        assert kw == dict(sync_dist=True, batch_size=2)
    assert calls[-1][1] == dict(sync_dist=True, prog_bar=True, batch_size=2)
    nelbos = [c[0][0][f"{prefix}/nelbo_k{k}"] for k, c in enumerate(per_k)]
    torch.testing.assert_close(calls[-1][0][1], torch.stack(nelbos).mean())
    torch.manual_seed(0)
    with torch.no_grad():
        t = m.terms(batch(b=2), 0, prior_sigma=True)
    torch.testing.assert_close(nelbos[0], m.units(t.nelbo, t.target).mean())
    torch.testing.assert_close(per_k[0][0][0][f"{prefix}/kl_k0"], m.units(t.kl.sum(1), t.target).mean())
    torch.testing.assert_close(per_k[0][0][0][f"{prefix}/prior_sigma_k0"], t.prior_sigma.mean())


# ---- checkpoint hooks -----------------------------------------------------------------------------
class FakeWandb(WandbLogger):
    def __init__(self, version):
        self._fake_version = version

    @property
    def version(self):
        return self._fake_version


def test_on_save_checkpoint():
    m = module()
    m.step_engine.consecutive_skips = 4
    ckpt = {}
    m.on_save_checkpoint(ckpt)
    assert ckpt == {"fusionvae": {"consecutive_skips": 4, "wandb_id": None}}
    for loggers, wid in (
        ([types.SimpleNamespace(version=7), FakeWandb("abc1"), FakeWandb("zz")], "abc1"),
        ([FakeWandb(None)], None),
        ([FakeWandb("")], None),
        ([types.SimpleNamespace(version=3)], None),
    ):
        attach(m, loggers=loggers)
        ckpt = {}
        m.on_save_checkpoint(ckpt)
        assert ckpt["fusionvae"] == {"consecutive_skips": 4, "wandb_id": wid}
        assert type(ckpt["fusionvae"]["consecutive_skips"]) is int


def test_on_load_checkpoint_restores_skips_and_restarts_old_spectral():
    m = module()
    m.on_load_checkpoint({"fusionvae": {"consecutive_skips": 6}, "state_dict": {}})
    assert m.step_engine.consecutive_skips == 6 and type(m.step_engine.consecutive_skips) is int
    m.on_load_checkpoint({})
    assert m.step_engine.consecutive_skips == 0
    m.step_engine.consecutive_skips = 5
    m.on_load_checkpoint({"fusionvae": {}})
    assert m.step_engine.consecutive_skips == 0
    new = {"net.cells.0.w": torch.ones(1), "spectral.initialised": torch.tensor(True)}
    m.on_load_checkpoint({"state_dict": new})
    assert list(new) == ["net.cells.0.w", "spectral.initialised"] and bool(new["spectral.initialised"])
    m.spectral.initialised.fill_(True)
    old = {
        "net.dec_cells.0.w": torch.ones(1),
        "spectral.initialised": torch.tensor(True),
        "spectral.u0": torch.zeros(1),
    }
    m.on_load_checkpoint({"state_dict": old})
    own = m.spectral.state_dict()
    assert set(old) == {"net.dec_cells.0.w"} | {f"spectral.{k}" for k in own}
    assert old["spectral.initialised"].dtype == torch.bool and not bool(old["spectral.initialised"])
    for key, value in own.items():
        if key != "initialised":
            assert torch.equal(old[f"spectral.{key}"], value), key


def test_a_training_step_reads_nothing_from_the_device():
    """The ops that make the host wait for the device (``HostWaits``: values read into Python, outputs
    sized by their values) in one training step with K drawn, as benchmarks/throughput.py finds them:
    each stalls a GPU and makes a CUDA-graph capture impossible. The code at 133af3e made 59 here
    (the BN penalty, the batch counter, the power-iteration flag, the skip decision, K and Adamax's
    step count each read one). Only the steps right after the power iteration's first read the flag
    again (model.host_copy)."""
    m = module()
    attach(m)
    with_optimizer(m)
    m._trainer._logger_connector.should_update_logs = False  # logging steps read the skip count
    m.training_step(batch(), 0)  # the first steps: the flag that the power iteration set is read again
    m.training_step(batch(), 1)
    with HostWaits() as waits:
        m.training_step(batch(), 2)
        m.training_step(batch(nan=True), 3)  # a skipped step too
    assert waits.ops == []
    assert int(m.skipped_steps) == 1 and m.step_engine.consecutive_skips == 1
