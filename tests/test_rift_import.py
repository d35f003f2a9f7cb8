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
        "1.block3.layer.0.conv2.weight": torch.zeros(640, 1, 1, 1),
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


# --- the release's own layout, stated independently of fortify's models ----------------------
# RiFT's models/resnet.py: kuangliu ResNet with functional ReLUs, a fixed avg_pool2d(·, 4) and a
# Linear sized 512·expansion·(input_size // 32)²; its data transforms normalise outside the
# network; on CUDA it is saved through nn.DataParallel ("module.") inside {"net": ...}.

RELEASE_STATS = {
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2471, 0.2435, 0.2616]),
    "tiny-imagenet": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
}


class _ReleaseBlock(torch.nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        f = torch.nn.functional
        out = f.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return f.relu(out + self.shortcut(x))


class _ReleaseResNet18(torch.nn.Module):
    def __init__(self, input_size: int, num_classes: int, width: int):
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        cin, stages = width, []
        for k, stride in enumerate((1, 2, 2, 2)):
            cout = width * 2**k
            stages.append(
                nn.Sequential(_ReleaseBlock(cin, cout, stride), _ReleaseBlock(cout, cout, 1))
            )
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.linear = nn.Linear(cin * (input_size // 32) ** 2, num_classes)

    def forward(self, x):
        f = torch.nn.functional
        out = f.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = f.avg_pool2d(out, 4)
        return self.linear(out.reshape(out.size(0), -1))


def _release_net(input_size: int, num_classes: int, width: int = 8) -> torch.nn.Module:
    torch.manual_seed(1)
    net = _ReleaseResNet18(input_size, num_classes, width)
    for m in net.modules():  # trained-looking BN statistics, so normalisation matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net.eval()


@pytest.mark.parametrize(
    ("dataset", "size", "head"), [("cifar10", 32, 1), ("tiny-imagenet", 64, 2)]
)
def test_release_layout_gives_release_logits_on_unit_inputs(tmp_path, dataset, size, head):
    from fortify.runs import load_model, read_sidecar

    net = _release_net(size, 5)
    assert net.linear.in_features == 64 * head * head  # 8·2³ channels × the pooled grid
    src = tmp_path / "ResNet18.pth"
    torch.save({"net": {"module." + k: v for k, v in net.state_dict().items()}}, src)
    target = import_rift_release(src, tmp_path / "run", dataset=dataset)

    model, meta = load_model(tmp_path / "run")
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in RELEASE_STATS[dataset])
    x = torch.rand(4, 3, size, size)  # images in [0, 1]
    with torch.no_grad():
        want = net((x - mean) / std)  # the release feeds normalised tensors
        got = model(x)
        unnormalised = net(x)
    assert (got - want).abs().max().item() <= 1e-5
    assert (got - unnormalised).abs().max().item() > 1e-3  # without it the check would fail
    side = read_sidecar(target)["source"]
    assert (
        dataset in side["normalization"] and meta["config"]["model"]["kwargs"]["pool_grid"] == head
    )
    if dataset == "tiny-imagenet":
        assert meta["config"]["data"]["options"] == {"class_order": "sorted"}
        assert "avg_pool2d" in side["head"]


def test_release_normalization_options_and_head_refusals(tmp_path):
    from fortify.runs import load_model

    net = _release_net(32, 5)
    src = tmp_path / "r.pth"
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, src)
    import_rift_release(src, tmp_path / "none", normalization="none")
    model, _ = load_model(tmp_path / "none")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), net(x), atol=1e-5)
    # a CIFAR-sized head cannot be the release's Tiny-ImageNet network
    with pytest.raises(CheckpointError, match="32×32 inputs.*tiny-imagenet has 64×64"):
        import_rift_release(src, tmp_path / "t", dataset="tiny-imagenet")
    state = {"module." + k: v for k, v in net.state_dict().items()}
    state["module.linear.weight"] = torch.zeros(5, 64 * 3)  # 3 cells: no square grid
    odd = tmp_path / "odd.pth"
    torch.save(state, odd)
    with pytest.raises(CheckpointError, match="192 inputs.*cannot be rebuilt"):
        import_rift_release(odd, tmp_path / "o")
    assert not (tmp_path / "t").exists() and not (tmp_path / "o").exists()
