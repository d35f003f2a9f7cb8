"""``fortify replicate rift-table1`` on a fresh clone: a seed without a finished AT run whose
committed per-seed JSON matches the settings is taken from the JSON (no training, no RiFT step);
a JSON computed with other settings is not used."""

from __future__ import annotations

import shutil

import pytest
from tiny_runs import tiny_config

#: RiFT options small enough for the tiny AT run (digits 8×8, small-cnn width 4)
TINY_RIFT = """\
mrc: {passes: 2, n_points: 64, batch_size: 64}
finetune: {epochs: 1, lr: 0.01}
interpolate: {step: 0.5, n_points: 64}
evaluate: {suites: [pgd10, ood], n_points: 32, checks: false}
"""


class WorkStarted(Exception):
    """Raised by the spies: training or a RiFT step was about to run."""


def _no_work(monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> None:
    """Make AT training and the RiFT workflow record the call and stop the command."""
    import fortify.rift.pipeline
    from fortify.replicate import rift_table1

    def spy(name: str):
        def boom(*a: object, **k: object) -> None:
            calls.append(name)
            raise WorkStarted(name)

        return boom

    monkeypatch.setattr(rift_table1, "train_or_reuse", spy("train_or_reuse"))
    monkeypatch.setattr(fortify.rift.pipeline, "RiftRun", spy("RiftRun"))
    monkeypatch.setenv("FORTIFY_DEBUG", "1")  # let the spy's exception through main()


def _without_note(text: str, start: str) -> str:
    """``text`` without the paragraph starting with ``start`` (and the blank line before it);
    fails the test when there is no such paragraph."""
    lines = text.splitlines()
    at = [i for i, ln in enumerate(lines) if ln.startswith(start)]
    assert len(at) == 1, f"no single line starting with {start!r}"
    i = at[0]
    assert lines[i - 1] == ""
    return "\n".join(lines[: i - 1] + lines[i + 1 :])


def test_fresh_clone_reaggregates_the_page_from_the_committed_json(tmp_path, monkeypatch):
    from fortify.cli.main import main

    (tmp_path / "tiny.yaml").write_text(tiny_config(1))
    (tmp_path / "rift.yaml").write_text(TINY_RIFT)
    out, docs = tmp_path / "out", tmp_path / "docs"
    doc = docs / "rift.md"
    argv = [
        "replicate", "rift-table1", "--out", str(out), "--doc", str(doc), "--seeds", "0",
        "--preset", str(tmp_path / "tiny.yaml"), "--rift-config", str(tmp_path / "rift.yaml"),
        "--device", "cpu",
    ]  # fmt: skip
    assert main(argv) == 0  # trains the AT run, runs RiFT with BN adapt and frozen
    assert (out / "seed-0" / "at" / "status.json").is_file()
    names = ["rift.md", "rift_seed0_adapt.md", "rift_seed0_frozen.md"]
    pages = {n: (docs / n).read_text() for n in names}
    per_seed = {p.name: p.read_bytes() for p in sorted((docs / "rift").glob("*.json"))}
    assert sorted(per_seed) == [
        "AT-seed0.json", "RiFT-adapt-seed0.json", "RiFT-frozen-seed0.json"
    ]  # fmt: skip

    # a fresh clone: no run folders, the committed page, per-seed pages and JSON
    shutil.rmtree(out)
    calls: list[str] = []
    _no_work(monkeypatch, calls)
    assert main(argv) == 0
    assert calls == [] and not out.exists()  # nothing trained, no RiFT step, no run folder
    # the same pages, plus the sentence saying where the seed came from
    for n in names:
        note = "Seed(s) 0 taken from" if n == "rift.md" else "Taken from the committed per-seed"
        assert _without_note((docs / n).read_text(), note) == pages[n].rstrip("\n"), n
    # the JSON are written back unchanged: a later call again finds what it needs
    assert {p.name: p.read_bytes() for p in sorted((docs / "rift").glob("*.json"))} == per_seed

    # a JSON made with other settings (AT training, RiFT options, evaluation) is not used: the
    # seed is computed as before (here: the training spy stops it)
    for other in (
        ["--train-set", "train.lr=0.06"],
        ["--set", "finetune.lr=0.02"],
        ["--set", "evaluate.n_points=16"],
    ):
        with pytest.raises(WorkStarted):
            main([*argv, *other])
        assert calls.pop() == "train_or_reuse", other
