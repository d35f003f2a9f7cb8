"""Bad input at the boundary: every case fails with exit code 2 (CLI) or a FortifyError subclass
(API), a message naming the bad value, and no file created, damaged or lost."""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pytest
import torch
from tiny_runs import cli_err as _cli
from tiny_runs import snapshot

from fortify.cli.main import main
from fortify.config import ExperimentConfig, load_config
from fortify.errors import CheckpointError, ConfigError, DataError, FortifyError
from fortify.runs import RunDir, load_model, sidecar_path
from fortify.train import fit

# ----------------------------------------------------------------------------- fortify train


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["model.kwargs={width: 0}"], "width=0"),
        (["model.kwargs={width: -3}"], "width=-3"),
        (["model.kwargs={width: wide}"], "width='wide'"),
        (["model.kwargs={depth: 3}"], r"does not accept.*depth"),
        (["model.name=smal-cnn"], "smal-cnn.*Did you mean: small-cnn"),
        (["seed=18446744073709551617"], "seed.*18446744073709551617"),
        (["seed=-1"], "seed.*-1"),
        (["data.split_seed=99999999999999999999"], "data.split_seed"),
        (["device=tpu"], "'tpu'"),
        (["device=cuda:x"], "'cuda:x'"),
        (["device=cuda:999999999999999999999"], "'cuda:999999999999999999999'"),
        (["train.milestones=[1,"], r"'\[1,'.*not valid YAML"),
        (["train.lr=.nan"], "train.lr.*nan"),
        (["train.lr=.inf"], "train.lr.*inf"),
        (["train.lr=1.0e+400"], "train.lr.*inf"),
        (["train.beta=-.inf"], "train.beta"),
        (["train.options={bogus: 1}"], "bogus.*objective 'at'"),
        (["train.objective=trades", "train.options={trades_init: -1}"], "trades_init.*-1"),
        (["data.name=imagenet-foo"], "imagenet-foo"),
        (["data.train_subset=0"], "train_subset.*0"),
        (["data.crop_padding=-2"], "crop_padding.*-2"),
        (["train.trainable=[nothing]"], "nothing"),
        (["name=../escape"], "../escape"),
        ([".lr=0.1"], "'.lr'"),
        (["train.lr"], "train.lr"),
        (["eval.batch_size=0"], "eval.batch_size.*0"),
    ],
)
def test_train_bad_config_exits_2_and_creates_nothing(
    tmp_path: Path, tiny: Path, capsys: pytest.CaptureFixture, overrides: list[str], words: str
) -> None:
    run = tmp_path / "run"
    rc, err = _cli(capsys, "train", "--config", str(tiny), "--run-dir", str(run), *overrides)
    assert rc == 2, err
    assert err.startswith("fortify train: error: ")
    assert re.search(words, err), err
    assert "Traceback" not in err
    assert not run.exists()  # validated before anything was written
    assert not (tmp_path / "runs").exists() and not (tmp_path.parent / "escape").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_train_on_a_missing_gpu(
    tmp_path: Path, tiny: Path, capsys: pytest.CaptureFixture, device: str
) -> None:
    run = tmp_path / "run"
    rc, err = _cli(
        capsys, "train", "--config", str(tiny), "--run-dir", str(run), f"device={device}"
    )
    assert rc == 2 and f"'{device}'" in err and "no usable CUDA GPU" in err
    assert not run.exists()


@pytest.mark.parametrize(
    "content, words",
    [
        (b"\xff\xfe\x00bad: [", "not UTF-8 text"),
        (b"base: 5\n", "base must be.*got 5"),
        (b"base: [a]\n", r"base must be.*\['a'\]"),
        (b"base: missing.yaml\n", "base 'missing.yaml' does not exist"),
        (b"- 1\n- 2\n", "mapping at the top level"),
        (b"train: {lr: [\n", "not valid YAML"),
        (b"!!python/object/apply:os.system ['touch PWNED']\n", "not valid YAML"),
        (b"train: 5\n", "train: expected a mapping"),
        (b"1: 2\n", "top-level keys.*got 1"),
    ],
)
def test_train_bad_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture, content: bytes, words: str, monkeypatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "bad.yaml"
    cfg.write_bytes(content)
    rc, err = _cli(capsys, "train", "--config", str(cfg), "--run-dir", str(tmp_path / "run"))
    assert rc == 2 and re.search(words, err), err
    assert str(cfg) in err or "bad.yaml" in err
    assert not (tmp_path / "run").exists() and not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize(
    "env, words",
    [
        ({"FORTIFY_THREADS": "abc"}, "FORTIFY_THREADS='abc'"),
        ({"FORTIFY_THREADS": "0"}, "FORTIFY_THREADS='0'"),
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two'"),
        ({"WORLD_SIZE": "2", "RANK": "0"}, "WORLD_SIZE=2.*MASTER_ADDR.*torchrun"),
        (
            {"WORLD_SIZE": "2", "RANK": "5", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"},
            "RANK=5.*WORLD_SIZE=2",
        ),
        ({"RANK": "-1"}, "RANK='-1'"),
        ({"LOCAL_RANK": "x"}, "LOCAL_RANK='x'"),
    ],
)
def test_train_bad_environment(
    tmp_path: Path, tiny: Path, capsys: pytest.CaptureFixture, monkeypatch, env, words
) -> None:
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    threads = torch.get_num_threads()
    rc, err = _cli(capsys, "train", "--config", str(tiny), "--run-dir", str(tmp_path / "run"))
    assert rc == 2 and re.search(words, err), err
    assert torch.get_num_threads() == threads
    assert not (tmp_path / "run").exists()


def test_resume_of_a_damaged_run_is_refused_and_keeps_the_files(
    tmp_path: Path, tiny: Path, capsys: pytest.CaptureFixture
) -> None:
    run = tmp_path / "run"
    cfg = load_config(ExperimentConfig, tiny, [])

    def stop(epoch, record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(cfg, run, progress=False, callbacks=[stop])
    last = run / "checkpoints" / "last.safetensors"
    state = run / "checkpoints" / "last.state-1.pt"  # epochs are numbered from 1
    good_state = state.read_bytes()

    # a valid torch.save dict that lacks keys
    torch.save({"epoch": 1, "optimizer": {}}, state)
    before = snapshot(run)
    rc, err = _cli(capsys, "train", "--resume", str(run))
    assert rc == 2 and "lacks" in err and "schedule" in err and "--overwrite" in err, err
    assert snapshot(run) == before

    # a state whose values have the wrong types
    state.write_bytes(good_state)
    loaded = torch.load(state, weights_only=True)
    loaded["history"] = "all of it"
    torch.save(loaded, state)
    before = snapshot(run)
    rc, err = _cli(capsys, "train", "--resume", str(run))
    assert rc == 2 and "'history' must be a list" in err, err
    assert snapshot(run) == before

    # a sidecar whose epoch is not a number (its hash still matches: only the sidecar changed)
    state.write_bytes(good_state)
    side = sidecar_path(last)
    meta = json.loads(side.read_text())
    meta["epoch"] = "zero"
    side.write_text(json.dumps(meta))
    before = snapshot(run)
    rc, err = _cli(capsys, "train", "--resume", str(run))
    assert rc == 2 and "'zero'" in err and "epoch" in err, err
    assert snapshot(run) == before

    # put the sidecar back: the run resumes and finishes
    meta["epoch"] = 1
    side.write_text(json.dumps(meta))
    rc, err = _cli(capsys, "train", "--resume", str(run))
    assert rc == 0, err
    assert [r["epoch"] for r in RunDir(run).read_metrics()] == [1, 2]


# ----------------------------------------------------------------------------- fortify eval


@pytest.mark.parametrize(
    "args, words",
    [
        (["--device", "tpu"], "'tpu'"),
        (["--device", "cuda:7"], "'cuda:7'"),
        (["--tag", "../../other/checkpoints/last"], "bad checkpoint tag '../../other"),
        (["--tag", "/etc/passwd"], "bad checkpoint tag '/etc/passwd'"),
        (["--suite", "quikc"], "quikc.*Did you mean: quick"),
        (["--seed", "-5"], "--seed.*-5"),
        (["--eps", "nan"], "--eps.*nan"),
        (["--eps", "-0.1"], "--eps.*-0.1"),
        (["--batch-size", "0"], "--batch-size.*0"),
        (["--n-points", "0"], "--n-points.*0"),
        (["--aa-points", "0"], "--aa-points.*0"),
    ],
)
def test_eval_bad_options(
    finished_run: Path, capsys: pytest.CaptureFixture, args: list[str], words: str
) -> None:
    before = snapshot(finished_run)
    rc, err = _cli(capsys, "eval", str(finished_run), "--suite", "quick", "--n-points", "8", *args)
    assert rc == 2 and re.search(words, err), err
    assert snapshot(finished_run) == before


def test_eval_tag_cannot_leave_the_run(finished_run: Path, capsys: pytest.CaptureFixture) -> None:
    # a sibling run whose checkpoint the traversal would reach
    other = finished_run.parent / "other"
    (other / "checkpoints").mkdir(parents=True, exist_ok=True)
    for name in ("last.safetensors", "last.json"):
        (other / "checkpoints" / name).write_bytes(
            (finished_run / "checkpoints" / name).read_bytes()
        )
    rc, err = _cli(
        capsys,
        "eval",
        str(finished_run),
        "--suite",
        "quick",
        "--tag",
        "../../other/checkpoints/last",
    )
    assert rc == 2 and "bad checkpoint tag" in err
    with pytest.raises(CheckpointError, match="bad checkpoint tag"):
        load_model(finished_run, tag="../../other/checkpoints/last")


def test_eval_checks_the_report_folder_before_evaluating(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    import fortify.evaluate

    def never(*a, **k):
        raise AssertionError("evaluate() ran although the report folder is unusable")

    monkeypatch.setattr(fortify.evaluate, "evaluate", never)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    rc, err = _cli(
        capsys, "eval", str(finished_run), "--suite", "quick", "--out", str(blocker / "reports")
    )
    assert rc == 2 and str(blocker) in err and "is a file" in err, err
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_eval_on_a_missing_gpu(finished_run: Path, capsys: pytest.CaptureFixture) -> None:
    rc, err = _cli(capsys, "eval", str(finished_run), "--device", "cuda")
    assert rc == 2 and "'cuda'" in err and "no usable CUDA GPU" in err


# ----------------------------------------------------------------------------- fortify import


@pytest.mark.parametrize(
    "args, words",
    [
        (["--image-size", "0"], "--image-size.*0"),
        (["--image-size", "-32"], "--image-size.*-32"),
        (["--dataset", "imagenet-foo"], "imagenet-foo"),
        (["--num-classes", "0"], "--num-classes.*0"),
        (["--tau", "nan"], "--tau.*nan"),
    ],
)
def test_import_bad_options(
    tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], words: str
) -> None:
    from fortify.models import create

    src = tmp_path / "release.pth"
    torch.save(create("resnet18", 10, 3, width=4).state_dict(), src)
    out = tmp_path / "imported"
    rc, err = _cli(
        capsys, "import", "fsr-release", str(src), "--arch", "resnet18", "--out", str(out), *args
    )
    assert rc == 2 and re.search(words, err), err
    assert not out.exists()


# ----------------------------------------------------------------------------- Python API


def test_create_refuses_bad_sizes() -> None:
    from fortify.models import create

    for kwargs, words in [
        (dict(num_classes=0), "num_classes.*0"),
        (dict(num_classes=-2), "num_classes.*-2"),
        (dict(num_classes=2.5), "num_classes.*2.5"),
        (dict(in_channels=0), "in_channels.*0"),
    ]:
        with pytest.raises(ConfigError, match=words):
            create("small-cnn", **kwargs)
    with pytest.raises(ConfigError, match="dropout=nan"):
        create("wide-resnet", 10, 3, depth=10, widen=1, dropout=float("nan"))


def test_load_model_names_a_missing_target(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such run directory or checkpoint.*nonexistent"):
        load_model(tmp_path / "nonexistent" / "dir")
    with pytest.raises(CheckpointError, match="no such run"):
        load_model(tmp_path / "missing.safetensors")


def test_load_config_api_refuses_non_finite_and_bad_types() -> None:
    for override, words in [
        ("train.attack.eps=.nan", "train.attack.eps.*nan"),
        ("eval.eps=.inf", "eval.eps.*inf"),
        ("model.mean=[.nan]", r"model.mean\[0\].*nan"),
        ("train.options={1: 2}", "option names must be strings"),
        ("device=5", "device"),
    ]:
        with pytest.raises(ConfigError, match=words):
            load_config(ExperimentConfig, None, [override])


def test_corrupt_gzip_idx_is_a_data_error(tmp_path: Path) -> None:
    from fortify.data.readers.mnist import read_idx

    good = gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 4, 1, 2, 3, 4]))
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(good[:12] + b"\x00" * 8 + good[20:])  # corrupt the deflate stream
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz.*corrupt"):
        read_idx(path)
    path.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(DataError, match="not a readable"):
        read_idx(path)


def test_decompression_bomb_image_is_refused(tmp_path: Path, monkeypatch) -> None:
    from PIL import Image

    from fortify.data import load_dataset

    root = tmp_path / "folder"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(d / f"{i}.png")
    Image.new("RGB", (64, 64)).save(root / "train" / "a" / "bomb.png")
    # The same code path as a real bomb (> 2 × MAX_IMAGE_PIXELS pixels), at test scale.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(DataError, match="bomb.png.*decompression bomb"):
        load_dataset("image-folder", str(root), val_size=0, image_size=8, cache_dir=False)


def test_every_fortify_error_reaches_the_user_as_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert issubclass(CheckpointError, FortifyError)
    rc, err = _cli(capsys, "eval", str(tmp_path / "nothing-here"))
    assert rc == 2 and "nothing-here" in err and "does not exist" in err


def test_unexpected_errors_get_a_short_message_and_debug_shows_the_traceback(
    tmp_path: Path, tiny: Path, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    import fortify.cli.cmd_train as cmd_train

    def boom(args):
        raise ZeroDivisionError("an internal slip")

    monkeypatch.setattr(cmd_train, "run", boom)
    rc, err = _cli(capsys, "train", "--config", str(tiny))
    assert rc == 1
    assert "unexpected error: ZeroDivisionError: an internal slip" in err
    assert "--debug" in err and "Traceback" not in err
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "train", "--config", str(tiny)])
    with pytest.raises(ZeroDivisionError):
        main(["train", "--config", str(tiny), "--debug"])


@pytest.mark.parametrize(
    "argv, words",
    [
        (["report", "{run}", "--out", "{file}/x.md"], "is a file, not a folder"),
        (["report", "{run}", "--out", "{tmp}"], "is a folder"),
        (["analyze", "{run}", "--out", "{file}/out"], "is a file, not a folder"),
        (["analyze", "{run}", "--steps", "0"], "--steps.*0"),
        (["analyze", "{run}", "--points", "-1"], "--points.*-1"),
        (["rift", "run", "{run}", "--out", "{file}/out"], "is a file, not a folder"),
        (["rift", "run", "{run}", "--tag", "../x"], "bad checkpoint tag '../x'"),
        (["demo", "--run-dir", "{file}/demo"], "is a file, not a folder"),
    ],
)
def test_other_commands_check_their_outputs_first(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture, argv, words
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    fill = {"run": str(finished_run), "file": str(blocker), "tmp": str(tmp_path)}
    before = snapshot(finished_run)
    rc, err = _cli(capsys, *[a.format(**fill) for a in argv])
    assert rc == 2 and re.search(words, err), err
    assert "Traceback" not in err and "unexpected error" not in err
    assert snapshot(finished_run) == before and blocker.read_text() == "x"


def test_file_system_refusals_are_exit_2_with_the_path(
    tmp_path: Path, tiny: Path, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    import fortify.cli.cmd_train as cmd_train

    def refuse(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "secret"))

    monkeypatch.setattr(cmd_train, "run", refuse)
    rc, err = _cli(capsys, "train", "--config", str(tiny))
    assert rc == 2 and "secret" in err and "Permission denied" in err


def test_attach_refuses_bad_arguments() -> None:
    from fortify.defenses import attach
    from fortify.models import create

    model = create("small-cnn", 10, 1, width=4)

    def factory(shape):
        return torch.nn.Identity()

    for kwargs, words in [
        (dict(defence=factory, at=5, input_shape=(1, 8, 8)), "at must be.*5"),
        (dict(defence=factory, at=["nope"], input_shape=(1, 8, 8)), "nope"),
        (dict(defence=factory, at=[], input_shape=(1, 8, 8)), "at least one"),
        (
            dict(defence=factory, at=["features"], input_shape=(1, 0, 8)),
            r"input_shape.*\(1, 0, 8\)",
        ),
        (dict(defence=5, at=["features"], input_shape=(1, 8, 8)), "defence must be.*int"),
    ]:
        with pytest.raises(FortifyError, match=words):
            attach(model, **kwargs)
