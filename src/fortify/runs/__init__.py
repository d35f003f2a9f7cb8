"""Run directories and checkpoints.

- :class:`RunDir` — ``RunDir.open(path, mode="new"|"resume"|"overwrite", config)``: config.yaml,
  status.json, metrics.jsonl, checkpoints/, reports/.
- :func:`save_checkpoint` / :func:`load_checkpoint` — safetensors weights + JSON sidecar
  (SHA-256 verified, atomic, never unpickled); :func:`load_model` rebuilds model + defences from
  the sidecar's config.
- :func:`write_json_atomic` / :func:`write_text_atomic` — atomic report writers.
"""

from fortify.runs.checkpoint import (
    EXTRA_PREFIX,
    FORMAT_VERSION,
    apply_state,
    file_sha256,
    load_checkpoint,
    load_model,
    package_versions,
    read_checkpoint,
    read_sidecar,
    resolve_checkpoint,
    save_checkpoint,
    sidecar_path,
)
from fortify.runs.jsonio import to_jsonable, write_json_atomic, write_text_atomic
from fortify.runs.rundir import MODES, STATES, RunDir
from fortify.utils.clock import utc_now

__all__ = [
    "EXTRA_PREFIX",
    "FORMAT_VERSION",
    "MODES",
    "STATES",
    "RunDir",
    "apply_state",
    "file_sha256",
    "load_checkpoint",
    "load_model",
    "package_versions",
    "read_checkpoint",
    "read_sidecar",
    "resolve_checkpoint",
    "save_checkpoint",
    "sidecar_path",
    "to_jsonable",
    "utc_now",
    "write_json_atomic",
    "write_text_atomic",
]
