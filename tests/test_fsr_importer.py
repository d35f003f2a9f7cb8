"""Importer for the FSR release: synthetic checkpoints in the release's key layout, checked
against an independent functional forward written here from the spec (not from fortify)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fortify.errors import CheckpointError
from fortify.importers.fsr_release import build_release_model, read_state_dict

EPS = 1e-8
TAU = 0.1

# --------------------------------------------------------------------------- synthetic release


class Synth:
    """Builds a release-layout state dict with random tensors (keys written from the spec)."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)
        self.sd: dict[str, torch.Tensor] = {}

    def conv(self, key: str, cin: int, cout: int, k: int = 3, bias: bool = False) -> None:
        std = math.sqrt(2.0 / (cin * k * k))
        self.sd[f"{key}.weight"] = torch.randn(cout, cin, k, k, generator=self.g) * std
        if bias:
            self.sd[f"{key}.bias"] = torch.randn(cout, generator=self.g) * 0.1

    def bn(self, key: str, c: int) -> None:
        self.sd[f"{key}.weight"] = 0.5 + torch.rand(c, generator=self.g)
        self.sd[f"{key}.bias"] = torch.randn(c, generator=self.g) * 0.1
        self.sd[f"{key}.running_mean"] = torch.randn(c, generator=self.g) * 0.1
        self.sd[f"{key}.running_var"] = 0.5 + torch.rand(c, generator=self.g)
        self.sd[f"{key}.num_batches_tracked"] = torch.tensor(100)

    def linear(self, key: str, cin: int, cout: int) -> None:
        self.sd[f"{key}.weight"] = torch.randn(cout, cin, generator=self.g) / math.sqrt(cin)
        self.sd[f"{key}.bias"] = torch.randn(cout, generator=self.g) * 0.1

    def fsr(self, c: int, hidden: int, k: int) -> None:
        for net in ("separation.sep_net", "recalibration.rec_net"):
            self.conv(f"{net}.0", c, hidden)
            self.bn(f"{net}.1", hidden)
            self.conv(f"{net}.3", hidden, hidden)
            self.bn(f"{net}.4", hidden)
            self.conv(f"{net}.6", hidden, c)
        self.linear("aux.0", c, k)


def synth_resnet18(width: int, hidden: int, k: int, seed: int = 0) -> dict:
    s = Synth(seed)
    s.conv("conv1", 3, width)
    s.bn("bn1", width)
    cin = width
    for stage in range(1, 5):
        cout = width * 2 ** (stage - 1)
        for b in range(2):
            stride = 2 if stage > 1 and b == 0 else 1
            p = f"layer{stage}.{b}"
            s.conv(f"{p}.conv1", cin, cout)
            s.bn(f"{p}.bn1", cout)
            s.conv(f"{p}.conv2", cout, cout)
            s.bn(f"{p}.bn2", cout)
            if stride != 1 or cin != cout:
                s.conv(f"{p}.shortcut.0", cin, cout, k=1)
                s.bn(f"{p}.shortcut.1", cout)
            cin = cout
    s.fsr(cin, hidden, k)
    s.linear("linear", cin, k)
    return s.sd


VGG_GROUPS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


def synth_vgg16(width: int, hidden: int, k: int, seed: int = 1) -> dict:
    s = Synth(seed)
    cin = 3
    for b, group in enumerate(VGG_GROUPS):
        for j, c in enumerate(group):
            c = c * width // 64
            s.conv(f"block{b}.{3 * j}", cin, c, bias=True)
            s.bn(f"block{b}.{3 * j + 1}", c)
            cin = c
    s.fsr(512 * width // 64, hidden, k)
    fc = 512 * width // 64
    s.linear("classifier.0", cin, fc)
    s.linear("classifier.2", fc, fc)
    s.linear("classifier.4", fc, k)
    return s.sd


def synth_wrn(depth: int, widen: int, hidden: int, k: int, seed: int = 2) -> dict:
    s = Synth(seed)
    n = (depth - 4) // 6
    ch = (16, 16 * widen, 32 * widen, 64 * widen)
    s.conv("conv1", 3, 16)
    for group, (cin0, cout) in zip(
        ("block1", "sub_block1", "block2", "block3"),
        ((16, ch[1]), (16, ch[1]), (ch[1], ch[2]), (ch[2], ch[3])),
    ):
        for i in range(n):
            cin = cin0 if i == 0 else cout
            p = f"{group}.layer.{i}"
            s.bn(f"{p}.bn1", cin)
            s.conv(f"{p}.conv1", cin, cout)
            s.bn(f"{p}.bn2", cout)
            s.conv(f"{p}.conv2", cout, cout)
            if cin != cout:
                s.conv(f"{p}.convShortcut", cin, cout, k=1)
    s.bn("bn1", ch[3])
    s.fsr(ch[3], hidden, k)
    s.linear("fc", ch[3], k)
    return s.sd


# --------------------------------------------------------------------------- reference forward


def _bn(sd, p, x):
    return F.batch_norm(
        x,
        sd[f"{p}.running_mean"],
        sd[f"{p}.running_var"],
        sd[f"{p}.weight"],
        sd[f"{p}.bias"],
        training=False,
        eps=1e-5,
    )


def _conv(sd, p, x, stride=1, padding=1):
    return F.conv2d(x, sd[f"{p}.weight"], sd.get(f"{p}.bias"), stride=stride, padding=padding)


def ref_fsr(sd, f):
    """The release's eval-mode FSR: Gumbel-softmax with u = 0.5 and 1e-8 epsilons."""

    def net(p, x):
        x = F.relu(_bn(sd, f"{p}.1", _conv(sd, f"{p}.0", x)))
        x = F.relu(_bn(sd, f"{p}.4", _conv(sd, f"{p}.3", x)))
        return _conv(sd, f"{p}.6", x)

    r = net("separation.sep_net", f)
    p = torch.sigmoid(r)
    g = -torch.log(-torch.log(torch.tensor(0.5) + EPS) + EPS)
    a = torch.exp((torch.log(p + EPS) + g) / (TAU + EPS))
    b = torch.exp((torch.log(1 - p + EPS) + g) / (TAU + EPS))
    m = a / (a + b)
    f_pos, f_neg = m * f, (1 - m) * f
    f_neg_rec = f_neg + (1 - m) * net("recalibration.rec_net", f_neg)
    return f_pos + f_neg_rec


def ref_resnet18(sd, x):
    out = F.relu(_bn(sd, "bn1", _conv(sd, "conv1", x)))
    for stage in range(1, 5):
        for b in range(2):
            p = f"layer{stage}.{b}"
            stride = 2 if stage > 1 and b == 0 else 1
            o = F.relu(_bn(sd, f"{p}.bn1", _conv(sd, f"{p}.conv1", out, stride)))
            o = _bn(sd, f"{p}.bn2", _conv(sd, f"{p}.conv2", o))
            if f"{p}.shortcut.0.weight" in sd:
                sc = _bn(sd, f"{p}.shortcut.1", _conv(sd, f"{p}.shortcut.0", out, stride, 0))
            else:
                sc = out
            out = F.relu(o + sc)
    out = ref_fsr(sd, out)
    return F.linear(F.avg_pool2d(out, 4).flatten(1), sd["linear.weight"], sd["linear.bias"])


def ref_vgg16(sd, x):
    for b, group in enumerate(VGG_GROUPS):
        for j in range(len(group)):
            x = F.relu(_bn(sd, f"block{b}.{3 * j + 1}", _conv(sd, f"block{b}.{3 * j}", x)))
        if b == 3:
            x = ref_fsr(sd, x)
        x = F.max_pool2d(x, 2)
    x = x.flatten(1)
    x = F.relu(F.linear(x, sd["classifier.0.weight"], sd["classifier.0.bias"]))
    x = F.relu(F.linear(x, sd["classifier.2.weight"], sd["classifier.2.bias"]))
    return F.linear(x, sd["classifier.4.weight"], sd["classifier.4.bias"])


def ref_wrn(sd, x, depth):
    n = (depth - 4) // 6
    out = _conv(sd, "conv1", x)
    for group, stride in (("block1", 1), ("block2", 2), ("block3", 2)):
        for i in range(n):
            p = f"{group}.layer.{i}"
            s = stride if i == 0 else 1
            act = F.relu(_bn(sd, f"{p}.bn1", out))
            o = F.relu(_bn(sd, f"{p}.bn2", _conv(sd, f"{p}.conv1", act, s)))
            o = _conv(sd, f"{p}.conv2", o)
            short = (
                _conv(sd, f"{p}.convShortcut", act, s, 0)
                if f"{p}.convShortcut.weight" in sd
                else out
            )
            out = o + short
    out = F.relu(_bn(sd, "bn1", out))
    out = ref_fsr(sd, out)
    return F.linear(F.avg_pool2d(out, 8).flatten(1), sd["fc.weight"], sd["fc.bias"])


def _x(seed=5, n=4):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


CASES = {
    "resnet18": (lambda: synth_resnet18(width=4, hidden=8, k=10), ref_resnet18),
    "vgg16": (lambda: synth_vgg16(width=8, hidden=8, k=10), ref_vgg16),
    "wrn-34-10": (lambda: synth_wrn(16, 2, hidden=8, k=10), lambda sd, x: ref_wrn(sd, x, 16)),
}


@pytest.mark.parametrize("arch", list(CASES))
def test_import_matches_independent_reference(arch, tmp_path):
    make, ref = CASES[arch]
    sd = make()
    path = tmp_path / "release.pth"
    torch.save(sd, path)
    model, cfg, shape = build_release_model(read_state_dict(path), arch)
    assert shape == (3, 32, 32)
    assert cfg["defenses"][0]["kind"] == "fsr"
    x = _x()
    with torch.no_grad():
        expected = ref(sd, x)
        got = model(x)
    assert got.shape == (4, 10)
    assert expected.std() > 1e-2  # non-degenerate logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_import_full_size_wrn_34_10_names(tmp_path):
    """Full-size shapes pick the registered wrn-34-10 backbone (structure check, one forward)."""
    sd = synth_wrn(34, 10, hidden=64, k=10)
    model, cfg, _ = build_release_model(sd, "wrn-34-10")
    assert cfg["model"]["name"] == "wrn-34-10"
    x = _x(n=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref_wrn(sd, x, 34), atol=1e-4, rtol=1e-4)


def test_importer_errors(tmp_path):
    sd = synth_resnet18(width=4, hidden=8, k=10)
    with pytest.raises(CheckpointError, match="pass --arch resnet18"):
        build_release_model(sd, "vgg16")
    broken = dict(sd)
    del broken["layer2.1.conv2.weight"]
    with pytest.raises(CheckpointError, match=r"missing .*layer2\.1\.conv2\.weight"):
        build_release_model(broken, "resnet18")
    extra = dict(sd, **{"projector.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"unexpected .*projector\.weight"):
        build_release_model(extra, "resnet18")
    with pytest.raises(CheckpointError, match="num-classes 100"):
        build_release_model(sd, "resnet18", num_classes=100)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="weights_only"):
        read_state_dict(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pth")
    # DataParallel prefixes are stripped
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "dp.pth")
    assert "conv1.weight" in read_state_dict(tmp_path / "dp.pth")


def test_cli_import_writes_loadable_run(tmp_path):
    from fortify.cli.main import main
    from fortify.runs import load_model

    sd = synth_resnet18(width=4, hidden=8, k=10)
    torch.save(sd, tmp_path / "release.pth")
    out = tmp_path / "imported"
    rc = main(
        [
            "import",
            "fsr-release",
            str(tmp_path / "release.pth"),
            "--arch",
            "resnet18",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    model, meta = load_model(out, tag="final")
    assert meta["source"]["kind"] == "fsr-release"
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref_resnet18(sd, x), atol=1e-5, rtol=1e-5)
    # a wrong --arch is a clean CLI error (exit code 2), not a traceback
    assert (
        main(
            [
                "import",
                "fsr-release",
                str(tmp_path / "release.pth"),
                "--arch",
                "vgg16",
                "--out",
                str(tmp_path / "o2"),
            ]
        )
        == 2
    )
