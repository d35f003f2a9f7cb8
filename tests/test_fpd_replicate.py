"""`fortify replicate fpd-table`: row configs, the results page and the --reuse bookkeeping."""

from __future__ import annotations

import argparse

import pytest
import torch

from fortify.evaluate import EvalReport, Outcome
from fortify.replicate import fpd_table as ft


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    ft.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_row_configs_share_the_fine_tuning_recipe():
    cfgs = ft._configs(_args())
    assert set(cfgs) == set(ft.ROWS)
    assert [d.kind for d in cfgs["fpd"].defenses] == ["fpd"]
    assert cfgs["plain+at"].defenses == [] and cfgs["plain"].defenses == []
    # the plain+at baseline differs from fpd+at only in the defence (and its name)
    a, b = cfgs["fpd+at"], cfgs["plain+at"]
    assert a.train == b.train and a.data == b.data and a.model == b.model
    assert a.train.objective == "at" and a.train.attack.eps == 0.1


def test_rows_to_train_include_starting_models_and_the_surrogate():
    assert ft.rows_to_train(["fpd+at"]) == ["plain", "fpd", "fpd+at"]
    assert ft.rows_to_train(["plain+at"]) == ["plain", "plain+at"]
    assert ft.rows_to_train(["fpd"]) == ["plain", "fpd"]
    assert ft.rows_to_train(list(ft.ROWS)) == list(ft.ROWS)


def _report(n: int, broken_by: dict[str, list[int]], ran: dict[str, int]) -> EvalReport:
    from fortify.evaluate.report import first_mask

    ones = torch.ones(n, dtype=torch.bool)
    outcomes = [Outcome("Natural", ones.clone())]
    for name, idx in broken_by.items():
        c = ones.clone()
        c[idx] = False
        outcomes.append(Outcome(name, c, ran=first_mask(n, ran.get(name, n))))
    return EvalReport({}, outcomes, [], {})


def test_autoattack_columns_cover_only_the_attacked_points():
    a = _args("--n-points", "10", "--aa-points", "4", "--steps", "40")
    # AutoAttack broke 2 of its 4 points; the 6 unattacked points are not counted anywhere
    rep = _report(10, {"AutoAttack": [0, 1], "PGD-40 C&W": [0, 5, 6, 7]}, {"AutoAttack": 4})
    assert ft.subset_accuracy(rep, "AutoAttack", 4) == (50.0, 4)
    assert ft.subset_accuracy(rep, "AutoAttack", 10) == (50.0, 4)
    assert ft.subset_accuracy(rep, "Square", 4) is None
    text = ft._markdown(a, {"fpd": rep}, {"train fpd": 60.0, "eval fpd": 120.0})
    all_points, aa = text.split("## AutoAttack, on the first 4 points")
    assert "AutoAttack" not in all_points.split("| model |")[1].split("\n")[0]
    # all 10 points: clean 100, C&W 60; the worst case includes AutoAttack, so it counts only
    # the 4 points AutoAttack ran on (points 0 and 1 broken)
    assert "| fpd | 100.0 | – | – | 60.0 | – | – | – | – | 50.0 (n=4) |" in all_points
    # first 4 points: clean 100, AutoAttack 50, logits AutoAttack absent, worst case 50
    assert "| fpd | 100.0 | 50.0 | – | 50.0 |" in aa
    assert "Compute time 3.0 min" in text


def test_reuse_needs_a_finished_run_with_the_same_training_config(tmp_path):
    from fortify.config import to_dict
    from fortify.runs import RunDir

    cfg = ft._configs(_args())["plain"]
    run = tmp_path / "plain"
    assert not ft._finished_with(run, cfg)
    rd = RunDir.open(run, config=to_dict(cfg))
    (run / "checkpoints").mkdir(exist_ok=True)
    (run / "checkpoints" / "last.safetensors").write_bytes(b"weights")
    rd.set_state("finished")
    assert ft._finished_with(run, cfg)
    other_eval = ft._configs(_args("--n-points", "7"))["plain"]  # eval section only
    assert ft._finished_with(run, other_eval)
    longer = ft._configs(_args("--epochs-plain", "9"))["plain"]
    assert not ft._finished_with(run, longer)
    # a row fine-tuned from another row's model is reused only if it started from those weights
    assert not ft._finished_with(run, cfg, source_sha="abc")
    (run / ft.SOURCE_FILE).write_text('{"row": "plain", "sha256": "abc"}')
    assert ft._finished_with(run, cfg, source_sha="abc")
    assert not ft._finished_with(run, cfg, source_sha="retrained")


def test_eval_fingerprint_follows_the_checkpoints(tmp_path):
    a = _args("--out", str(tmp_path))
    for row in ("plain", "fpd"):
        (tmp_path / row / "checkpoints").mkdir(parents=True)
        (tmp_path / row / "checkpoints" / "last.safetensors").write_bytes(row.encode())
    fp = ft.eval_fingerprint(a, tmp_path, "fpd")
    assert fp["checkpoint"] and fp["surrogate"] and fp["checkpoint"] != fp["surrogate"]
    assert ft.eval_fingerprint(a, tmp_path, "plain")["surrogate"] is None
    (tmp_path / "plain" / "checkpoints" / "last.safetensors").write_bytes(b"retrained")
    assert ft.eval_fingerprint(a, tmp_path, "fpd") != fp  # new surrogate: evaluate again
    assert (
        ft.eval_fingerprint(_args("--out", str(tmp_path), "--steps", "5"), tmp_path, "fpd")["steps"]
        == 5
    )


def test_pages_carry_generated_readings(tmp_path):
    from fortify.replicate.common import SeedGrid

    a = _args("--n-points", "10", "--aa-points", "4", "--steps", "40", "--seeds", "0,1")
    grid = SeedGrid(labels={k: k for k in ft.ROWS})
    for s in (0, 1):
        grid.add("plain", s, _report(10, {"PGD-40 C&W": [0, 1, 2, 3, 4, 5]}, {}))
        grid.add("fpd", s, _report(10, {"PGD-40 C&W": [s]}, {}))
    readings = grid.readings(ft.READING_PAIRS, ft.READING_COLUMNS)
    assert [(r.baseline, r.method, r.column) for r in readings] == [
        ("plain", "fpd", "Natural"),
        ("plain", "fpd", "Ensemble"),
    ]
    ens = readings[1]
    assert ens.interval.estimate == pytest.approx(50.0) and ens.verdict == "higher"
    text = ft._multi_seed_page(a, [0, 1], grid, readings, tmp_path / "fpd_table.md")
    assert "| plain | 2 (0,1) |" in text and "| fpd − plain | Ensemble | 2 | 10 |" in text
    assert "fpd_table_seed0.md" in text and "higher" in text
