"""Every ``fortify ...`` command and Python snippet in README.md and docs/*.md runs as written.

One test per page: its fenced blocks run in page order in a fresh run root (a temporary folder
as the working directory, with ``configs/`` linked in), so a page's commands build on each other
(train → eval → report → rift ...), and so do its Python snippets (one namespace per page).
Sizes are the page's own unless a ``docs-test`` note next to the block names a tiny override;
commands that cannot run here (GPU, torchrun, downloads, the reader's own files) carry a
``skip`` note with the reason (see tests/docs_blocks.py for the notes). Any exit status other
than 0 (or the codes an ``exit`` note allows) fails, and so does any exception in a snippet.
Runs that several pages only read (an AT and an AT+FSR run, both evaluated) are trained once per
worker by a module-scoped fixture and copied in by ``uses``.
"""

from __future__ import annotations

import re
import shlex
import shutil
import time
from pathlib import Path

import pytest
import torch
from docs_blocks import DOCS, ROOT, Block, blocks

from fortify.cli.main import main

pytestmark = pytest.mark.slow

BLOCKS = blocks()
PAGES = [str(p.relative_to(ROOT)) for p in DOCS]
TINY = ["train.epochs=1", "train.warmup_epochs=0", "data.train_subset=128", "train.val_points=64"]


def _fortify(argv: list[str]) -> int:
    try:
        return int(main(argv) or 0)
    except SystemExit as exc:  # argparse errors, --help
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Tiny AT and AT+FSR runs on Fashion-MNIST, each with an eval-paper report on the same 32
    test points, plus the objects the snippets' ``given`` notes name."""
    from fortify.attacks import pgd
    from fortify.data import load_dataset
    from fortify.runs.checkpoint import load_model

    root = tmp_path_factory.mktemp("docs-shared")
    for name in ("at", "at-fsr"):
        run = root / name
        cfg = f"{ROOT}/configs/train/cpu/fmnist-{name}.yaml"
        assert _fortify(["train", "--config", cfg, "--run-dir", str(run), *TINY]) == 0
        rc = _fortify(["eval", str(run), "--n-points", "32", "--no-checks"])
        assert rc == 0
    at, _ = load_model(root / "at")
    at_fsr, _ = load_model(root / "at-fsr")
    x, y = load_dataset("fashion-mnist", val_size=1000).test.head(32).floats()
    x_adv = pgd(at_fsr, x, y, eps=0.1, steps=5, step_size=0.025)
    from fortify.config import ExperimentConfig, load_config
    from fortify.factory import build_model
    from fortify.models import create

    fpd_cfg = load_config(ExperimentConfig, f"{ROOT}/configs/fpd/fashion-mnist-cpu.yaml", [])
    fpd = build_model(fpd_cfg.model, fpd_cfg.defenses, 10, (1, 28, 28)).eval()
    return {
        "fpd-model": fpd,
        "root": root,
        "at-model": at,
        "at-fsr-model": at_fsr,
        "test-x": x,
        "test-y": y,
        "x-adv": x_adv,
        "resnet18-cifar": create("resnet18", num_classes=10, in_channels=3, width=8),
    }


def _values(block: Block, kind: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for note in block.notes_of(kind):
        note.used = True
        for item in note.value.split():
            key, _, value = item.partition("=")
            out[key] = value.split(",") if kind == "vars" else [value]
    return out


def _expand(line: str, variables: dict[str, list[str]]) -> list[str]:
    """The command once per value of each placeholder it contains ($X, ${X} or a bare word X)."""
    lines = [line]
    for name, values in variables.items():
        pattern = re.compile(rf"\$\{{{name}\}}|\${name}\b|\b{name}\b")
        if pattern.search(line):
            lines = [pattern.sub(v, ln) for ln in lines for v in values]
    return lines


def _run_python(
    block: Block, shared_objs: dict[str, object], namespace: dict[str, object], ran: list[str]
) -> None:
    skip = block.note_for("skip", "")
    if skip is not None:
        assert skip.value, f"{block.where}: a skip note needs a reason"
        return
    code = block.body
    for note in block.notes_of("replace"):
        old, sep, new = note.value.partition(" => ")
        assert sep and old in code, f"{block.where}: replace {old!r} matches nothing"
        note.used = True
        code = code.replace(old, new)
    for name, (provider,) in _values(block, "given").items():
        assert provider in shared_objs, f"{block.where}: unknown given {provider!r}"
        namespace[name] = shared_objs[provider]
    start = time.perf_counter()
    try:
        exec(compile(code, block.where, "exec"), namespace)
    except Exception as exc:
        pytest.fail(f"{block.where}: the Python snippet raised {type(exc).__name__}: {exc}")
    ran.append(f"{time.perf_counter() - start:6.1f} s  {block.where} (python)")


def _run_commands(block: Block, ran: list[str]) -> None:
    variables = _values(block, "vars")
    for raw in block.commands():
        skip = block.note_for("skip", raw)
        if skip is not None:
            assert skip.value, f"{block.where}: skipping `{raw}` needs a reason"
            continue
        assert raw.startswith("fortify"), (
            f"{block.where}: `{raw}` cannot run in-process; add a skip note with the reason"
        )
        add = block.note_for("add", raw)
        codes = block.note_for("exit", raw)
        allowed = {int(c) for c in codes.value.split(",")} if codes else {0}
        for line in _expand(raw, variables):
            argv = shlex.split(line, comments=True)[1:] + (shlex.split(add.value) if add else [])
            start = time.perf_counter()
            rc = _fortify(argv)
            assert rc in allowed, f"{block.where}: `fortify {shlex.join(argv)}` exited {rc}"
            took = time.perf_counter() - start
            ran.append(f"{took:6.1f} s  {block.where}: fortify {shlex.join(argv)}")


@pytest.mark.parametrize("page", PAGES)
def test_page_runs_as_written(page: str, request, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    torch.manual_seed(0)
    ran: list[str] = []
    namespace: dict[str, object] = {"__name__": "__docs__"}  # a page's snippets build on each other
    mine = [b for b in BLOCKS if b.doc == page]
    needs = any(b.notes_of("uses") or b.notes_of("given") for b in mine)
    shared = request.getfixturevalue("shared") if needs else {}
    for block in mine:
        for dest, (name,) in _values(block, "uses").items():
            if not (tmp_path / dest).exists():
                shutil.copytree(shared["root"] / name, tmp_path / dest)
        if block.lang == "python":
            _run_python(block, shared, namespace, ran)
        else:
            _run_commands(block, ran)
        stale = [f"{n.kind} {n.prefix}: {n.value}" for n in block.notes if not n.used]
        assert not stale, f"{block.where}: docs-test notes that match nothing: {stale}"
    print(f"{page}: ran {len(ran)} commands/snippets", *ran, sep="\n  ")
