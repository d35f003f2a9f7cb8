"""`fortify replicate fsr-table4` / `fsr-ablations` (tiny scale), their statistics, the cost
comparison of `fortify analyze --compare`, and the CAS/CIFS selection-masking check."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fortify.analysis.selection import SelectionCheckOptions, selection_check, selection_variant
from fortify.cli.main import main
from fortify.defenses.cas import CASOptions, attach_cas
from fortify.defenses.cifs import attach_cifs
from fortify.defenses.contract import provide_labels
from fortify.errors import FortifyError
from fortify.models import create
from fortify.replicate import fsr_ablations, fsr_table4
from fortify.replicate._feature_table_results import compare
from fortify.replicate._feature_table_rows import row_config
from fortify.stats import NO_DIFFERENCE

ROOT = Path(__file__).resolve().parents[1]


def _bits(a) -> str:
    return "".join("1" if v else "0" for v in a)


def test_compare_reads_the_bootstrap_over_seeds_and_points():
    rng = np.random.default_rng(0)
    base, same, better = {}, {}, {}
    for s in range(3):
        a = rng.random(400) < 0.5
        b = a | (rng.random(400) < 0.3)  # strictly more points right
        base[s] = {"outcomes": {"PGD-20": _bits(a)}}
        same[s] = {"outcomes": {"PGD-20": _bits(a)}}
        better[s] = {"outcomes": {"PGD-20": _bits(b)}}
    diffs = compare({"at": base, "same": same, "better": better}, "at", 2000)
    assert diffs["same"]["PGD-20"]["estimate"] == 0 and diffs["same"]["PGD-20"]["verdict"] == (
        NO_DIFFERENCE
    )
    want = 100 * np.mean([better[s]["outcomes"]["PGD-20"].count("1") / 400 for s in range(3)])
    want -= 100 * np.mean([base[s]["outcomes"]["PGD-20"].count("1") / 400 for s in range(3)])
    got = diffs["better"]["PGD-20"]
    assert got["estimate"] == pytest.approx(want) and got["verdict"] == "higher"
    assert got["low"] > 0 and got["n_seeds"] == 3


def test_row_configs_of_both_tables_build():
    from fortify.factory import build_model

    for mod in (fsr_table4, fsr_ablations):
        p = argparse.ArgumentParser()
        mod.add_arguments(p)
        args = p.parse_args([])
        for row, spec in mod.ROWS.items():
            cfg = row_config(row, spec, 2, args)
            assert cfg.seed == 2 and cfg.data.name == "fashion-mnist"
            model = build_model(cfg.model, cfg.defenses, 10, (1, 28, 28))
            assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert row_config("at-cifs", fsr_table4.ROWS["at-cifs"], 0, args).defenses[0].options[
        "hidden"
    ] == (args.cifs_hidden)


def test_replicate_table4_tiny_run_writes_page_json_and_reuses(tmp_path, capsys):
    doc = tmp_path / "t4.md"
    argv = [
        "replicate", "fsr-table4", "--out", str(tmp_path / "runs"), "--doc", str(doc),
        "--rows", "at,at-cas", "--seeds", "0,1", "--epochs", "1", "--train-subset", "64",
        "--width", "2", "--test-points", "16", "--aa-points", "0", "--attack-steps", "1",
        "--no-checks",
    ]  # fmt: skip
    assert main(argv) == 0
    text = doc.read_text()
    assert "fortify replicate fsr-table4" in text and "--seeds 0,1" in text
    assert "| AT + CAS | 2 |" in text and "Ensemble n = 16" in text
    per_seed = json.loads((tmp_path / "t4" / "at-cas-seed1.json").read_text())
    assert len(per_seed["outcomes"]["PGD-20"]) == 16
    diffs = json.loads((tmp_path / "t4" / "differences.json").read_text())
    assert diffs["at-cas"]["Ensemble"]["verdict"] in ("higher", "lower", NO_DIFFERENCE)
    assert diffs["at-cas"]["Ensemble"]["verdict"] in text
    ckpt = tmp_path / "runs" / "at-cas" / "seed0" / "checkpoints" / "last.safetensors"
    stamp = ckpt.stat().st_mtime
    assert main(argv) == 0  # finished rows are reused, not retrained
    assert ckpt.stat().st_mtime == stamp
    assert main([*argv[:-1], "--seeds", "0,0"]) == 2
    assert main([*argv, "--rows", "at,nope"]) == 2

    # a later session without the run directories re-aggregates the committed per-seed JSON
    shutil.rmtree(tmp_path / "runs")
    page = doc.read_text()
    assert main(argv) == 0
    assert not (tmp_path / "runs" / "at-cas").exists()  # nothing trained again
    assert doc.read_text() == page
    # ... but a changed training recipe or evaluation setting is computed again
    assert main([*argv, "--test-points", "8", "--rows", "at", "--seeds", "0"]) == 0
    assert (tmp_path / "runs" / "at" / "seed0" / "checkpoints" / "last.safetensors").is_file()
    shutil.rmtree(tmp_path / "runs")
    assert main([*argv, "--epochs", "2", "--rows", "at", "--seeds", "1"]) == 0
    assert (tmp_path / "runs" / "at" / "seed1" / "checkpoints" / "last.safetensors").is_file()


def test_table4_page_names_the_fd_placement_that_ran(tmp_path):
    doc = tmp_path / "t4.md"
    argv = [
        "replicate", "fsr-table4", "--out", str(tmp_path / "runs"), "--doc", str(doc),
        "--rows", "at,at-fd", "--seeds", "0", "--epochs", "1", "--train-subset", "32",
        "--width", "2", "--test-points", "8", "--aa-points", "0", "--attack-steps", "1",
        "--no-checks", "--fd-at", "layer4",
    ]  # fmt: skip
    assert main(argv) == 0
    settings = doc.read_text().split("## Settings", 1)[1]
    assert "AT + FD after layer4 (`--fd-at`" in settings
    assert "AT + FD after every stage" not in settings
    # bad values are refused before any work
    assert main([*argv[:-1], ","]) == 2
    assert main([*argv, "--resamples", "2000000"]) == 2


def test_feature_table_evaluation_cache_is_keyed_by_the_rules(tmp_path, monkeypatch):
    from fortify.replicate import _feature_table, _feature_table_results

    argv = [
        "replicate", "fsr-table4", "--out", str(tmp_path / "runs"), "--doc",
        str(tmp_path / "t4.md"), "--rows", "at", "--seeds", "0", "--epochs", "1",
        "--train-subset", "32", "--width", "2", "--test-points", "8", "--aa-points", "0",
        "--attack-steps", "1", "--no-checks",
    ]  # fmt: skip
    assert main(argv) == 0
    cache = tmp_path / "runs" / "at" / "seed0" / "reports" / "feature_table_eval.json"
    assert json.loads(cache.read_text())["key"]["rules"] == _feature_table_results.RULES
    for module in (_feature_table, _feature_table_results):
        monkeypatch.setattr(module, "RULES", "fortify-eval/test")
    assert main(argv) == 0  # the finished run is evaluated again under the new rules
    assert json.loads(cache.read_text())["key"]["rules"] == "fortify-eval/test"
    per_seed = json.loads((tmp_path / "t4" / "at-seed0.json").read_text())
    assert per_seed["rules"] == "fortify-eval/test"


# ---------------------------------------------------------------------------------------------


def test_analyze_compare_prints_a_cost_row_per_config(tmp_path, capsys):
    cfgs = []
    for name, defences in (
        ("plain", "[]"),
        ("with-cas", "[{kind: cas, at: [layer4.0, layer4.1]}]"),
    ):
        path = tmp_path / f"{name}.yaml"
        path.write_text(
            f"name: {name}\nmodel: {{name: resnet18, kwargs: {{width: 4}}}}\ndefenses: {defences}\n"
        )
        cfgs.append(str(path))
    assert (
        main(
            [
                "analyze",
                "--compare",
                *cfgs,
                "--input-shape",
                "3",
                "16",
                "16",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| with-cas"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    extra = 2 * (32 * 10 + 10)  # two heads: Linear(32 → 10) at width 4's 32 channels
    assert cells[2] == f"{extra / 1e6:.2f}" and float(cells[5]) == pytest.approx(1.0, abs=1e-3)
    assert (tmp_path / "cost_comparison.md").is_file()
    assert main(["analyze", "--compare", cfgs[0], "--num-classes", "1"]) == 2


def _small(kind: str):
    torch.manual_seed(0)
    net = create("small-cnn", num_classes=4, in_channels=1, width=4)
    at = ["features.0", "features.1"]
    if kind == "cas":
        return attach_cas(net, at, 4, (1, 8, 8), CASOptions()).eval()
    return attach_cifs(net, at, 4, (1, 8, 8)).eval()


@pytest.mark.parametrize("kind", ["cas", "cifs"])
def test_selection_check_attacks_the_variants_and_transfers(kind):
    from fortify.attacks import pgd

    model = _small(kind)
    x, y = torch.rand(24, 1, 8, 8), torch.randint(0, 4, (24,))
    opts = SelectionCheckOptions(eps=0.1, steps=3, batch_size=8)
    res = selection_check(model, x, y, opts)
    assert set(res["variants"]) == ({"label"} if kind == "cas" else {"label", "differentiable"})
    twin = selection_variant(model, "label")
    parts = []
    for i in range(0, 24, 8):  # the variant's masks come from the true labels of each batch
        with provide_labels(twin, y[i : i + 8]):
            parts.append(
                pgd(twin, x[i : i + 8], y[i : i + 8], eps=0.1, steps=3, step_size=0.01,
                    random_start=False)
            )  # fmt: skip
    adv = torch.cat(parts)
    with torch.no_grad():
        want = 100 * float((model(adv).argmax(1) == y).float().mean())
    assert res["variants"]["label"]["transfer"] == pytest.approx(want)
    for v in res["variants"].values():
        assert v["worst"] <= min(v["transfer"], res["direct"]) + 1e-9
        assert v["status"] == ("warn" if v["difference"]["high"] < 0 else "ok")
    # the deployed model is untouched: paper selection, detached relevance
    for b in model.fortify_defenses.values():
        assert b.opts.selection == "paper" and getattr(b.opts, "detach", True)
    with pytest.raises(FortifyError, match="no CAS or CIFS"):
        selection_variant(create("small-cnn", num_classes=4, in_channels=1, width=4), "label")


def test_bf16_parity_rows_differ_only_in_training_precision():
    from fortify.config.loader import to_dict
    from fortify.replicate import bf16_parity

    p = argparse.ArgumentParser()
    bf16_parity.add_arguments(p)
    args = p.parse_args([])
    assert args.seeds == "0,1,2" and args.doc == "docs/results/bf16_parity.md"
    bf16 = to_dict(row_config("at-bf16", bf16_parity.ROWS["at-bf16"], 1, args))
    fp32 = to_dict(row_config("at-fp32", bf16_parity.ROWS["at-fp32"], 1, args))
    assert (bf16["train"]["precision"], bf16["train"]["channels_last"]) == ("bf16", True)
    assert (fp32["train"]["precision"], fp32["train"]["channels_last"]) == ("fp32", False)
    for d in (bf16, fp32):
        d.pop("name")
        d["train"].pop("precision")
        d["train"].pop("channels_last")
    assert bf16 == fp32  # same recipe, seed, data, model and evaluation otherwise
    # the bf16 row trains what fsr-table4's AT row trains with --precision bf16, and the fp32
    # row what it trains by default
    p4 = argparse.ArgumentParser()
    fsr_table4.add_arguments(p4)
    fast, default = p4.parse_args(["--precision", "bf16"]), p4.parse_args([])
    assert (
        row_config("at", fsr_table4.ROWS["at"], 1, fast).train
        == row_config("at-bf16", bf16_parity.ROWS["at-bf16"], 1, args).train
    )
    assert (
        row_config("at", fsr_table4.ROWS["at"], 1, default).train
        == row_config("at-fp32", bf16_parity.ROWS["at-fp32"], 1, args).train
    )
