"""Attaching defences by forward hooks and the auxiliary-loss contract."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

from fortify.defenses import AuxContext, attach, attached, capture_aux
from fortify.defenses.contract import CaptureMixin
from fortify.errors import FortifyError


class Scale(CaptureMixin, nn.Module):
    """Toy defence: multiplies the feature map by a learnable scalar; loss = weight·mean(out²)."""

    def __init__(self, weight: float = 1.0):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(2.0))
        self.weight = weight

    def forward(self, f):
        out = f * self.s
        self.record(out=out)
        return out

    def aux_losses(self, ctx: AuxContext):
        return {"toy": self.weight * self.recorded["out"].pow(2).mean()}


def cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = cnn()

    def forward(self, x):
        return self.body(x)


def test_attach_changes_output_and_keeps_names():
    model = Net()
    x = torch.rand(2, 1, 8, 8)
    before = model(x)
    names_before = {n for n, _ in model.named_parameters()}
    model = attach(model, lambda shape: Scale(), at="body.0", input_shape=(1, 8, 8))
    after = model(x)
    assert after.shape == (2, 3)
    assert not torch.allclose(before, after)
    names_after = {n for n, _ in model.named_parameters()}
    assert names_before < names_after
    assert "fortify_defenses.body__0.s" in names_after
    assert list(attached(model)) == ["body.0"]


def test_sequential_root_gets_wrapper_and_trains():
    model = attach(cnn(), lambda shape: Scale(), at=["0", "2"], input_shape=(1, 8, 8))
    assert set(attached(model)) == {"net.0", "net.2"}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    with capture_aux(model) as cap:
        logits = model(x)
    terms = cap.losses(AuxContext(y=y, logits=logits))
    assert set(terms) == {"toy"}
    loss = nn.functional.cross_entropy(logits, y) + sum(terms.values())
    loss.backward()
    s = model.fortify_defenses["net__0"].s
    assert s.grad is not None and s.grad.abs() > 0
    opt.step()


def test_terms_are_averaged_over_blocks():
    model = attach(cnn(), lambda shape: Scale(), at=["0", "2"], input_shape=(1, 8, 8))
    x = torch.rand(3, 1, 8, 8)
    with capture_aux(model) as cap:
        logits = model(x)
    blocks = list(model.fortify_defenses.values())
    by_hand = sum(b.recorded["out"].pow(2).mean() for b in blocks) / 2
    got = cap.losses(AuxContext(y=torch.zeros(3, dtype=torch.long), logits=logits))["toy"]
    assert torch.allclose(got, by_hand)
    assert all(not b.recorded for b in blocks)  # released once the terms are computed


def test_no_recording_outside_capture():
    model = attach(Net(), lambda shape: Scale(), at="body.0", input_shape=(1, 8, 8))
    model(torch.rand(2, 1, 8, 8))
    assert model.fortify_defenses["body__0"].recorded == {}


def test_deepcopy_and_pickle_keep_hooks_bound_to_the_copy():
    model = attach(Net(), lambda shape: Scale(), at="body.0", input_shape=(1, 8, 8))
    x = torch.rand(2, 1, 8, 8)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.fortify_defenses["body__0"].s.fill_(0.0)
    assert not torch.allclose(clone(x), model(x))  # the copy's hook uses the copy's defence
    restored = pickle.loads(pickle.dumps(model))
    assert torch.allclose(restored(x), model(x))


def test_bad_positions():
    model = Net()
    with pytest.raises(FortifyError, match=r"close matches: .*body\.0"):
        attach(model, lambda s: Scale(), at="body.00", input_shape=(1, 8, 8))
    with pytest.raises(FortifyError, match="4-D feature map"):
        attach(Net(), lambda s: Scale(), at="body.4", input_shape=(1, 8, 8))
    with pytest.raises(FortifyError, match="listed twice"):
        attach(Net(), lambda s: Scale(), at=["body.0", "body.0"], input_shape=(1, 8, 8))
    once = attach(Net(), lambda s: Scale(), at="body.0", input_shape=(1, 8, 8))
    with pytest.raises(FortifyError, match="already attached"):
        attach(once, lambda s: Scale(), at="body.0", input_shape=(1, 8, 8))


def test_deepcopy_between_forward_and_losses():
    model = attach(Net(), lambda shape: Scale(), at="body.0", input_shape=(1, 8, 8))
    x = torch.rand(2, 1, 8, 8)
    with capture_aux(model) as cap:
        logits = model(x)
        clone = copy.deepcopy(model)  # records hold graph tensors; copies must not see them
    assert clone.fortify_defenses["body__0"].recorded == {}
    terms = cap.losses(AuxContext(y=torch.zeros(2, dtype=torch.long), logits=logits))
    assert terms["toy"] > 0


def test_second_attach_to_same_sequential_root_is_refused():
    seq = cnn()
    attach(seq, lambda s: Scale(), at="0", input_shape=(1, 8, 8))
    # a new call on the same container builds a new wrapper, but the child is already hooked
    with pytest.raises(FortifyError, match=r"already attached after 'net\.0'"):
        attach(seq, lambda s: Scale(), at="0", input_shape=(1, 8, 8))
    assert len(seq[0]._forward_hooks) == 1


def test_failed_attach_leaves_model_untouched():
    model = Net()
    with pytest.raises(FortifyError, match="no module named"):
        attach(model, lambda s: Scale(), at="nope", input_shape=(1, 8, 8))
    assert not hasattr(model, "fortify_defenses")
    assert attached(model) == {}


class Reuse(nn.Module):
    """``act`` runs twice per forward; ``spare`` never runs."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.spare = nn.Conv2d(4, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = self.act(self.conv2(self.act(self.conv1(x))))
        return self.head(h.mean((2, 3)))


def test_modules_run_twice_or_never_are_refused():
    with pytest.raises(FortifyError, match=r"'act' runs 2 times per forward"):
        attach(Reuse(), lambda s: Scale(), at="act", input_shape=(1, 8, 8))
    with pytest.raises(FortifyError, match=r"\['spare'\].*never runs"):
        attach(Reuse(), lambda s: Scale(), at=["conv1", "spare"], input_shape=(1, 8, 8))
    model = attach(Reuse(), lambda s: Scale(), at="conv2", input_shape=(1, 8, 8))
    assert list(attached(model)) == ["conv2"]
