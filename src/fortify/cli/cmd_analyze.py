"""``fortify analyze RUN --what params|flops|features|masks``: cost and FSR feature analyses."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

NAME = "analyze"
HELP = "parameter/FLOP counts and feature analyses of a run"
DESCRIPTION = (
    "Analyse a trained run or checkpoint. params/flops: cost with and without the attached "
    "defences (FLOPs = 2 x multiply-adds, torch.utils.flop_counter). features: accuracy and "
    "weighted k-NN accuracy of FSR's f+, f-, recalibrated f- and f+ + recalibrated f- under the "
    "slides' attacks (Ensemble and AutoAttack; --attack pgd for PGD only). "
    "masks: PNG of FSR masks / robustness maps for a few test images. selection: the CAS/CIFS "
    "gradient-masking check (PGD on true-label-selection and differentiable-mask variants, "
    "transferred to the model, vs direct PGD). Results go to RUN/reports/ (or --out). With "
    "--compare CONFIG... (no RUN) it prints a Table-7-style cost comparison of the models the "
    "configs describe (untrained; cost does not depend on weights)."
)
WHATS = ("params", "flops", "features", "masks", "selection")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run",
        nargs="?",
        help="run directory or checkpoint (.safetensors with JSON sidecar); or use --model",
    )
    parser.add_argument(
        "--compare",
        nargs="+",
        metavar="CONFIG",
        help="experiment configs to compare by parameters/FLOPs (instead of RUN); input shape "
        "from --input-shape (default 3 32 32), classes from --num-classes (default 10)",
    )
    parser.add_argument(
        "--what", choices=WHATS, action="append", help="analysis (repeatable); default params+flops"
    )
    parser.add_argument(
        "--layers",
        action="store_true",
        help="list the modules a defence can attach after (defenses[].at), with feature shapes",
    )
    parser.add_argument(
        "--all-layers", action="store_true", help="with --layers: list every module, marked"
    )
    from fortify.cli._source import add_source_arguments

    add_source_arguments(parser)
    parser.add_argument(
        "--input-shape",
        type=int,
        nargs=3,
        metavar=("C", "H", "W"),
        default=None,
        help="with --model and no --dataset: input image shape",
    )
    parser.add_argument(
        "--num-classes", type=int, default=None, help="with --model and no --dataset: classes"
    )
    parser.add_argument(
        "--tag", default=None, help="checkpoint tag in a run dir (default: best, else last/final)"
    )
    parser.add_argument(
        "--block", default=None, help="FSR block (module it follows); default the deepest"
    )
    parser.add_argument(
        "--eps", type=float, default=None, help="L-inf radius (default: the config's / dataset's)"
    )
    parser.add_argument(
        "--attack",
        choices=("paper", "ensemble", "autoattack", "pgd"),
        default="paper",
        help="features: classification attacks; paper = Ensemble + AutoAttack as the FSR slides "
        "(default), pgd = PGD-<steps> with random start (cheap)",
    )
    parser.add_argument(
        "--steps", type=int, default=20, help="PGD steps (k-NN queries, masks, --attack pgd)"
    )
    parser.add_argument("--points", type=int, default=1000, help="test images for features")
    parser.add_argument(
        "--memory", type=int, default=5000, help="training images in the k-NN memory"
    )
    parser.add_argument(
        "--k", type=int, action="append", help="k of weighted k-NN (repeatable; default 5 and 20)"
    )
    parser.add_argument("--images", type=int, default=6, help="images in the mask figure")
    parser.add_argument("--data-root", default=None, help="dataset folder (default: the config's)")
    parser.add_argument("--out", default=None, help="folder for reports (default RUN/reports)")
    parser.add_argument("--device", default="cpu")


def _resolve(run: str, tag: str | None) -> tuple[Path, str | None]:
    from fortify.errors import FortifyError

    p = Path(run)
    if not p.exists():
        raise FortifyError(
            f"{run!r} does not exist; pass a run directory or a .safetensors checkpoint"
        )
    if p.is_file():
        return p, None
    if tag is not None:
        return p, tag
    for t in ("best", "last", "final"):
        if (p / "checkpoints" / f"{t}.safetensors").is_file():
            return p, t
    raise FortifyError(f"run {run!r} has no best/last/final checkpoint; pass --tag")


def run(args: argparse.Namespace) -> int:
    from fortify.config import ExperimentConfig, from_dict
    from fortify.errors import ConfigError, FortifyError
    from fortify.runs import load_model, write_json_atomic, write_text_atomic
    from fortify.utils.atomic import check_writable_dir

    counts = (
        ("--steps", args.steps),
        ("--points", args.points),
        ("--images", args.images),
        ("--memory", args.memory),
    )
    for flag, value in counts:
        if value < 1:
            raise ConfigError(f"{flag} must be an integer >= 1, got {value}")
    bad_k = [k for k in args.k or [] if not 1 <= k <= args.memory]
    if bad_k:
        raise ConfigError(
            f"--k must be an integer in [1, --memory={args.memory}] (neighbours among the "
            f"memory images), got {bad_k[0]}"
        )
    if args.eps is not None and not (math.isfinite(args.eps) and 0 < args.eps <= 1):
        raise ConfigError(
            f"--eps must be a number in (0, 1] (L∞ radius in pixel units), got {args.eps}"
        )
    if args.out:
        check_writable_dir(args.out, "report folder (--out)")
    if args.compare:
        return _compare(args)
    whats = args.what or ([] if args.layers else ["params", "flops"])
    if args.model is not None:
        model, meta = _source_model(args)
        cfg = from_dict(ExperimentConfig, meta["config"])
        out = Path(args.out) if args.out else Path("runs") / cfg.name / "reports"
    else:
        if args.run is None:
            raise FortifyError("give RUN (a run directory or checkpoint) or --model SOURCE")
        path, tag = _resolve(args.run, args.tag)
        model, meta = load_model(path, tag=tag or "best", device=args.device)
        cfg = from_dict(ExperimentConfig, meta["config"])
        out = Path(args.out) if args.out else (path / "reports" if path.is_dir() else path.parent)
    # a layer listing of a model that is not a run is only printed, unless --out is given
    write = bool(whats) or args.model is None or args.out is not None
    # No mkdir here: each report writer creates the folder when it has a file to write, and the
    # inputs are checked first, so a command that fails validation leaves nothing on disk.
    shape = tuple(meta["image_shape"])
    splits, eps = _checked_data_inputs(args, whats, model, meta, cfg)
    results: dict[str, Any] = {}
    if args.layers:
        from fortify.analysis.layers import layers_table, list_layers

        layers = list_layers(model, shape)
        table = layers_table(layers, all_layers=args.all_layers)
        results["layers"] = [x.as_dict() for x in layers]
        print(f"modules a defence can attach after (input {'x'.join(map(str, shape))}):")
        print(table)
        if write:
            write_text_atomic(out / "layers.md", table + "\n")

    if "params" in whats or "flops" in whats:
        from fortify.analysis.cost import cost_report

        cost = cost_report(model, shape)
        results["cost"] = cost.as_dict()
        print(cost.table())
        write_text_atomic(out / "cost.md", cost.table() + "\n")

    if splits is not None:
        if "features" in whats:
            from fortify.analysis.features import feature_analysis

            x, y = splits.test.head(args.points).floats()
            xm, ym = splits.train.head(args.memory).floats()
            rep = feature_analysis(
                model, x, y, xm, ym, num_classes=int(meta["num_classes"]), eps=eps,
                attack=args.attack, steps=args.steps, ks=tuple(args.k or (5, 20)), block=args.block,
                seed=cfg.eval.seed,
            )  # fmt: skip
            results["features"] = rep.as_dict()
            print(f"classification attack: {rep.attack}")
            print(rep.table())
            write_text_atomic(out / "fsr_features.md", rep.table() + "\n")
        if "selection" in whats:
            from fortify.analysis.selection import SelectionCheckOptions, selection_check

            x, y = splits.test.head(args.points).floats()
            opts = SelectionCheckOptions(eps=eps, steps=args.steps, seed=cfg.eval.seed)
            results["selection"] = sel = selection_check(model, x, y, opts)
            lines = [
                f"direct PGD-{args.steps}: {sel['direct']:.2f} % (natural {sel['natural']:.2f} %,"
                f" n = {sel['n']})"
            ]
            for name, v in sel["variants"].items():
                lines.append(
                    f"{name} variant -> model: {v['transfer']:.2f} %, worst case "
                    f"{v['worst']:.2f} %, transfer - direct {v['difference']['text']} "
                    f"({v['difference']['verdict']}) [{v['status']}]"
                )
            print("\n".join(lines))
            write_text_atomic(out / "selection_check.md", "\n".join(lines) + "\n")
        if "masks" in whats:
            from fortify.analysis.features import pgd_batches
            from fortify.analysis.masks import plot_masks

            x, y = splits.test.head(args.images).floats()
            x_adv = pgd_batches(model, x, y, eps, args.steps, 256, cfg.eval.seed)
            png = out / "fsr_masks.png"
            results["masks"] = plot_masks(
                model, x, x_adv, y, png, block=args.block, class_names=splits.classes or None,
                title=f"FSR masks at {args.block or 'the FSR block'} — clean vs PGD-{args.steps} "
                f"L∞ ε={eps:.3g} (first {len(x)} test images)",
            )  # fmt: skip
            print(f"wrote {png}")
            print(json.dumps(results["masks"], indent=1))
    if write:
        write_json_atomic(out / "analysis.json", results)
    return 0


def _checked_data_inputs(
    args: argparse.Namespace, whats: list[str], model: Any, meta: dict[str, Any], cfg: Any
) -> tuple[Any, float]:
    """For the analyses on data (features, masks, selection): the dataset and ε, after every
    check of their inputs (data root, FSR / CAS / CIFS block, attack, options) passed — before
    any work is done or any file written. ``(None, 0.0)`` when no such analysis is asked for."""
    if not any(w in whats for w in ("features", "masks", "selection")):
        return None, 0.0
    from fortify.data import load_dataset

    splits = load_dataset(
        cfg.data.name,
        args.data_root or cfg.data.root,
        val_size=cfg.data.val_size,
        split_seed=cfg.data.split_seed,
    )
    eps = args.eps if args.eps is not None else (cfg.eval.eps or splits.default_eps)
    if "features" in whats:
        from fortify.analysis.features import check_feature_analysis

        check_feature_analysis(
            model, num_classes=int(meta["num_classes"]), attack=args.attack, block=args.block
        )
    if "masks" in whats:
        from fortify.analysis.features import pick_block

        pick_block(model, args.block)
    if "selection" in whats:
        from fortify.analysis.selection import SelectionCheckOptions, check_selection_model

        SelectionCheckOptions(eps=eps, steps=args.steps, seed=cfg.eval.seed).validate()
        check_selection_model(model)
    return splits, eps


def _compare(args: argparse.Namespace) -> int:
    from fortify.analysis.cost import cost_table
    from fortify.config import ExperimentConfig, load_config
    from fortify.errors import FortifyError
    from fortify.factory import build_model
    from fortify.runs import write_text_atomic

    if args.run is not None or args.model is not None:
        raise FortifyError("--compare takes configs only; drop RUN / --model")
    shape = tuple(args.input_shape) if args.input_shape is not None else (3, 32, 32)
    classes = args.num_classes if args.num_classes is not None else 10
    if min(shape) < 1 or classes < 2:
        raise FortifyError(
            f"--input-shape {list(shape)} must be positive and --num-classes {classes} >= 2"
        )
    models = {}
    for path in args.compare:
        cfg = load_config(ExperimentConfig, path)
        models[cfg.name] = build_model(cfg.model, cfg.defenses, classes, shape)
    table = cost_table(models, shape)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "cost_comparison.md", table + "\n")
    return 0


def _source_model(args: argparse.Namespace) -> tuple[Any, ...]:
    """``--model SOURCE`` with ``--dataset`` or ``--input-shape C H W --num-classes K``."""
    from fortify.cli._source import build_source_model
    from fortify.errors import ConfigError

    if args.run is not None:
        raise ConfigError("give either RUN or --model, not both")
    if args.dataset:
        from fortify.data import load_from_config

        data = {"name": args.dataset, "root": args.data_root}
        splits = load_from_config(data, subsets=False)
        return build_source_model(args, splits.num_classes, tuple(splits.image_shape), data)
    if args.input_shape is None or args.num_classes is None:
        raise ConfigError(
            "--model needs --dataset NAME, or --input-shape C H W and --num-classes K"
        )
    if min(args.input_shape) < 1 or args.num_classes < 1:
        raise ConfigError(
            f"--input-shape {args.input_shape} and --num-classes {args.num_classes} must be >= 1"
        )
    return build_source_model(args, args.num_classes, tuple(args.input_shape), {})
