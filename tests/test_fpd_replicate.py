"""`fortify replicate fpd-table`: row configs, the results page and the --reuse bookkeeping."""

from __future__ import annotations

import argparse

import torch

from fortify.evaluate import EvalReport, Outcome
from fortify.replicate import _fpd_pages as pages
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
    assert cfgs["plain+at-eq"].train.attack == cfgs["plain+at"].train.attack
    opts = cfgs["fpd"].defenses[0].options
    assert (opts["decoder"], opts["pyramid"], opts["bn_stats"], opts["denoise_scale"]) == (
        "linear",
        "raw",
        "shared",
        "n",
    )
    assert cfgs["fpd"].train.options["threshold"] == 3.0  # the release's T
    # the plain+at baseline differs from fpd+at only in the defence (and its name)
    a, b = cfgs["fpd+at"], cfgs["plain+at"]
    assert a.train == b.train and a.data == b.data and a.model == b.model
    assert a.train.objective == "at" and a.train.attack.eps == 0.1


def test_equal_compute_epochs_count_passes():
    cfgs = ft._configs(_args())  # plain 5 epochs, FPD 8, fine-tuning 2 epochs of FGSM-RS
    all_phase2 = [{"train/fpd_phase2": 1.0}] * 8
    # FPD: 8 epochs x 2 passes + fine-tuning 2 x 2 = 20; plain 5 x 1; (20 - 5) / 2 = 7.5 -> 8
    assert ft.equal_compute_epochs(cfgs, all_phase2) == 8
    half = [{"train/fpd_phase2": 0.0}] * 4 + [{"train/fpd_phase2": 1.0}] * 4
    # 4 + 8 + 4 - 5 = 11 passes left -> 5.5 -> 6 epochs
    assert ft.equal_compute_epochs(cfgs, half) == 6
    pgd = ft._configs(_args("--ft-attack", "pgd"))  # PGD-10: 11 passes per step
    assert ft.passes_per_step(pgd["plain+at"]) == 11
    assert ft.equal_compute_epochs(pgd, all_phase2) == round((16 + 22 - 5) / 11)


def test_combine_writes_means_and_per_seed_values(tmp_path):
    a = _args("--n-points", "4", "--aa-points", "2", "--steps", "40")
    files = []
    for seed, bits in ((0, "1100"), (1, "1110")):
        rep = _report(4, {})
        better = _report(4, {})  # a model right on every point, against every attack
        rep.outcomes[0].correct = torch.tensor([True] * 4)
        from fortify.evaluate import Outcome

        rep.outcomes.append(Outcome("PGD-40 C&W", torch.tensor([b == "1" for b in bits])))
        rep.outcomes.append(Outcome("AutoAttack", torch.tensor([True, False, True, True])))
        a.seed = seed
        d = ft.outcomes_json(a, {"plain": rep, "fpd": better}, {})
        assert d["rows"]["plain"]["PGD-40 C&W"] == bits
        p = tmp_path / f"s{seed}.json"
        import json

        p.write_text(json.dumps(d))
        files.append(str(p))
    out = tmp_path / "page.md"
    ft.run(_args("--combine", *files, "--results", str(out)))
    text = out.read_text()
    # worst case on all 4 points without AutoAttack: 50 and 75 -> mean 62.5
    assert "**62.5 ± 17.7 (50.0 / 75.0)**" in text
    # first 2 points with AutoAttack: point 1 broken by AutoAttack in both seeds -> 50
    assert "**50.0 ± 0.0 (50.0 / 50.0)**" in text
    # fpd − plain, worst case without AutoAttack: +37.5 points on average
    row = next(ln for ln in text.splitlines() if "plain → fpd | worst case, no AutoAttack" in ln)
    assert "| 4 | +37.5 [" in row
    assert row.endswith("| no detectable difference at this scale |")  # 4 points only


def test_rows_to_train_include_starting_models_and_the_surrogate():
    assert ft.rows_to_train(["fpd+at"]) == ["plain", "fpd", "fpd+at"]
    assert ft.rows_to_train(["plain+at"]) == ["plain", "plain+at"]
    assert ft.rows_to_train(["fpd"]) == ["plain", "fpd"]
    assert ft.rows_to_train(list(ft.ROWS)) == list(ft.ROWS)


def _report(n: int, broken_by: dict[str, list[int]]) -> EvalReport:
    ones = torch.ones(n, dtype=torch.bool)
    outcomes = [Outcome("Natural", ones.clone())]
    for name, idx in broken_by.items():
        c = ones.clone()
        c[idx] = False
        outcomes.append(Outcome(name, c))
    return EvalReport({}, outcomes, [], {})


def test_autoattack_columns_cover_only_the_attacked_points():
    a = _args("--n-points", "10", "--aa-points", "4", "--steps", "40")
    # AutoAttack broke 2 of its 4 points; the 6 unattacked points keep their clean outcome
    rep = _report(10, {"AutoAttack": [0, 1], "PGD-40 C&W": [0, 5, 6, 7]})
    assert pages.subset_accuracy(rep, "AutoAttack", 4) == 50.0
    assert pages.subset_accuracy(rep, "Square", 4) is None
    text = pages.markdown(a, {"fpd": rep}, {"train fpd": 60.0, "eval fpd": 120.0})
    all_points, aa = text.split("## The first 4 points, AutoAttack included (n = 4)")
    assert "AutoAttack" not in all_points.split("| model |")[1].split("\n")[0]
    # all 10 points: clean 100, C&W 60; the worst case leaves AutoAttack out (it ran on 4 of
    # the 10 points): 60, not the 50 that mixing it in would give (points 0,1,5,6,7 broken)
    assert "| fpd | 100.0 | – | – | 60.0 | – | – | – | – | **60.0** |" in all_points
    # first 4 points: clean 100, AutoAttack 50, logits AutoAttack absent, worst case over every
    # column there 50 (C&W also broke point 0)
    assert "| fpd | 100.0 | 50.0 | – | **50.0** |" in aa
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
