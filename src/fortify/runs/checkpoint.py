"""Checkpoints: a safetensors weights file plus a JSON sidecar, both written atomically.

Format (``format_version`` 1)::

    best.safetensors   model.state_dict() tensors (contiguous, CPU) under their usual names,
                       plus optional extra tensors under ``extra::<name>``
    best.json          {<caller's meta>, "format_version": 1, "sha256": <hex of best.safetensors>,
                        "size_bytes": ..., "weights_file": "best.safetensors", "created": ISO UTC,
                        "package_versions": {fortify, torch, torchvision, numpy, safetensors,
                        python}, "extra_keys": [...]}

The sidecar is the same path with the suffix ``.json`` (:func:`sidecar_path`).

Write ordering: both files are first written in full to temporary files in the same folder and
fsynced; then the weights file is renamed into place, then the sidecar. A crash or error before
the first rename leaves the previous pair untouched (and no temporary files); the only unsafe
window is between the two renames, which leaves new weights next to the old sidecar. That
mismatch is detected on load because the sidecar records the SHA-256 of the weights it
describes: :func:`load_checkpoint` refuses (``CheckpointError``) any weights file whose hash or
size differs from its sidecar, which also catches truncated and corrupted files. SIGINT and
SIGTERM are held back while a checkpoint is written (it completes, then the signal acts); a
SIGKILL in that window leaves the new sidecar in its temporary file, and
:func:`complete_interrupted_saves` (run by :meth:`RunDir.open <fortify.runs.RunDir.open>`)
renames it into place when it describes the weights on disk.

The weights file's bytes depend only on the tensors (safetensors writes its metadata map in
hash order; :func:`save_checkpoint` puts it in sorted order), so identical weights give
identical files and SHA-256s.

Loading never unpickles: tensors are read with ``safetensors``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save_file as st_save_file
from torch import nn

import fortify
from fortify.errors import CheckpointError, FortifyError, RunDirError
from fortify.runs.jsonio import dumps
from fortify.runs.rundir import CHECKPOINT_SUFFIX, RunDir, check_tag
from fortify.utils.atomic import TEMP_RE, atomic_path, deferred_signals
from fortify.utils.clock import utc_now

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
EXTRA_PREFIX = "extra::"
RESERVED_META_KEYS = (
    "format_version",
    "sha256",
    "size_bytes",
    "weights_file",
    "created",
    "package_versions",
    "extra_keys",
)
_SHOW = 8  # how many key names an error message lists


def sidecar_path(path: str | os.PathLike[str]) -> Path:
    """The JSON sidecar of weights file ``path``: same folder and stem, suffix ``.json``."""
    return Path(path).with_suffix(".json")


def package_versions() -> dict[str, str]:
    """Versions of the packages that determine how a checkpoint was produced."""

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    return {
        "fortify": fortify.__version__,
        "torch": torch.__version__,
        "torchvision": version("torchvision"),
        "numpy": version("numpy"),
        "safetensors": version("safetensors"),
        "python": platform.python_version(),
    }


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of the file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _check_weights_path(path: Path) -> None:
    if path.suffix != CHECKPOINT_SUFFIX:
        raise CheckpointError(
            f"checkpoint weights must be a '{CHECKPOINT_SUFFIX}' file, got {path.name!r} "
            "(release .pth/.pt files are read by `fortify import`, never unpickled here)"
        )


def _cpu_tensors(named: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """Contiguous CPU copies safe for safetensors: tensors sharing storage (tied weights,
    views) are cloned so every saved tensor owns its memory."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, value in named.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"cannot save {prefix}{name!r}: it is a {type(value).__name__}, but checkpoints "
                "hold tensors only (put other values in meta)"
            )
        if value.layout != torch.strided:
            raise CheckpointError(
                f"cannot save {prefix}{name!r}: {value.layout} tensors are not supported"
            )
        t = value.detach().to("cpu")
        storage = t.untyped_storage()
        full = t.is_contiguous() and storage.nbytes() == t.numel() * t.element_size()
        if not full or storage.data_ptr() in seen:
            t = t.clone(memory_format=torch.contiguous_format)
            storage = t.untyped_storage()
        if storage.nbytes() > 0:
            seen.add(storage.data_ptr())
        out[prefix + name] = t
    return out


def save_checkpoint(
    path: str | os.PathLike[str],
    model: nn.Module,
    meta: Mapping[str, Any],
    extra: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Save ``model.state_dict()`` (+ ``extra`` tensors) to ``path`` and its sidecar atomically.

    Args:
        path: weights file ending in ``.safetensors`` (e.g. ``RunDir.checkpoint_path("best")``).
        model: any module; its full ``state_dict`` (parameters and buffers) is stored.
        meta: JSON-serialisable information stored in the sidecar, e.g. ``{"config": ...,
            "num_classes": 10, "image_shape": [3, 32, 32], "epoch": 12}`` (the first three are
            what :func:`load_model` needs). Must not use the reserved keys
            ``format_version, sha256, size_bytes, weights_file, created, package_versions,
            extra_keys``.
        extra: additional tensors (e.g. an EMA or optimiser buffers), stored as
            ``extra::<name>``; read them back with :func:`read_checkpoint`.
    Returns:
        The weights path.
    Raises:
        CheckpointError: non-tensor state, reserved or non-serialisable meta, bad path.
    """
    path = Path(path)
    _check_weights_path(path)
    if not isinstance(meta, Mapping):
        raise CheckpointError(f"meta must be a mapping, got {type(meta).__name__}")
    clash = sorted(set(meta) & set(RESERVED_META_KEYS))
    if clash:
        raise CheckpointError(
            f"meta uses reserved key(s) {clash}; reserved: {list(RESERVED_META_KEYS)}"
        )
    tensors = _cpu_tensors(model.state_dict())
    extra = dict(extra or {})
    tensors.update(_cpu_tensors(extra, EXTRA_PREFIX))
    sidecar = sidecar_path(path)
    try:
        dumps(dict(meta), "meta")  # fail before touching any file
    except TypeError as exc:
        raise CheckpointError(f"checkpoint meta is not JSON-serialisable: {exc}") from exc
    # Nested so the inner (weights) rename happens first, then the outer (sidecar) rename.
    weights_replaced = False
    try:
        with deferred_signals(), atomic_path(sidecar) as tmp_sidecar:
            with atomic_path(path) as tmp_weights:
                st_save_file(
                    tensors,
                    str(tmp_weights),
                    metadata={"format": "pt", "fortify_format_version": str(FORMAT_VERSION)},
                )
                _sort_metadata(tmp_weights)
                record = {
                    **dict(meta),
                    "format_version": FORMAT_VERSION,
                    "weights_file": path.name,
                    "sha256": file_sha256(tmp_weights),
                    "size_bytes": tmp_weights.stat().st_size,
                    "created": utc_now(),
                    "package_versions": package_versions(),
                    "extra_keys": sorted(extra),
                }
                try:
                    tmp_sidecar.write_text(dumps(record, "meta"), encoding="utf-8")
                except OSError as exc:  # name the sidecar, not the weights of this block
                    if exc.errno is None:
                        raise
                    raise OSError(exc.errno, exc.strerror, str(sidecar)) from exc
            weights_replaced = True
    except FortifyError:
        raise
    except Exception as exc:  # OSError, or safetensors' own error for a failed write
        if weights_replaced:  # the one unsafe window (see the module doc)
            raise RunDirError(
                f"cannot write the sidecar of checkpoint {path} ({type(exc).__name__}: {exc}) "
                "after its weights were replaced; the pair no longer matches and loading it "
                "is refused — free disk space / fix permissions and save again"
            ) from exc
        raise RunDirError(
            f"cannot write checkpoint {path} ({type(exc).__name__}: {exc}); nothing was "
            f"replaced: the previous {path.name} (if any) is intact"
        ) from exc
    log.debug("saved checkpoint %s (%d tensors)", path, len(tensors))
    return path


def _sort_metadata(path: Path) -> None:
    """Rewrite the ``__metadata__`` map of the safetensors file ``path`` in sorted key order,
    in place (safetensors writes it in hash order, which differs from process to process).
    Any valid JSON of at most the header's length, padded with spaces, is a valid header."""
    with open(path, "r+b") as fh:
        head = fh.read(8)
        size = int.from_bytes(head, "little") if len(head) == 8 else 0
        raw = fh.read(size) if 0 < size <= 100_000_000 else b""
        try:
            header = json.loads(raw)
        except ValueError:
            return  # not written by safetensors (a test double); nothing to do
        meta = header.get("__metadata__") if isinstance(header, dict) else None
        if not isinstance(meta, dict):
            return
        header["__metadata__"] = dict(sorted(meta.items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(text) <= size:
            fh.seek(8)
            fh.write(text + b" " * (size - len(text)))


def complete_interrupted_saves(folder: str | os.PathLike[str]) -> list[Path]:
    """Finish checkpoint saves in ``folder`` that a killed process left between its two renames.

    Such a save left ``<tag>.safetensors`` new, ``<tag>.json`` old (or missing) and the new
    sidecar in its temporary file ``.<tag>.json.<random>.tmp``; the temporary sidecar is
    renamed into place when its size and SHA-256 are those of the weights file (otherwise it is
    left for the caller to remove). Call only while holding the run directory's lock.
    Returns the sidecars completed.
    """
    done: list[Path] = []
    folder = Path(folder)
    for tmp in sorted(folder.glob(".*.json.*.tmp")):
        m = TEMP_RE.match(tmp.name)
        if m is None or not m["target"].endswith(".json"):
            continue
        side = folder / m["target"]
        weights = side.with_suffix(CHECKPOINT_SUFFIX)
        try:
            record = json.loads(tmp.read_text(encoding="utf-8"))
            if not (isinstance(record, dict) and weights.is_file()):
                continue
            if record.get("weights_file") != weights.name:
                continue
            if record.get("size_bytes") != weights.stat().st_size:
                continue
            actual = file_sha256(weights)
            if record.get("sha256") != actual or _recorded_sha256(weights) == actual:
                continue  # not these weights' sidecar, or the one in place describes them
            os.replace(tmp, side)
        except (OSError, ValueError, CheckpointError):
            continue
        log.warning(
            "completed the checkpoint save of %s that an interrupted process left half-done "
            "(its weights were in place, its sidecar %s still in a temporary file)",
            weights, side.name,
        )  # fmt: skip
        done.append(side)
    return done


def _recorded_sha256(weights: Path) -> str | None:
    """The SHA-256 the sidecar of ``weights`` records (None: no usable sidecar)."""
    try:
        value = read_sidecar(weights).get("sha256")
    except CheckpointError:
        return None
    return value if isinstance(value, str) else None


def read_sidecar(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The sidecar of weights file ``path`` as a dict (no hash verification)."""
    side = sidecar_path(path)
    if not side.is_file():
        raise CheckpointError(
            f"checkpoint sidecar {side} is missing; fortify checkpoints are a pair "
            f"<name>{CHECKPOINT_SUFFIX} + <name>.json written by save_checkpoint"
        )
    try:
        record = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint sidecar {side} is unreadable or not valid JSON: {exc}"
        ) from exc
    if not isinstance(record, dict):
        raise CheckpointError(f"checkpoint sidecar {side} does not hold a JSON object")
    version = record.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION or version < 1:
        raise CheckpointError(
            f"checkpoint sidecar {side} has format_version {version!r}; this fortify reads "
            f"versions 1..{FORMAT_VERSION} (upgrade fortify for newer checkpoints)"
        )
    return record


def read_checkpoint(
    path: str | os.PathLike[str], verify: bool = True
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint without a model: ``(state_dict, extra, meta)``.

    Args:
        verify: check the weights' size and SHA-256 against the sidecar (recommended).
    Raises:
        CheckpointError: missing file or sidecar, hash/size mismatch (corrupt, truncated or an
            interrupted save), or a file safetensors cannot parse.
    """
    path = Path(path)
    _check_weights_path(path)
    if not path.is_file():
        hint = ""
        if path.parent.is_dir():
            tags = sorted(p.name for p in path.parent.glob(f"*{CHECKPOINT_SUFFIX}"))
            hint = f"; checkpoints in {path.parent}: {', '.join(tags) or 'none'}"
        raise CheckpointError(f"no checkpoint file at {path}{hint}")
    meta = read_sidecar(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if verify:
        expected = meta.get("sha256")
        actual = hashlib.sha256(data).hexdigest()
        if expected != actual or meta.get("size_bytes", len(data)) != len(data):
            raise CheckpointError(
                f"checkpoint {path} does not match its sidecar {sidecar_path(path).name} "
                f"(sha256 recorded {str(expected)[:12]}…, file {actual[:12]}…; size recorded "
                f"{meta.get('size_bytes')}, file {len(data)} bytes): the file is corrupt or "
                "truncated, or a save was interrupted between writing the weights and the sidecar"
            )
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error types for malformed files
        raise CheckpointError(
            f"checkpoint {path} is not a readable safetensors file: {exc}"
        ) from exc
    state = {k: v for k, v in tensors.items() if not k.startswith(EXTRA_PREFIX)}
    extra = {k[len(EXTRA_PREFIX) :]: v for k, v in tensors.items() if k.startswith(EXTRA_PREFIX)}
    return state, extra, meta


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOW])
    return shown + (f", ... ({len(names)} in total)" if len(names) > _SHOW else "")


def apply_state(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    strict: bool = True,
    source: str = "checkpoint",
) -> None:
    """Copy ``state`` into ``model`` after checking names and shapes.

    Raises:
        CheckpointError: naming missing keys, unexpected keys (only with ``strict``) and shape
            mismatches (always).
    """
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if mismatched:
        problems.append(f"shape mismatches: {_listing(mismatched)}")
    if strict and missing:
        problems.append(f"missing keys (in the model, not in the {source}): {_listing(missing)}")
    if strict and unexpected:
        problems.append(
            f"unexpected keys (in the {source}, not in the model): {_listing(unexpected)}"
        )
    if problems:
        raise CheckpointError(
            f"{source} does not fit the model ({type(model).__name__}): "
            + "; ".join(problems)
            + ". Was it saved from a different architecture, width, number of classes or "
            "defence configuration?"
        )
    if missing or unexpected:
        log.warning(
            "non-strict load from %s: %d missing, %d unexpected keys",
            source,
            len(missing),
            len(unexpected),
        )
    try:
        model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    except RuntimeError as exc:
        raise CheckpointError(f"cannot load {source} into the model: {exc}") from exc


def load_checkpoint(
    path: str | os.PathLike[str], model: nn.Module, strict: bool = True, verify: bool = True
) -> dict[str, Any]:
    """Verify and load the weights at ``path`` into ``model``; return the sidecar meta.

    Args:
        path: a ``.safetensors`` weights file written by :func:`save_checkpoint`.
        model: a module with the same architecture (names and shapes).
        strict: require exactly the same keys (shape mismatches are always an error).
        verify: check size and SHA-256 against the sidecar before loading.
    Raises:
        CheckpointError: see :func:`read_checkpoint` and :func:`apply_state`.
    """
    state, _extra, meta = read_checkpoint(path, verify=verify)
    apply_state(model, state, strict=strict, source=f"checkpoint {Path(path).name}")
    return meta


def resolve_checkpoint(path_or_run_dir: str | os.PathLike[str] | RunDir, tag: str = "best") -> Path:
    """Weights path from a file path, a run folder (``checkpoints/<tag>``) or a :class:`RunDir`."""
    try:
        check_tag(tag)
    except RunDirError as exc:
        raise CheckpointError(str(exc)) from None
    if isinstance(path_or_run_dir, RunDir):
        run = path_or_run_dir
    else:
        if not isinstance(path_or_run_dir, (str, os.PathLike)):
            raise CheckpointError(
                f"expected a run directory or a checkpoint path, got "
                f"{type(path_or_run_dir).__name__}"
            )
        p = Path(path_or_run_dir).expanduser()
        if not p.exists():
            raise CheckpointError(
                f"no such run directory or checkpoint file: {str(p)!r}; pass a run directory "
                f"(with checkpoints/<tag>{CHECKPOINT_SUFFIX}) or a {CHECKPOINT_SUFFIX} file"
            )
        if not p.is_dir():
            return p
        run = RunDir(p)
    target = run.checkpoints_dir / f"{tag}{CHECKPOINT_SUFFIX}"
    if not target.is_file():
        tags = run.checkpoint_tags()
        raise CheckpointError(
            f"run {run.path} has no checkpoint tagged {tag!r}; available tags: "
            f"{', '.join(tags) or 'none (no checkpoints saved yet)'}"
        )
    return target


def rebuild_model(meta: Mapping[str, Any], where: str) -> nn.Module:
    """The model (without its weights) that a record with ``config`` (an ``ExperimentConfig``
    as a dict), ``num_classes`` and ``image_shape`` ([C, H, W]) describes: a checkpoint's
    sidecar or an export's metadata. CheckpointError naming ``where`` for a malformed field."""
    from fortify.config import ExperimentConfig, from_dict
    from fortify.factory import build_model

    shape = meta["image_shape"]
    if not (
        isinstance(shape, list)
        and len(shape) == 3
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)
    ):
        raise CheckpointError(f"{where}: image_shape must be [C, H, W], got {shape!r}")
    k = meta["num_classes"]
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise CheckpointError(f"{where}: num_classes must be an integer >= 1, got {k!r}")
    if not isinstance(meta["config"], dict):
        raise CheckpointError(
            f"{where}: config must be a mapping, got {type(meta['config']).__name__}"
        )
    try:
        cfg = from_dict(ExperimentConfig, meta["config"])
        return build_model(cfg.model, cfg.defenses, k, tuple(shape), load_weights=False)
    except FortifyError as exc:
        raise CheckpointError(f"{where}: cannot rebuild the model from its config: {exc}") from exc


def load_model(
    path_or_run_dir: str | os.PathLike[str] | RunDir,
    tag: str = "best",
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model described by a checkpoint's meta, load its weights, put it in eval mode.

    The sidecar must hold ``config`` (an ``ExperimentConfig`` as a dict), ``num_classes`` and
    ``image_shape`` ([C, H, W]); the model is built with
    :func:`fortify.factory.build_model` so attached defences come back too.

    Returns:
        ``(model, meta)`` with the model on ``device`` and in eval mode.
    """
    from fortify.utils.runtime import resolve_device

    dev = resolve_device(device)  # an unusable device fails before anything is read
    path = resolve_checkpoint(path_or_run_dir, tag)
    state, _extra, meta = read_checkpoint(path)
    missing = [k for k in ("config", "num_classes", "image_shape") if k not in meta]
    if missing:
        raise CheckpointError(
            f"checkpoint {path} cannot rebuild its model: sidecar lacks {missing} "
            "(save with meta={'config': to_dict(cfg), 'num_classes': K, "
            "'image_shape': [C, H, W]}); "
            "load it into a model you build yourself with load_checkpoint instead"
        )
    model = rebuild_model(meta, f"checkpoint {path}")
    apply_state(model, state, strict=True, source=f"checkpoint {path.name}")
    model.to(dev).eval()
    return model, meta
