"""Model sources (torchvision:, timm:, robustbench:, python:) as normal fortify models.

Each source builds, trains one tiny AT step with FSR attached at a named layer, saves, reloads
with identical logits, and a plain weights file of the bare network is evaluated by
``fortify eval --model``. Nothing is downloaded: the RobustBench test writes random weights for
a real RobustBench architecture to the package's expected local path.
"""

from __future__ import annotations

import json
import pickle
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fortify.config import ExperimentConfig, from_dict
from fortify.errors import CheckpointError, ConfigError, DataError
from fortify.factory import build_model
from fortify.models import create, spec
from fortify.runs import load_model

RB_NAME = "Wong2020Fast"  # a RobustBench CIFAR-10 L∞ entry: PreAct ResNet-18, own mu/sigma


def _write_cifar10(folder: Path, n_train: int = 4, n_test: int = 8) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else n_train
        d = {
            b"labels": [int(v) for v in rng.integers(0, 10, n)],
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
    names = [f"class{k}".encode() for k in range(10)]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names}, f, protocol=2)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("cifar")
    _write_cifar10(root / "cifar-10-batches-py")
    return str(root)


USER_CODE = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes, width):
        super().__init__()
        conv = nn.Conv2d(3, width, 3, padding=1)
        self.stem = nn.Sequential(conv, nn.BatchNorm2d(width), nn.ReLU())
        self.block1 = nn.Sequential(nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        out = self.block2(self.block1(self.stem(x)))
        return self.head(out.mean((2, 3)))


def build(num_classes, width=4):
    return Net(num_classes, width)


def sequential(num_classes):
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, num_classes))


def tuple_out(num_classes):
    class T(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, num_classes)

        def forward(self, x):
            return self.fc(x.mean((2, 3))), x
    return T()
"""


@pytest.fixture
def user_module(tmp_path, monkeypatch) -> str:
    name = f"usernets_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_CODE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def rb_dir(tmp_path_factory) -> Path:
    """RobustBench's local model directory with random weights for RB_NAME."""
    from fortify.models.sources import robustbench_entry

    _ds, _tm, _name, entry = robustbench_entry(f"cifar10/Linf/{RB_NAME}")
    torch.manual_seed(3)
    net = entry["model"]()
    d = tmp_path_factory.mktemp("rb") / "models"
    (d / "cifar10" / "Linf").mkdir(parents=True)
    # as RobustBench's files come: a DataParallel state dict inside {"state_dict": ...}
    state = {f"module.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state}, d / "cifar10" / "Linf" / f"{RB_NAME}.pt")
    return d


def _source(which: str, user_module: str, request) -> tuple[str, dict, str]:
    """(model.name, model.kwargs, FSR position) of source ``which``."""
    if which == "robustbench":  # imports robustbench (slow) only for this source
        rb_dir = request.getfixturevalue("rb_dir")
        return f"robustbench:cifar10/Linf/{RB_NAME}", {"model_dir": str(rb_dir)}, "layer4"
    return {
        "torchvision": ("torchvision:resnet18", {}, "layer4"),
        "timm": ("timm:resnet10t", {}, "layer4"),
        "python": (f"python:{user_module}:build", {"width": 4}, "block2"),
    }[which]


@pytest.mark.parametrize("which", ["torchvision", "timm", "robustbench", "python"])
def test_source_trains_with_fsr_saves_reloads_and_evaluates(
    which, tmp_path, cifar_root, user_module, request, capsys
):
    from fortify.cli.main import main
    from fortify.train import fit

    name, kwargs, at = _source(which, user_module, request)
    cfg = from_dict(
        ExperimentConfig,
        {
            "name": f"src-{which}",
            "device": "cpu",
            "data": {"name": "cifar10", "root": cifar_root, "val_size": 4, "augment": "none"},
            "model": {"name": name, "kwargs": kwargs},
            "defenses": [{"kind": "fsr", "at": [at]}],
            "train": {
                "objective": "at", "epochs": 1, "batch_size": 8, "milestones": [],
                "attack": {"steps": 1, "step_size": 2 / 255}, "val_points": 4,
                "val_attack_steps": 1,
            },
        },
    )  # fmt: skip
    model = build_model(cfg.model, cfg.defenses, 10, (3, 32, 32))
    assert f"fortify_defenses.{at}.separation.0.weight" in model.state_dict()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = fit(cfg, tmp_path / "run", model=model, progress=False)
    after = result.model.state_dict()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert any(k.startswith("fortify_defenses.") for k in changed)  # FSR was trained
    assert any(not k.startswith(("fortify_defenses.", "normalize.")) for k in changed)

    reloaded, meta = load_model(tmp_path / "run", tag="last")
    assert meta["config"]["model"]["name"] == name
    x = torch.rand(3, 3, 32, 32)
    result.model.eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x), result.model(x))

    # the bare network (no FSR) saved as a DataParallel-style .pth, evaluated by eval --model
    bare = create(name, 10, 3, **kwargs).eval()
    weights = tmp_path / "w" / "bare.pth"
    weights.parent.mkdir()
    torch.save({"net": {f"module.{k}": v for k, v in bare.state_dict().items()}}, weights)
    args = ["eval", "--model", name, "--weights", str(weights), "--dataset", "cifar10"]
    args += ["--data-root", cifar_root, "--suite", "quick", "--n-points", "8", "--no-checks"]
    for key, value in kwargs.items():
        args += ["--model-arg", f"{key}={value}"]
    assert main(args) in (0, 1), capsys.readouterr().err
    report = json.loads((weights.parent / "reports" / "eval-quick.json").read_text())
    from fortify.data import load_dataset

    xt, yt = load_dataset("cifar10", cifar_root, val_size=0).test.head(8).floats()
    with torch.no_grad():
        clean = (bare(xt).argmax(1) == yt).float().mean().item()
    assert report["settings"]["model_source"] == name
    assert abs(report["table"]["final"]["Natural"] - 100 * clean) < 1e-6


def test_layers_listing_names_attachable_modules(capsys, user_module):
    from fortify.cli.main import main

    args = ["analyze", "--model", f"python:{user_module}:build", "--layers"]
    assert main([*args, "--input-shape", "3", "16", "16", "--num-classes", "5"]) == 0
    out = capsys.readouterr().out
    assert "| `block2` | Sequential | 8×4×4 | yes |" in out
    assert "| `stem.0` | Conv2d | 4×16×16 | yes |" in out
    assert "`head`" not in out  # 2-D output: nothing to attach after
    assert main(["analyze", "--model", "torchvision:resnet18", "--layers"]) == 2
    assert "--input-shape" in capsys.readouterr().err


def test_normalisation_comes_from_the_source_or_the_config(tmp_path, monkeypatch):
    # torchvision weights give ImageNet statistics (the file is put where the hub cache is)
    torch.hub.set_dir(str(tmp_path / "hub"))
    try:
        with pytest.raises(CheckpointError, match=r"resnet18-f37072fd\.pth.*hub.*checkpoints"):
            create("torchvision:resnet18", 1000, 3, weights="IMAGENET1K_V1")
        (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
        torch.manual_seed(0)
        plain = create("torchvision:resnet18", 1000, 3)
        state = {k: v for k, v in plain.state_dict().items() if not k.startswith("normalize.")}
        torch.save(state, tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
        m = create("torchvision:resnet18", 1000, 3, weights="IMAGENET1K_V1").eval()
    finally:
        torch.hub.set_dir(str(Path.home() / ".cache" / "torch" / "hub"))
    assert m.normalize.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    x = torch.rand(2, 3, 32, 32)
    mean, std = m.normalize.mean, m.normalize.std
    with torch.no_grad():
        plain.eval()
        assert torch.allclose(m(x), plain((x - mean) / std), atol=1e-5)
    # timm: a local copy of pretrained weights brings timm's pretrained_cfg statistics; a
    # different class count gets a fresh head, the rest is loaded
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    ref = timm.create_model("resnet10t", num_classes=1000).eval()
    save_file(ref.state_dict(), str(tmp_path / "r10t.safetensors"))
    tm = create(
        "timm:resnet10t",
        1000,
        3,
        pretrained=True,
        pretrained_file=str(tmp_path / "r10t.safetensors"),
    )
    tm.eval()
    with torch.no_grad():
        assert torch.allclose(tm(x), ref((x - tm.normalize.mean) / tm.normalize.std), atol=1e-5)
    assert tm.normalize.std.flatten().tolist() == pytest.approx([0.229, 0.224, 0.225])
    t10 = create(
        "timm:resnet10t", 10, 3, pretrained=True, pretrained_file=str(tmp_path / "r10t.safetensors")
    )
    assert torch.equal(t10.conv1[0].weight, ref.conv1[0].weight) and t10(x).shape == (2, 10)
    cfg_norm = create("timm:resnet10t", 10, 3, mean=[0.5] * 3, std=[0.25] * 3)
    assert cfg_norm.normalize.std.flatten().tolist() == [0.25] * 3
    # rebuilding a checkpoint never needs the pretrained file: normalize.* are in the state
    rebuilt = create("torchvision:resnet18", 1000, 3, weights="IMAGENET1K_V1", load_weights=False)
    assert rebuilt.normalize.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])


def test_plain_containers_tuples_and_weight_prefixes(tmp_path, user_module):
    from fortify.runs.external import load_source_model

    seq = create(f"python:{user_module}:sequential", 3, 3)
    assert type(seq).__name__ == "SourceNet" and "net.0.weight" in seq.state_dict()
    with pytest.raises(DataError, match="T returned a tuple, not logits"):
        build_model(
            from_dict(
                ExperimentConfig, {"model": {"name": f"python:{user_module}:tuple_out"}}
            ).model,
            [],
            3,
            (3, 8, 8),
        )
    # a state dict of the bare Sequential (keys 0.weight ...) fits the wrapped model
    torch.manual_seed(5)
    ref = create(f"python:{user_module}:sequential", 3, 3).eval()
    bare = {k[len("net.") :]: v for k, v in ref.state_dict().items() if k.startswith("net.")}
    from safetensors.torch import save_file

    save_file(bare, str(tmp_path / "seq.safetensors"))
    model, meta = load_source_model(
        f"python:{user_module}:sequential", num_classes=3, image_shape=(3, 8, 8),
        weights=tmp_path / "seq.safetensors",
    )  # fmt: skip
    assert meta["source"]["key_changes"] == ["added 'net.'"]
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


def test_missing_files_extras_and_modules_are_clear_errors(tmp_path, monkeypatch, rb_dir):
    with pytest.raises(CheckpointError, match=rf"{RB_NAME}\.pt is missing.*cifar10/Linf"):
        create(f"robustbench:cifar10/Linf/{RB_NAME}", 10, 3, model_dir=str(tmp_path / "none"))
    with pytest.raises(ConfigError, match="RobustBench has no cifar10/Linf model 'Nobody2099'"):
        create("robustbench:cifar10/Linf/Nobody2099", 10, 3)
    with pytest.raises(ConfigError, match="<dataset>/<threat>/<model>"):
        create("robustbench:Wong2020Fast", 10, 3)
    with pytest.raises(ConfigError, match="has 10 classes but the data has 100"):
        create(f"robustbench:cifar10/Linf/{RB_NAME}", 100, 3, model_dir=str(rb_dir))
    with pytest.raises(ConfigError, match="cannot import module 'no_such_pkg_xyz'.*PYTHONPATH"):
        create("python:no_such_pkg_xyz:build", 10, 3)
    with pytest.raises(ConfigError, match="torchvision has no model 'resnet19'.*resnet18"):
        create("torchvision:resnet19", 10, 3)
    with pytest.raises(ConfigError, match="unknown model source 'keras'.*torchvision:<name>"):
        create("keras:resnet", 10, 3)
    with pytest.raises(CheckpointError, match="pretrained_file.*download: true"):
        create("timm:resnet10t", 10, 3, pretrained=True)
    monkeypatch.setitem(sys.modules, "timm", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match=r"pip install 'fortify\[timm\]'"):
        create("timm:resnet10t", 10, 3)
    with pytest.raises(ConfigError, match="no default FSR position.*defenses"):
        spec_cfg = from_dict(
            ExperimentConfig,
            {"model": {"name": "torchvision:resnet18"}, "defenses": [{"kind": "fsr"}]},
        )
        build_model(spec_cfg.model, spec_cfg.defenses, 10, (3, 32, 32))
    assert spec("torchvision:resnet18").fsr_position is None


def test_rift_finds_the_stages_of_a_source_model():
    from fortify.rift.select import middle_modules

    names = [
        n for n, m in create("torchvision:resnet18", 10, 3).named_modules() if hasattr(m, "weight")
    ]
    keep, rule = middle_modules(names, "torchvision:resnet18")
    assert (
        "layer2, layer3" in rule
        and keep
        and all(k.startswith(("layer2.", "layer3.")) for k in keep)
    )


def test_cli_train_analyze_and_eval_a_run_of_user_code(tmp_path, cifar_root, user_module, capsys):
    from fortify.cli.main import main

    run = tmp_path / "run"
    overrides = [
        f"model.name=python:{user_module}:build", "model.kwargs={width: 4}",
        "defenses=[{kind: fsr, at: [block1]}]", "data.name=cifar10", f"data.root={cifar_root}",
        "data.val_size=4", "train.epochs=1", "train.batch_size=8", "train.milestones=[]",
        "train.attack.steps=1", "train.val_points=4", "train.val_attack_steps=1",
    ]  # fmt: skip
    assert main(["train", "--run-dir", str(run), "--no-progress", *overrides]) == 0
    capsys.readouterr()
    assert main(["analyze", str(run), "--layers"]) == 0
    out = capsys.readouterr().out
    assert "| `block2` | Sequential | 8×8×8 | yes |" in out  # FSR after block1 keeps block2's shape
    assert "fortify_defenses" not in out and (run / "reports" / "layers.md").is_file()
    assert main(["eval", str(run), "--suite", "quick", "--n-points", "8", "--no-checks"]) in (0, 1)
    assert (run / "reports" / "eval-quick.json").is_file()
    sys.modules.pop(user_module, None)
    without = [p for p in sys.path if p != str(tmp_path)]
    saved, sys.path[:] = list(sys.path), without
    try:  # the run cannot be rebuilt without the user's module: a clear error
        assert main(["eval", str(run), "--suite", "quick", "--n-points", "8"]) == 2
        assert f"cannot import module '{user_module}'" in capsys.readouterr().err
    finally:
        sys.path[:] = saved


def test_rift_release_wrn_head_detection():
    from fortify.importers.rift_release import check_head, detect

    for grid, dataset in ((1, "cifar100"), (2, "tiny-imagenet")):
        with torch.device("meta"):
            net = create("wrn-34-10", 200, 3, pool_grid=grid)
        state = {k: v for k, v in net.state_dict().items() if not k.startswith("normalize")}
        arch, kwargs, classes, _ = detect(state)
        assert (arch, kwargs["pool_grid"], classes) == ("wrn-34-10", grid, 200)
        assert net.fc.in_features == 640 * grid * grid
        head = check_head(arch, grid, dataset)
        assert ("avg_pool2d(·, 8)" in head) == (grid == 2)


def test_import_model_writes_a_run_that_rebuilds_the_source(tmp_path, cifar_root, user_module):
    from fortify.cli.main import main

    torch.manual_seed(7)
    ref = create(f"python:{user_module}:build", 10, 3, width=4).eval()
    bare = {k: v for k, v in ref.state_dict().items() if not k.startswith("normalize.")}
    torch.save({"state_dict": {f"module.{k}": v for k, v in bare.items()}}, tmp_path / "w.pth")
    args = ["import", "model", "--model", f"python:{user_module}:build", "--model-arg", "width=4"]
    args += [
        "--weights",
        str(tmp_path / "w.pth"),
        "--dataset",
        "cifar10",
        "--data-root",
        cifar_root,
    ]
    args += ["--mean", "0.5", "0.5", "0.5", "--std", "0.25", "0.25", "0.25"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    model, meta = load_model(tmp_path / "run")
    assert meta["config"]["train"]["attack"]["eps"] == pytest.approx(8 / 255)
    assert meta["source"]["key_changes"] == ["stripped 'module.'"]
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), ref((x - 0.5) / 0.25), atol=1e-6)


def test_the_command_line_parser_does_not_import_torch():
    """--model options live in every parser; building it must stay cheap (no torch import)."""
    import subprocess

    import fortify

    code = (
        "import sys; from fortify.cli.main import build_parser; build_parser(); "
        "print(sorted(m for m in ('torch', 'timm', 'robustbench') if m in sys.modules))"
    )
    src = str(Path(fortify.__file__).parent.parent)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": src}
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
