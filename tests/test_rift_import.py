"""The rift-release importer: wrapped state dicts → fortify run with in-model normalisation."""

from __future__ import annotations

import pytest
import torch

from fortify.errors import CheckpointError
from fortify.importers.rift_release import import_rift_release, normalise_keys
from fortify.models import create

MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]


@pytest.mark.parametrize("layout", ["1.module.", "module.1."])
def test_import_wrapped_resnet(tmp_path, layout):
    torch.manual_seed(0)
    net = create("resnet18", num_classes=7, in_channels=3, width=4).eval()
    state = {layout + k: v for k, v in net.state_dict().items()}
    pre = layout.replace("1.", "0.") if layout.startswith("module") else "0."
    state[pre + "mean"] = torch.tensor(MEAN).view(1, 3, 1, 1)
    state[pre + "std"] = torch.tensor(STD).view(1, 3, 1, 1)
    src = tmp_path / "ResNet18_CIFAR10.pth"
    torch.save({"state_dict": state}, src)

    target = import_rift_release(src, tmp_path / "run", dataset="cifar10")
    from fortify.runs import load_model

    model, meta = load_model(tmp_path / "run", tag="best")
    assert target.name == "best.safetensors" and meta["num_classes"] == 7
    assert meta["config"]["model"]["name"] == "resnet18"
    x = torch.rand(3, 3, 32, 32)
    expected = net((x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1))
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-5)


def test_normalise_keys_and_errors(tmp_path):
    net, mean, std = normalise_keys(
        {
            "module.0.mean": torch.zeros(3),
            "module.0.std": torch.ones(3),
            "module.1.conv1.weight": torch.zeros(1),
        }
    )
    assert list(net) == ["conv1.weight"] and mean == [0.0] * 3 and std == [1.0] * 3
    bad = tmp_path / "bad.pth"
    torch.save({"foo.weight": torch.zeros(2)}, bad)
    with pytest.raises(CheckpointError, match="conv1.weight"):
        import_rift_release(bad, tmp_path / "out")
    with pytest.raises(CheckpointError, match="does not exist"):
        import_rift_release(tmp_path / "missing.pth", tmp_path / "out")
    torch.manual_seed(0)
    wrn_like = {
        "1.conv1.weight": torch.zeros(16, 3, 3, 3),
        "1.block1.layer.0.conv1.weight": torch.zeros(1),
        "1.fc.weight": torch.zeros(10, 640),
    }
    p = tmp_path / "w.pth"
    torch.save(wrn_like, p)
    with pytest.raises(CheckpointError, match="--arch resnet18 given but"):
        import_rift_release(p, tmp_path / "out2", arch="resnet18")


def test_missing_key_is_named(tmp_path):
    torch.manual_seed(0)
    net = create("resnet18", num_classes=7, in_channels=3, width=4).eval()
    state = {"module." + k: v for k, v in net.state_dict().items()}
    del state["module.layer3.1.conv2.weight"]
    src = tmp_path / "broken.pth"
    torch.save(state, src)
    with pytest.raises(CheckpointError, match=r"missing keys.*layer3\.1\.conv2\.weight"):
        import_rift_release(src, tmp_path / "run")
    assert not (tmp_path / "run").exists()
