"""Two-process DistributedDataParallel (gloo, CPU) through the real CLI under torchrun."""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from fortify.runs import RunDir, load_model


def test_two_process_gloo_run_trains_and_rank0_checkpoint_loads(tmp_path):
    run_dir = tmp_path / "ddp"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        "--standalone", "-m", "fortify.cli.main", "train",
        "--run-dir", str(run_dir), "--no-progress",
        "data.name=digits", "data.val_size=300", "data.train_subset=400",
        "model.kwargs={width: 4}", "device=cpu", "train.epochs=2", "train.batch_size=64",
        "train.objective=trades", "train.attack.eps=0.1", "train.attack.step_size=0.05",
        "train.attack.steps=2", "train.val_points=60", "train.val_attack_steps=2",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170, env=env)
    errors = [ln for ln in proc.stderr.splitlines() if "Error" in ln or "error:" in ln]
    assert proc.returncode == 0, "\n".join(errors[-20:]) or proc.stderr[-3000:]
    assert proc.stdout.count("run: ") == 1  # only rank 0 reports
    records = RunDir(run_dir).read_metrics()
    assert [r["epoch"] for r in records] == [0, 1]  # rank 0 logs once per epoch
    assert records[-1]["train/samples"] == 400  # two shards of 200 cover the subset
    assert records[-1]["val/n"] == 60  # sharded validation, counts all-reduced
    model, meta = load_model(run_dir, tag="last")
    assert meta["world_size"] == 2 and meta["epoch"] == 1
    x = torch.rand(4, 1, 8, 8)
    assert model(x).shape == (4, 10)
    assert RunDir(run_dir).state == "finished"
