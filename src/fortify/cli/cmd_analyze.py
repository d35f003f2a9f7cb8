"""``fortify analyze RUN --what params|flops|features|masks``: cost and FSR feature analyses."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NAME = "analyze"
HELP = "parameter/FLOP counts and feature analyses of a run"
DESCRIPTION = (
    "Analyse a trained run or checkpoint. params/flops: cost with and without the attached "
    "defences (FLOPs = 2 x multiply-adds, torch.utils.flop_counter). features: accuracy and "
    "weighted k-NN accuracy of FSR's f+, f-, recalibrated f- and f+ + recalibrated f- under PGD. "
    "masks: PNG of FSR masks / robustness maps for a few test images. selection: the CAS/CIFS "
    "gradient-masking check (PGD on true-label-selection and differentiable-mask variants, "
    "transferred to the model, vs direct PGD). Results go to "
    "RUN/reports/ (or --out). With --compare CONFIG... (no RUN) it prints a Table-7-style cost "
    "comparison of the models the configs describe (untrained; cost does not depend on weights)."
)
WHATS = ("params", "flops", "features", "masks", "selection")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run", nargs="?", help="run directory or checkpoint (.safetensors with JSON sidecar)"
    )
    parser.add_argument(
        "--compare",
        nargs="+",
        metavar="CONFIG",
        help="experiment configs to compare by parameters/FLOPs (instead of RUN)",
    )
    parser.add_argument(
        "--input-shape", default="3,32,32", help="C,H,W for --compare (default 3,32,32)"
    )
    parser.add_argument("--classes", type=int, default=10, help="classes for --compare")
    parser.add_argument(
        "--what", choices=WHATS, action="append", help="analysis (repeatable); default params+flops"
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
    parser.add_argument("--steps", type=int, default=20, help="PGD steps for features/masks")
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
    from fortify.errors import FortifyError
    from fortify.runs import load_model, write_json_atomic, write_text_atomic

    if args.compare:
        return _compare(args)
    if args.run is None:
        raise FortifyError("pass a run directory/checkpoint, or --compare CONFIG [CONFIG ...]")
    whats = args.what or ["params", "flops"]
    path, tag = _resolve(args.run, args.tag)
    model, meta = load_model(path, tag=tag or "best", device=args.device)
    shape = tuple(meta["image_shape"])
    cfg = from_dict(ExperimentConfig, meta["config"])
    out = Path(args.out) if args.out else (path / "reports" if path.is_dir() else path.parent)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}

    if "params" in whats or "flops" in whats:
        from fortify.analysis.cost import cost_report

        rep = cost_report(model, shape)
        results["cost"] = rep.as_dict()
        print(rep.table())
        write_text_atomic(out / "cost.md", rep.table() + "\n")

    if "features" in whats or "masks" in whats or "selection" in whats:
        from fortify.data import load_dataset

        splits = load_dataset(
            cfg.data.name,
            args.data_root or cfg.data.root,
            val_size=cfg.data.val_size,
            split_seed=cfg.data.split_seed,
        )
        eps = args.eps or cfg.eval.eps or splits.default_eps
        if "features" in whats:
            from fortify.analysis.features import feature_analysis

            x, y = splits.test.head(args.points).floats()
            xm, ym = splits.train.head(args.memory).floats()
            rep = feature_analysis(
                model, x, y, xm, ym, num_classes=int(meta["num_classes"]), eps=eps,
                steps=args.steps, ks=tuple(args.k or (5, 20)), block=args.block, seed=cfg.eval.seed,
            )  # fmt: skip
            results["features"] = rep.as_dict()
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

            if args.images < 1:
                raise FortifyError(f"--images must be >= 1, got {args.images}")
            x, y = splits.test.head(args.images).floats()
            x_adv = pgd_batches(model, x, y, eps, args.steps, 256, cfg.eval.seed)
            png = out / "fsr_masks.png"
            results["masks"] = plot_masks(
                model, x, x_adv, y, png, block=args.block, class_names=splits.classes or None
            )
            print(f"wrote {png}")
            print(json.dumps(results["masks"], indent=1))
    write_json_atomic(out / "analysis.json", results)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from fortify.analysis.cost import cost_table
    from fortify.config import ExperimentConfig, load_config
    from fortify.errors import FortifyError
    from fortify.factory import build_model
    from fortify.runs import write_text_atomic

    if args.run is not None:
        raise FortifyError("--compare takes configs only; drop the RUN argument")
    try:
        shape = tuple(int(v) for v in args.input_shape.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise FortifyError(f"--input-shape must be C,H,W (e.g. 3,32,32), got {args.input_shape!r}")
    if args.classes < 2:
        raise FortifyError(f"--classes must be >= 2, got {args.classes}")
    models = {}
    for path in args.compare:
        cfg = load_config(ExperimentConfig, path)
        models[cfg.name] = build_model(cfg.model, cfg.defenses, args.classes, shape)  # type: ignore[arg-type]
    table = cost_table(models, shape)  # type: ignore[arg-type]
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "cost_comparison.md", table + "\n")
    return 0
