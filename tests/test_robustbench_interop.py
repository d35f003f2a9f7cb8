"""fortify run → RobustBench's per-model layout (weights + model_info JSON) → fortify run."""

from __future__ import annotations

import json

import pytest
import torch

from fortify.config import ExperimentConfig, from_dict, to_dict
from fortify.errors import CheckpointError
from fortify.factory import build_model
from fortify.runs import RunDir, load_model, save_checkpoint


@pytest.fixture
def run(tmp_path):
    cfg = from_dict(
        ExperimentConfig,
        {
            "name": "tiny-fsr",
            "data": {"name": "cifar10"},
            "model": {
                "name": "resnet18",
                "kwargs": {"width": 4},
                "mean": [0.5] * 3,
                "std": [0.25] * 3,
            },
            "defenses": [{"kind": "fsr", "at": ["layer4"]}],
        },
    )
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.defenses, 10, (3, 32, 32))
    for p in model.parameters():  # not the initial values
        p.data.add_(0.01 * torch.randn_like(p))
    rd = RunDir.open(tmp_path / "run", mode="new", config=to_dict(cfg))
    save_checkpoint(
        rd.checkpoint_path("best"),
        model,
        {"config": to_dict(cfg), "num_classes": 10, "image_shape": [3, 32, 32]},
    )
    report = {
        "settings": {"eps": 8 / 255, "n_points": 100},
        "table": {"final": {"Natural": 61.0, "PGD-20": 33.0, "AutoAttack": 29.5}},
    }
    (rd.path / "reports").mkdir()
    (rd.path / "reports" / "eval-full.json").write_text(json.dumps(report))
    return rd.path, model.eval()


def test_export_and_import_round_trip(tmp_path, run, capsys):
    from fortify.cli.main import main
    from fortify.interop.robustbench import load_robustbench_export

    run_path, model = run
    out = tmp_path / "rb"
    assert (
        main(["export", "robustbench", str(run_path), "--out", str(out), "--name", "Me2026Tiny"])
        == 0
    )
    weights = out / "models" / "cifar10" / "Linf" / "Me2026Tiny.pt"
    info = json.loads((out / "model_info" / "cifar10" / "Linf" / "Me2026Tiny.json").read_text())
    assert info["eps"] == "8/255" and info["dataset"] == "cifar10"
    assert (info["clean_acc"], info["autoattack_acc"]) == ("61.00", "29.50")
    assert info["architecture"] == "resnet18 + fsr@layer4"
    # RobustBench reads the weights into a plain module: a state dict of tensors only
    state = torch.load(weights, map_location="cpu", weights_only=True)
    assert "normalize.mean" in state and "fortify_defenses.layer4.separation.0.weight" in state

    x = torch.rand(4, 3, 32, 32)
    back, record = load_robustbench_export(out, name="Me2026Tiny", dataset="cifar10")
    assert record["fortify"]["num_classes"] == 10
    with torch.no_grad():
        assert torch.equal(back(x), model(x))

    args = ["import", "robustbench", str(out), "--name", "Me2026Tiny", "--dataset", "cifar10"]
    assert main([*args, "--out", str(tmp_path / "run2")]) == 0
    again, meta = load_model(tmp_path / "run2")
    assert meta["source"]["kind"] == "robustbench"
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


def test_import_refuses_tampered_or_foreign_files(tmp_path, run):
    from fortify.interop.robustbench import export_robustbench, load_robustbench_export

    run_path, _ = run
    weights, info_path = export_robustbench(run_path, tmp_path / "rb", name="A")
    state = torch.load(weights, weights_only=True)
    state["linear.bias"] += 1
    torch.save(state, weights)
    with pytest.raises(CheckpointError, match="does not match the SHA-256"):
        load_robustbench_export(tmp_path / "rb", name="A", dataset="cifar10")
    info = json.loads(info_path.read_text())
    del info["fortify"]
    info_path.write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="no 'fortify' block.*robustbench:cifar10/Linf"):
        load_robustbench_export(tmp_path / "rb", name="A", dataset="cifar10")
    with pytest.raises(CheckpointError, match="B.pt does not exist"):
        load_robustbench_export(tmp_path / "rb", name="B", dataset="cifar10")
