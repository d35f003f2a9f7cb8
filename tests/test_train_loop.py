"""The training loop: resume, bad input, aux losses reaching the optimiser, AT vs clean."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from test_train_objectives import ToyDefence
from torch import nn

from fortify.attacks import pgd
from fortify.config import ExperimentConfig, load_config
from fortify.data import load_dataset
from fortify.defenses import attach
from fortify.errors import CheckpointError, ConfigError, RunDirError
from fortify.models import create
from fortify.runs import RunDir, load_checkpoint, load_model
from fortify.train import (
    LRSchedule,
    NonFiniteLossError,
    Objective,
    fit,
    register_objective,
)
from fortify.train.objectives.at import AdversarialTraining
from fortify.train.state import load_state

BASE = [
    "data.name=digits",
    "data.val_size=300",
    "model.kwargs={width: 4}",
    "device=cpu",
    "train.batch_size=64",
    "train.lr=0.05",
    "train.attack.eps=0.1",
    "train.attack.step_size=0.04",
    "train.attack.steps=2",
    "train.val_points=100",
    "train.val_attack_steps=3",
]


@pytest.fixture(scope="module")
def splits():
    s = load_dataset("digits", val_size=300)
    s.train = s.train.head(512)
    return s


def _cfg(*overrides: str) -> ExperimentConfig:
    return load_config(ExperimentConfig, None, BASE + list(overrides))


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class Crash(RuntimeError):
    pass


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["train.objective=trades", "train.schedule=cosine"],
        ["train.precision=bf16", "train.channels_last=true"],
        ["train.precision=fp16", "train.grad_clip=5.0"],  # GradScaler, unscale before clipping
    ],
    ids=["fp32", "trades-cosine", "bf16-channels-last", "fp16-scaler"],
)
def test_kill_and_resume_gives_bit_identical_weights(tmp_path, splits, extra):
    cfg = _cfg("train.epochs=3", "train.milestones=[1]", "train.warmup_epochs=1", *extra)
    full = fit(cfg, tmp_path / "full", splits=splits, progress=False)

    def crash_after_epoch_2(epoch, record):  # epochs are numbered from 1
        if epoch == 2:
            raise Crash("simulated kill")

    with pytest.raises(Crash):
        fit(cfg, tmp_path / "cut", splits=splits, callbacks=[crash_after_epoch_2])
    assert RunDir(tmp_path / "cut").state == "failed"
    # a kill between writing `last` and appending its metrics line loses the line
    metrics = tmp_path / "cut" / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines[:-1]))
    resumed = fit(cfg, tmp_path / "cut", mode="resume", splits=splits)
    assert resumed.epochs_run == 1
    a, b = _weights(full.model), _weights(resumed.model)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs after resume"
    records = RunDir(tmp_path / "cut").read_metrics()
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert records[1] == json.loads(lines[-1])  # restored from the checkpointed history
    assert resumed.history[-1]["train/loss"] == full.history[-1]["train/loss"]
    assert resumed.history[-1]["val/robust"] == full.history[-1]["val/robust"]
    assert RunDir(tmp_path / "cut").state == "finished"
    # only the final epoch's training state remains next to `last`
    states = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").glob("*.pt"))
    assert states == ["last.state-3.pt"]
    # ... and it equals the uninterrupted run's: optimiser, schedule, GradScaler, RNG
    sa, sb = (load_state(tmp_path / r / "checkpoints" / "last.safetensors", 3) for r in RUNS)
    for key in ("optimizer", "schedule", "scaler", "rng", "best_metric", "best_epoch"):
        assert_same_state(sa[key], sb[key], key)
    if "train.precision=fp16" in extra:  # the scaler ran (and kept counting) across the resume
        assert sb["scaler"]["_growth_tracker"] == 3 * 8 and sb["scaler"]["scale"] == 2.0**16


RUNS = ("full", "cut")


def assert_same_state(a, b, where: str) -> None:
    """Recursive exact equality of two training-state values (tensors bit for bit)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_resume_refuses_changed_config_unless_forced(tmp_path, splits):
    cfg = _cfg("train.epochs=1")
    fit(cfg, tmp_path / "run", splits=splits)
    changed = _cfg("train.epochs=2", "train.lr=0.02")
    with pytest.raises(ConfigError, match=r"train\.epochs: 1 -> 2.*train\.lr: 0\.05 -> 0\.02"):
        fit(changed, tmp_path / "run", mode="resume", splits=splits)
    result = fit(changed, tmp_path / "run", mode="resume", splits=splits, force=True)
    assert result.epochs_run == 1
    assert RunDir(tmp_path / "run").read_config()["train"]["epochs"] == 2


def test_new_mode_refuses_existing_run_and_resume_needs_a_run(tmp_path, splits):
    cfg = _cfg("train.epochs=1")
    fit(cfg, tmp_path / "run", splits=splits)
    with pytest.raises(RunDirError, match="--resume"):
        fit(cfg, tmp_path / "run", splits=splits)
    with pytest.raises(RunDirError, match="nothing to resume"):
        fit(cfg, tmp_path / "none", mode="resume", splits=splits)


@register_objective("test-nan-at-epoch-1")
class _NanLater(Objective):
    adversarial = False

    def compute(self, model, b, ctx):
        loss = nn.functional.cross_entropy(model(b.x), b.y)
        if ctx.epoch >= 1:
            loss = loss * float("nan")
        return loss, {"loss": loss.detach()}


def test_nan_loss_stops_with_clear_error_and_keeps_last_good_checkpoint(tmp_path, splits):
    cfg = _cfg("train.epochs=3", "train.objective=test-nan-at-epoch-1")
    with pytest.raises(NonFiniteLossError, match="epoch 2.*last good checkpoint is kept"):
        fit(cfg, tmp_path / "run", splits=splits)
    last = tmp_path / "run" / "checkpoints" / "last.safetensors"
    model = create("small-cnn", 10, 1, width=4)
    meta = load_checkpoint(last, model)
    assert meta["epoch"] == 1
    assert all(
        torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point()
    )
    assert RunDir(tmp_path / "run").state == "failed"


def test_disk_full_while_checkpointing_keeps_previous_last(tmp_path, splits, monkeypatch):
    import fortify.runs.checkpoint as ck

    cfg = _cfg("train.epochs=3")
    real = ck.st_save_file
    calls = {"n": 0}

    def flaky(tensors, path, metadata=None):
        calls["n"] += 1
        if calls["n"] == 3:  # epoch 1 wrote last + best; the next write fails
            with open(path, "wb") as fh:
                fh.write(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(ck, "st_save_file", flaky)
    with pytest.raises(RunDirError, match="No space left.*previous 'last' checkpoint is intact"):
        fit(cfg, tmp_path / "run", splits=splits)
    monkeypatch.setattr(ck, "st_save_file", real)
    model, meta = load_model(tmp_path / "run", tag="last")
    assert meta["epoch"] == 1
    leftovers = [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if "tmp" in p.name]
    assert leftovers == []
    result = fit(cfg, tmp_path / "run", mode="resume", splits=splits)
    assert result.epochs_run == 2


def test_unwritable_run_dir_is_reported(tmp_path, splits):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RunDirError, match="not a directory|cannot create"):
        fit(_cfg("train.epochs=1"), blocker / "run", splits=splits)


def test_missing_training_state_is_a_checkpoint_error(tmp_path, splits):
    cfg = _cfg("train.epochs=2")
    fit(cfg, tmp_path / "run", splits=splits)
    for p in (tmp_path / "run" / "checkpoints").glob("*.pt"):
        p.unlink()
    cfg3 = _cfg("train.epochs=2")
    with pytest.raises(CheckpointError, match="training state .* missing"):
        fit(cfg3, tmp_path / "run", mode="resume", splits=splits)


@pytest.mark.parametrize(
    "override, field",
    [
        ("train.attack.eps=2.0", "train.attack.eps"),
        ("train.attack.step_size=0.9", "train.attack.step_size"),
        ("train.attack.kind=fgsm", "train.attack.kind"),
        ("train.warmup_epochs=5", "train.warmup_epochs"),
        ("train.milestones=[9, 3]", "train.milestones"),
        ("train.precision=fp8", "train.precision"),
    ],
)
def test_nonsense_config_is_rejected_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        _cfg("train.epochs=2", override)


def test_unknown_trainable_prefix_names_close_matches(tmp_path, splits):
    with pytest.raises(ConfigError, match="linaer.*close matches: linear"):
        fit(_cfg("train.epochs=1", "train.trainable=[linaer]"), tmp_path / "r", splits=splits)


def test_trainable_prefixes_and_freeze_bn(tmp_path, splits):
    cfg = _cfg("train.epochs=1", "train.trainable=[features.1.3]", "train.freeze_bn=true")
    torch.manual_seed(cfg.seed)
    model = create("small-cnn", 10, 1, width=4)
    before = _weights(model)
    result = fit(cfg, tmp_path / "run", splits=splits, model=model)
    after = _weights(result.model)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"features.1.3.weight"}  # the conv only: BN stats and affine frozen


def test_aux_loss_of_attached_defence_reaches_the_optimiser(tmp_path, splits):
    cfg = _cfg("train.epochs=2")
    torch.manual_seed(0)
    model = attach(create("small-cnn", 10, 1, width=4), ToyDefence, "features.0", (1, 8, 8))
    result = fit(cfg, tmp_path / "run", splits=splits, model=model)
    scale = result.model.fortify_defenses["features__0"].scale
    assert not torch.equal(scale.detach(), torch.ones_like(scale))
    assert all("train/toy_aux" in r for r in result.history)
    assert result.history[-1]["train/toy_aux"] > 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert "train/toy_aux" in json.loads(lines[-1])


def test_bf16_channels_last_and_fp16_train(tmp_path, splits):
    for name, extra in [("bf16", "train.channels_last=true"), ("fp16", "train.grad_clip=5.0")]:
        cfg = _cfg("train.epochs=1", f"train.precision={name}", extra)
        result = fit(cfg, tmp_path / name, splits=splits)
        assert 0.0 <= result.history[-1]["val/clean"] <= 1.0
        assert torch.isfinite(torch.tensor(result.history[-1]["train/loss"]))
        load_model(tmp_path / name, tag="best")


def _scalars(run_dir) -> dict[str, list[tuple[int, float]]]:
    """``tag -> [(step, value), ...]`` from all TensorBoard event files of a run."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_tensorboard_logs_each_epoch_and_resume_continues_the_steps(tmp_path, splits, monkeypatch):
    from tensorboard.compat.tensorflow_stub.io import gfile

    real_init = gfile.GFile.__init__

    def without_append(self, filename, mode):  # as on object stores (S3): data lands on flush
        real_init(self, filename, mode)
        self.fs_supports_append = False

    monkeypatch.setattr(gfile.GFile, "__init__", without_append)
    cfg = _cfg("train.epochs=3", "train.tensorboard=true")
    seen = {}

    def check_then_crash(epoch, record):
        seen[epoch] = _scalars(tmp_path / "run")  # flushed per epoch: readable while running
        if epoch == 2:
            raise Crash("simulated kill")

    with pytest.raises(Crash):
        fit(cfg, tmp_path / "run", splits=splits, callbacks=[check_then_crash])
    assert [s for s, _ in seen[1]["train/loss"]] == [1]
    assert [s for s, _ in seen[2]["val/clean"]] == [1, 2], seen[2]
    result = fit(cfg, tmp_path / "run", mode="resume", splits=splits)
    scalars = _scalars(tmp_path / "run")
    assert len(list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))) == 2
    for tag in ("train/loss", "val/clean", "val/robust", "lr", "train/acc_adv"):
        steps = [s for s, _ in scalars[tag]]
        assert steps == [1, 2, 3], f"{tag}: steps {steps}"  # continued, not restarted at 1
        values = [r[tag] for r in result.history]
        assert [v for _, v in scalars[tag]] == pytest.approx(values, rel=1e-6), tag
    assert "epoch" not in scalars


def test_tensorboard_without_the_package_warns_and_trains(tmp_path, splits, monkeypatch, caplog):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    cfg = _cfg("train.epochs=1", "train.tensorboard=true")
    with caplog.at_level("WARNING", logger="fortify.train"):
        result = fit(cfg, tmp_path / "run", splits=splits)
    assert result.epochs_run == 1
    assert "tensorboard is not installed; pip install 'fortify[tensorboard]'" in caplog.text
    assert not (tmp_path / "run" / "tensorboard").exists()


def test_checkpoint_meta_rebuilds_model_and_best_is_selected_on_validation(tmp_path, splits):
    cfg = _cfg("train.epochs=2", "train.select=clean")
    result = fit(cfg, tmp_path / "run", splits=splits)
    model, meta = load_model(tmp_path / "run", tag="best")
    for key in ("config", "num_classes", "image_shape", "epoch", "metrics", "seed"):
        assert key in meta
    cleans = [r["val/clean"] for r in result.history]
    assert meta["epoch"] == 1 + max(range(2), key=lambda e: (cleans[e], -e))
    assert meta["metrics"]["val/clean"] == max(cleans)


def test_schedules():
    from fortify.config import TrainConfig, from_dict

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    fsr = LRSchedule(opt, from_dict(TrainConfig, {"epochs": 100}), steps_per_epoch=10)
    assert [round(fsr.factor(e), 6) for e in (0, 74, 75, 89, 90, 99)] == [
        1,
        1,
        0.1,
        0.1,
        0.01,
        0.01,
    ]
    rift = from_dict(TrainConfig, {"epochs": 110, "milestones": [100, 105]})
    assert LRSchedule(opt, rift, 10).factor(104) == pytest.approx(0.1)
    warm = LRSchedule(opt, from_dict(TrainConfig, {"epochs": 10, "warmup_epochs": 2}), 10)
    assert warm.factor(0, 0) == pytest.approx(1 / 20) and warm.factor(1, 9) == pytest.approx(1.0)
    cos = LRSchedule(opt, from_dict(TrainConfig, {"epochs": 10, "schedule": "cosine"}), 4)
    assert cos.factor(0, 0) == 1.0 and cos.factor(5, 0) == pytest.approx(0.5)
    assert cos.factor(9, 3) < 0.01
    plat = LRSchedule(
        opt, from_dict(TrainConfig, {"schedule": "plateau", "plateau_patience": 1}), 1
    )
    for metric in (0.5, 0.4, 0.4, 0.3):
        plat.end_epoch(metric)
    assert plat.factor(4) == pytest.approx(0.1)
    again = LRSchedule(opt, plat.cfg, 1)
    again.load_state_dict(plat.state_dict())
    assert again.factor(4) == pytest.approx(0.1) and again.plateau_bad == plat.plateau_bad
    assert plat.apply(4) == pytest.approx(0.01) and opt.param_groups[0]["lr"] == pytest.approx(0.01)


def _robust_accuracy(model: nn.Module, splits, eps: float) -> float:
    x, y = splits.test.floats()
    model.eval()
    x_adv = pgd(model, x, y, eps=eps, steps=10, step_size=eps / 4, random_start=False)
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).float().mean().item()


def test_adversarial_training_raises_robust_accuracy_over_clean_training(tmp_path):
    splits = load_dataset("digits", val_size=300)
    common = ["train.epochs=8", "train.milestones=[6]", "train.lr=0.1", "model.kwargs={width: 8}"]
    common += ["train.attack.steps=3", "train.val_points=0", "train.select=last"]
    std = fit(_cfg(*common, "train.objective=standard"), tmp_path / "std", splits=splits)
    at = fit(_cfg(*common, "train.objective=at"), tmp_path / "at", splits=splits)
    rob_std = _robust_accuracy(std.model, splits, 0.1)
    rob_at = _robust_accuracy(at.model, splits, 0.1)
    assert rob_at > rob_std + 0.3, (rob_std, rob_at)


def test_objective_may_own_the_whole_step(tmp_path, splits):
    """A custom train_step: two updates per batch on different parameter subsets."""

    @register_objective("test-two-updates")
    class TwoUpdates(AdversarialTraining):
        def train_step(self, model, x, y, ctx):
            head = [ctx.module.linear.weight, ctx.module.linear.bias]
            with ctx.autocast():
                loss, metrics = self.loss(model, x, y, ctx)
            ctx.step(loss, params=head)
            with ctx.autocast():
                loss2 = nn.functional.cross_entropy(model(x), y)
            ctx.step(loss2)
            metrics["loss2"] = loss2.detach()
            return metrics

    result = fit(_cfg("train.epochs=1", "train.objective=test-two-updates"), tmp_path / "r",
                 splits=splits)  # fmt: skip
    assert "train/loss2" in result.history[0]
