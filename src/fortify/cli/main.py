"""Entry point of the ``fortify`` command.

Each subcommand is a module ``fortify.cli.cmd_<name>`` listed in ``COMMANDS`` and exposing
``DESCRIPTION``, ``add_arguments(parser)`` and ``run(args) -> int``; it is imported when the
parser is built (a missing or broken module is an error, never a silently absent command). The
plug-in commands under ``import``, ``export`` and ``replicate`` are the ``PLUGINS`` registries of
their packages (:func:`fortify.registry.plugin_registry`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import signal
import sys
from typing import Any

from fortify import __version__
from fortify.cli._help import HelpFormatter
from fortify.errors import FortifyError

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "fortify.cli.cmd_demo",
        "train and evaluate a small model in minutes (the newcomer path)",
    ),
    "train": (
        "fortify.cli.cmd_train",
        "train a model from a config (standard, AT, TRADES, MART, +defences)",
    ),
    "eval": ("fortify.cli.cmd_eval", "evaluate a run, checkpoint or model with an attack suite"),
    "report": ("fortify.cli.cmd_report", "put the evaluation tables of several runs side by side"),
    "compare": (
        "fortify.cli.cmd_compare",
        "paired comparison of two evaluations: B − A per column with CI, McNemar p, verdict",
    ),
    "rift": (
        "fortify.cli.cmd_rift",
        "robust critical fine-tuning: mrc, finetune, interpolate, run",
    ),
    "import": (
        "fortify.cli.cmd_import",
        "import released checkpoints (fsr-release, rift-release, robustbench)",
    ),
    "export": ("fortify.cli.cmd_export", "write a run in another tool's layout (robustbench)"),
    "analyze": ("fortify.cli.cmd_analyze", "parameter/FLOP counts and feature analyses of a run"),
    "replicate": ("fortify.cli.cmd_replicate", "CPU-scale replications of the papers' tables"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fortify",
        description="Make image classifiers robust to adversarial examples; measure it honestly.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fortify {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the full Python traceback of an unexpected error (report it with it)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(
            name,
            help=help_text,
            description=getattr(mod, "DESCRIPTION", help_text),
            formatter_class=HelpFormatter,
        )
        mod.add_arguments(p)
        p.add_argument(  # also accepted after the subcommand; SUPPRESS keeps the top-level value
            "--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
        )
        p.set_defaults(_module=module)
    return parser


def _quiet_file_size_signal() -> None:
    """A write past ``ulimit -f`` then fails with an ``OSError`` (EFBIG) that fortify reports,
    instead of SIGXFSZ killing the process without a word."""
    sig = getattr(signal, "SIGXFSZ", None)
    if sig is not None:
        with contextlib.suppress(ValueError, OSError):  # not the main thread
            signal.signal(sig, signal.SIG_IGN)


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a scheduler's stop, ``docker stop``) as an exception: the command
    stops as after Ctrl-C — a training run is marked failed, its lock released, no temporary
    file left — and exits with 143 (128 + SIGTERM)."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def _stop_gracefully_on_sigterm() -> Any:
    """Install the SIGTERM handler when SIGTERM has its default action; return what to put
    back afterwards (None: nothing was changed).

    Not under ``torchrun``: its agent stops the other workers with SIGTERM when one fails, and
    a worker waiting in a collective for the failed one would only see the exception when the
    collective times out."""
    sig = getattr(signal, "SIGTERM", None)
    if sig is None or signal.getsignal(sig) is not signal.SIG_DFL:
        return None
    if "TORCHELASTIC_RUN_ID" in os.environ or os.environ.get("WORLD_SIZE", "1") != "1":
        return None
    try:
        return signal.signal(sig, _raise_terminated)
    except (ValueError, OSError):  # not the main thread
        return None


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_file_size_signal()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    mod = importlib.import_module(args._module)
    previous = _stop_gracefully_on_sigterm()
    try:
        return _run(args, mod)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace, mod: Any) -> int:
    try:
        from fortify.utils.runtime import configure_threads

        configure_threads()  # FORTIFY_THREADS, checked and applied for every command
        return int(mod.run(args) or 0)
    except FortifyError as exc:
        print(f"fortify {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # the file system refused (full disk, permissions, a file in the way)
        if args.debug or os.environ.get("FORTIFY_DEBUG", "") not in ("", "0"):
            raise
        where = f" {exc.filename}" if exc.filename else ""
        print(
            f"fortify {args.command}: error: cannot use{where}: {exc.strerror or exc}",
            file=sys.stderr,
        )
        return 2
    except Exception as exc:  # noqa: BLE001 - the last line of defence, see docs/cli.md
        if args.debug or os.environ.get("FORTIFY_DEBUG", "") not in ("", "0"):
            raise
        print(
            f"fortify {args.command}: unexpected error: {_short(exc)}\n"
            "this is a bug in fortify or an input it does not check yet; rerun with "
            "`fortify --debug ...` for the full traceback and report it",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
