"""Training checkpoints: atomic save with a total limit, exact resume, refusal of incompatible resumes.

A checkpoint ``runs/<name>/checkpoint-<step>/`` holds accelerate's state (optimizer, LR scheduler, grad scaler,
RNG states of every process; the trainable weights through the trainer's save hook), ``train_state.json`` (step,
epoch, batch position inside the epoch, process count), the resolved config, and whatever the trainer adds (the
LoRA in diffusers format, so inference can point at any checkpoint).

The folder is built under a temporary name (:func:`core.io.atomic_dir`) and renamed into place only when
complete, and ``train_state.json`` is written last, so a run killed mid-save leaves nothing that
``resume_from: latest`` would pick.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import yaml

from core.cli import UserError
from core.config import config_diff
from core.io import atomic_dir, atomic_write_text

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
CONFIG_FILE = "config.resolved.yaml"
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``run_dir`` as (step, path), oldest first; temporary/half folders are ignored."""
    run_dir = Path(run_dir)
    found = []
    if run_dir.is_dir():
        for p in run_dir.iterdir():
            m = _CHECKPOINT_NAME.match(p.name)
            if m and p.is_dir() and (p / STATE_FILE).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_resume(run_dir: str | Path, resume_from: str | None) -> Path | None:
    """``None`` -> fresh start; ``latest`` -> newest complete checkpoint (or fresh if none); else a path."""
    if not resume_from:
        return None
    if resume_from == "latest":
        ckpts = list_checkpoints(run_dir)
        if not ckpts:  # fresh start; the run says so once (trainer.start_run), not every caller and process
            return None
        return ckpts[-1][1]
    path = Path(resume_from)
    if not path.is_dir():
        raise UserError(
            f"checkpoint.resume_from: {path} is not a folder; give a checkpoint-<step> folder or 'latest'"
        )
    if not (path / STATE_FILE).is_file():
        raise UserError(
            f"{path} is not a complete checkpoint (no {STATE_FILE}); it may be from a killed save"
        )
    return path


def read_train_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))


def check_resume_compatible(
    checkpoint: Path,
    resolved: dict[str, Any],
    free_keys: Sequence[str],
    world_size: int | None = None,
    schema: Any = None,
) -> None:
    """Refuse to resume when a config key outside ``free_keys`` (dotted prefixes) differs from the checkpoint's.

    A key the checkpoint's config does not have (added to the schema after it was written) counts as unchanged
    when this run leaves it at its default (``schema``: the config's pydantic class): defaults of new keys keep
    the behaviour the checkpoint was trained with.
    """
    saved_path = checkpoint / CONFIG_FILE
    if not saved_path.is_file():
        raise UserError(f"{checkpoint} has no {CONFIG_FILE}; cannot check that the config matches")
    saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
    differing = [
        k
        for k in config_diff(saved, resolved)
        if not any(k == f or k.startswith(f + ".") for f in free_keys)
        and not (schema is not None and not _has(saved, k) and _get(resolved, k) == _default(schema, k))
    ]
    if differing:
        details = ", ".join(f"{k} ({_get(saved, k)!r} -> {_get(resolved, k)!r})" for k in differing)
        raise UserError(
            f"cannot resume from {checkpoint}: the config differs in {details}. Revert these keys, or start a new run "
            f"(another output.name or checkpoint.resume_from=null). Keys free to change on resume: {', '.join(free_keys)}"
        )
    state = read_train_state(checkpoint)
    if world_size is not None and state.get("world_size", world_size) != world_size:
        raise UserError(
            f"cannot resume from {checkpoint}: it was written by {state['world_size']} process(es), this run has "
            f"{world_size}; the data order depends on the process count. Launch with the same number of processes"
        )


def _has(tree: dict[str, Any], dotted: str) -> bool:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


_NO_DEFAULT = object()


def _default(schema: Any, dotted: str) -> Any:
    """The schema's default of a dotted key, as the resolved (JSON) config holds it; a sentinel when there is none."""
    from pydantic import BaseModel

    model = schema
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        field = getattr(model, "model_fields", {}).get(part)
        if field is None or field.is_required():
            return _NO_DEFAULT
        value = field.get_default(call_default_factory=True)
        if i == len(parts) - 1:
            return value.model_dump(mode="json") if isinstance(value, BaseModel) else value
        model = type(value) if isinstance(value, BaseModel) else field.annotation
    return _NO_DEFAULT


def _get(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def save_checkpoint(
    accelerator,
    run_dir: Path,
    step: int,
    train_state: dict[str, Any],
    resolved_yaml: str,
    write_extra: Callable[[Path], None] | None = None,
    total_limit: int | None = None,
    extra_context: Callable[[], AbstractContextManager] = nullcontext,
) -> Path:
    """Save ``checkpoint-<step>`` atomically from every process; returns its final path.

    Must be called on all processes (accelerate's ``save_state`` writes per-process RNG states).
    ``write_extra(folder)`` runs on the main process only (e.g. to export the LoRA), inside ``extra_context()``,
    which every process enters (it may gather sharded weights, a collective call).
    """
    from accelerate.utils import broadcast_object_list

    final = run_dir / f"checkpoint-{step}"
    main = accelerator.is_main_process
    with atomic_dir(final) if main else nullcontext() as tmp:
        folder = Path(broadcast_object_list([str(tmp) if main else None])[0])
        accelerator.save_state(str(folder))
        with extra_context():
            if main and write_extra is not None:
                write_extra(folder)
        if main:
            atomic_write_text(folder / CONFIG_FILE, resolved_yaml)
            state = dict(train_state, step=step, world_size=accelerator.num_processes)
            atomic_write_text(
                folder / STATE_FILE, json.dumps(state, indent=2)
            )  # last: marks the folder complete
        accelerator.wait_for_everyone()
    if main and total_limit:
        prune_checkpoints(run_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(run_dir: Path, total_limit: int) -> list[Path]:
    """Delete the oldest complete checkpoints beyond ``total_limit``; returns what was deleted."""
    ckpts = list_checkpoints(run_dir)
    doomed = [p for _, p in ckpts[: max(0, len(ckpts) - total_limit)]]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
        logger.info("deleted old checkpoint %s (checkpoint.total_limit=%d)", p.name, total_limit)
    return doomed
