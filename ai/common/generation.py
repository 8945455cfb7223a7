"""Shared plumbing of the generation scripts (LoRA and ControlNet inference): what to generate and where.

What every ``infer_*.py`` does the same way lives here once:

* the work list: one :class:`WorkItem` per image, named ``{prompt_index:05d}_{image_index:02d}.png`` (or
  ``{name}_{image_index:02d}.png`` for a named entry, e.g. a ControlNet mask's stem) and seeded
  ``seed + prompt_index * images_per_prompt + image_index``, so an image's noise depends on its own seed only
  (one CPU generator per image), never on the batch it ran in or the process that ran it (another batch size
  changes only the float rounding of batched matmuls: at most one 8-bit level on the tiny test model);
* the run loop (:func:`run_generation`): resume (an image counts as done when its PNG and its metadata record both
  exist and the record's settings match), split across ``accelerate launch`` processes with
  ``PartialState.split_between_processes``, atomic PNG writes, one metadata part file per process merged into
  ``generations/metadata.jsonl`` by the main process (no two processes ever write the same file);
* the steps of every script's ``main``: the command line (:func:`parse_generation_args`), the checks that need
  no torch (:func:`check_base_model`, :func:`resolve_lora_file`), the settings compared on resume and the record
  fields beside them (:func:`common_settings`, :func:`common_info`), resizing a bucket-sized image to the size
  asked for (:func:`resize_to`).

The config sections (prompts, sampling, ``resolution``, ``speed``, dtype, device) and the output-size rules are in
:mod:`ai.common.generation_config` (re-exported here); how the pipeline is built and identified (device,
scheduler, speed switches, LoRA loading, the call itself, model fingerprints) is in :mod:`ai.common.pipelines`.
Imports go one way: generation -> pipelines -> generation_config. None imports torch at load time (a ``--check``
that needs no model need not load it). A script adds only what is specific to it (its adapter, extra pipeline
arguments, per-item inputs, output sizes).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ai.common.generation_config import (  # noqa: F401 (the config sections are importable from here too)
    SCHEDULERS,
    GenerationConfig,
    GenerationPaths,
    OutputSize,
    Resolution,
    SchedulerName,
    Speed,
)
from ai.common.models import ModelSource
from ai.common.pipelines import model_fingerprint
from core.cli import UserError
from core.config import add_config_arguments
from core.io import atomic_write_bytes, atomic_write_text, read_jsonl, sha256_file

logger = logging.getLogger(__name__)

GENERATIONS_DIR = "generations"
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
METADATA_FILE = "metadata.jsonl"
PART_GLOB = "metadata.part-*.jsonl"
#: Columns of the stage 1 CSVs copied into each record (CSV column -> record field); stage 4 reads them.
CSV_SOURCE_FIELDS = {"image": "source_frame", "conditioning_image": "mask_path"}


# ---------------------------------------------------------------------------------------------------------------
# Command line and the checks that need no torch
# ---------------------------------------------------------------------------------------------------------------


def parse_generation_args(
    argv: Sequence[str] | None,
    *,
    prog: str,
    doc: str,
    default_config: str,
    check_help: str,
    override_examples: str,
) -> argparse.Namespace:
    """``--config``, ``--check`` and ``key=value`` overrides, as every generation script takes them."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=doc.split("\n\n")[0],
        epilog=f"Overrides are dotted key=value pairs, e.g. {override_examples}. Every key is documented in "
        f"{default_config}.",
    )
    add_config_arguments(parser, default_config, check_help)
    return parser.parse_args(argv)


def check_base_model(model: ModelSource) -> None:
    """A local base model must be a complete SDXL folder or an SDXL single-file checkpoint, a local ``vae`` a
    folder or VAE file (hub ids load later)."""
    from ai.common.models import check_model_source

    check_model_source(model)


def resolve_lora_file(path: str | None, key: str = "paths.lora_weights_path") -> Path | None:
    """The LoRA weights file: ``path`` itself, or ``path/pytorch_lora_weights.safetensors`` for a run/checkpoint folder.

    ``key`` is the config key that named ``path``, for the error messages.
    """
    if path is None:
        return None
    p = Path(path)
    if p.is_file():
        if p.suffix not in (".safetensors", ".bin"):
            raise UserError(f"{key} {p} is not a LoRA weights file (*.safetensors or *.bin)")
        return p
    if p.is_dir():
        if (p / LORA_WEIGHTS_NAME).is_file():
            return p / LORA_WEIGHTS_NAME
        found = sorted(child.name for child in p.iterdir())
        with_weights = [c for c in p.glob("checkpoint-*") if (c / LORA_WEIGHTS_NAME).is_file()]
        hint = ""
        if with_weights:
            newest = max(with_weights, key=lambda c: int(re.sub(r"\D", "", c.name) or 0))
            hint = f"; the newest checkpoint with weights is {newest} (set {key}={newest})"
        raise UserError(
            f"no {LORA_WEIGHTS_NAME} in {p}; found: {', '.join(found) or 'nothing'}{hint}. Point "
            f"{key} at a training run or checkpoint folder, or at the .safetensors file"
        )
    parent = p.parent
    found = (
        ", ".join(sorted(c.name for c in parent.iterdir()))
        if parent.is_dir()
        else "the folder does not exist either"
    )
    raise UserError(f"{key}: LoRA weights not found: {p} ({parent}: {found or 'empty'})")


# ---------------------------------------------------------------------------------------------------------------
# Prompts and the work list
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptEntry:
    text: str
    source: dict[str, Any] = field(
        default_factory=dict
    )  # where it came from (record fields such as source_frame)
    name: str | None = None  # images named ``<name>_<image_index>.png`` (e.g. a mask's stem); None: by index


def read_prompts(cfg: GenerationConfig) -> list[PromptEntry]:
    """All prompts, in a fixed order: ``prompt``, ``prompts``, ``prompts_file`` lines, ``captions_csv`` rows.

    Raises UserError for a missing/unreadable file, a CSV without the named column, an empty caption (unless
    ``on_error: skip``), or no prompts at all.
    """
    entries: list[PromptEntry] = []
    if cfg.prompt:
        entries.append(PromptEntry(cfg.prompt, {"prompt_source": "prompt"}))
    for i, text in enumerate(cfg.prompts):
        if not text.strip():
            raise UserError(f"prompts[{i}] is empty; remove it or write a prompt")
        entries.append(PromptEntry(text, {"prompt_source": f"prompts[{i}]"}))
    if cfg.prompts_file:
        entries += _read_prompts_file(Path(cfg.prompts_file))
    if cfg.captions_csv:
        entries += read_captions_csv(Path(cfg.captions_csv), cfg.captions_column, cfg.on_error)
    if cfg.max_prompts is not None:
        entries = entries[: cfg.max_prompts]
    if not entries:
        raise UserError(
            "no prompts: set prompt, prompts (a list), prompts_file (one prompt per line) or captions_csv "
            "(e.g. the stage 1 CSV) in the config or as key=value"
        )
    return entries


def _read_text(path: Path, what: str) -> str:
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8"
        ) from None


def _read_prompts_file(path: Path) -> list[PromptEntry]:
    """One prompt per line; blank lines and lines starting with '#' are skipped."""
    out = []
    for line_no, line in enumerate(_read_text(path, "prompts_file").splitlines(), 1):
        text = line.strip()
        if text and not text.startswith("#"):
            out.append(PromptEntry(text, {"prompt_source": f"{path}:{line_no}"}))
    return out


def read_captions_csv(path: Path, column: str, on_error: str) -> list[PromptEntry]:
    """Rows of a CSV (e.g. the stage 1 ``image,text`` CSV); relative paths in it are relative to the CSV's folder."""
    reader = csv.DictReader(io.StringIO(_read_text(path, "captions_csv"), newline=""))
    columns = reader.fieldnames or []
    if column not in columns:
        raise UserError(
            f"{path} has no column {column!r}; its columns are: {', '.join(columns) or '(none: empty file)'}. "
            "Set captions_column to the one holding the prompts"
        )
    out = []
    for row_no, row in enumerate(reader, 2):  # row 1 is the header
        text = (row.get(column) or "").strip()
        if not text:
            message = f"{path} line {row_no}: empty {column!r}"
            if on_error == "stop":
                raise UserError(f"{message}; fix the row or set on_error=skip")
            logger.warning("%s; skipped (on_error=skip)", message)
            continue
        source: dict[str, Any] = {"prompt_source": f"{path}:{row_no}"}
        for csv_column, record_field in CSV_SOURCE_FIELDS.items():
            value = (row.get(csv_column) or "").strip()
            if value:
                source[record_field] = value if os.path.isabs(value) else str(path.parent / value)
        out.append(PromptEntry(text, source))
    return out


@dataclass(frozen=True)
class WorkItem:
    """One image to make; its name and seed depend only on its position in the work list."""

    prompt_index: int
    image_index: int
    prompt: str
    seed: int
    source: dict[str, Any] = field(default_factory=dict)
    name: str | None = None

    @property
    def file(self) -> str:
        return f"{self.name or f'{self.prompt_index:05d}'}_{self.image_index:02d}.png"


def build_work_items(prompts: Sequence[PromptEntry], images_per_prompt: int, seed: int) -> list[WorkItem]:
    return [
        WorkItem(p, i, entry.text, seed + p * images_per_prompt + i, entry.source, entry.name)
        for p, entry in enumerate(prompts)
        for i in range(images_per_prompt)
    ]


# ---------------------------------------------------------------------------------------------------------------
# Outputs: PNGs + metadata.jsonl (resume, lock-free across processes)
# ---------------------------------------------------------------------------------------------------------------


def read_metadata_records(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file; a torn last line (a process killed mid-write) is ignored."""
    return [r for _, r in read_jsonl(path, tolerant=True) if isinstance(r, dict) and "file" in r]


def merge_metadata(out_dir: Path) -> dict[str, dict[str, Any]]:
    """Fold the part files into ``metadata.jsonl`` (one line per file, the newest record wins); main process only."""
    records = (
        {r["file"]: r for r in read_metadata_records(out_dir / METADATA_FILE)}
        if (out_dir / METADATA_FILE).is_file()
        else {}
    )
    parts = sorted(out_dir.glob(PART_GLOB))
    for part in parts:
        for record in read_metadata_records(part):
            records[record["file"]] = record
    if parts or not (out_dir / METADATA_FILE).is_file():
        lines = [json.dumps(records[name], ensure_ascii=False) + "\n" for name in sorted(records)]
        atomic_write_text(out_dir / METADATA_FILE, "".join(lines))
        for part in parts:
            part.unlink()
    return records


def png_bytes(image, text: dict[str, str] | None = None) -> bytes:
    """PNG of a PIL image, with optional text chunks (prompt, seed) that image viewers show."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_itxt(key, value)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def resize_to(image, size: tuple[int, int]):
    """``image`` stretched to ``size`` (Lanczos), or itself when it has that size already.

    A resize, never a crop: every point keeps its relative position, so the mask an image was generated from and
    its frame's boxes, scaled to the saved size the same way (stage 4 does), still fall where the image shows them.
    """
    from PIL import Image

    return image if image.size == tuple(size) else image.resize(tuple(size), Image.Resampling.LANCZOS)


@dataclass
class GenerationSummary:
    total: int = 0
    skipped: int = 0
    generated: int = 0
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    out_dir: str = ""

    def lines(self) -> list[str]:
        per_image = f" ({self.seconds / self.generated:.2f} s/image)" if self.generated else ""
        out = [
            f"{self.generated} generated, {self.skipped} already done, {len(self.failed)} failed, "
            f"{self.total} in the work list; {self.seconds:.1f} s{per_image}",
            f"images and metadata.jsonl in {self.out_dir}",
        ]
        out += [f"  failed: {reason}" for reason in self.failed[:10]]
        if len(self.failed) > 10:
            out.append(f"  ... and {len(self.failed) - 10} more failures")
        return out


#: Settings that records gained after images were first written, with the value every older image was made with:
#: a record without the key holds that value, so a folder begun before the key existed resumes (instead of every
#: image being refused, and regenerated only with overwrite=true).
SETTINGS_ADDED_LATER = {"generate_at_bucket": False}


def _mismatch(record: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    def recorded(key: str) -> Any:
        return record[key] if key in record else SETTINGS_ADDED_LATER.get(key)

    return [f"{k}: {recorded(k)!r} -> {v!r}" for k, v in expected.items() if recorded(k) != v]


def common_settings(
    cfg: GenerationConfig,
    lora_file: Path | None,
    lora_scale: float,
    *,
    size: dict[str, Any],
    method: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What decides the pixels besides prompt and seed; every image's record holds it and a rerun compares it.

    ``size`` (the script's output-size keys) and ``method`` (its own model's keys, e.g. the ControlNet's) go in
    fixed places: the key order is the order a refusal to mix settings lists the differences in.
    """
    return {
        "negative_prompt": cfg.negative_prompt,
        "num_inference_steps": cfg.num_inference_steps,
        "guidance_scale": cfg.guidance_scale,
        "scheduler": cfg.scheduler,
        **size,
        "dtype": cfg.dtype,
        **(method or {}),
        "lora_scale": lora_scale if lora_file else None,
        "lora_sha256": sha256_file(lora_file) if lora_file else None,
        "base_model_fingerprint": model_fingerprint(cfg.model.pretrained_model, cfg.model.variant),
        "vae_fingerprint": model_fingerprint(cfg.model.vae) if cfg.model.vae else None,
    }


def common_info(
    cfg: GenerationConfig,
    lora_file: Path | None,
    fuse_lora: bool,
    config: str | os.PathLike,
    *,
    method: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Record fields not compared on resume: where the models and the config came from (``method``: the script's)."""
    return {
        "base_model": cfg.model.pretrained_model,
        "vae_path": cfg.model.vae,
        **(method or {}),
        "lora_path": str(lora_file) if lora_file else None,
        "fuse_lora": fuse_lora if lora_file else None,
        "config": str(config),
    }


@dataclass
class PendingWork:
    """What a run will do: the images still to make (``todo``) out of ``total``; the same on every process."""

    out_dir: Path
    settings: dict[str, Any]
    todo: list[WorkItem]
    total: int

    def nothing_to_do_message(self) -> str:
        return f"nothing to do: all {self.total} images are in {self.out_dir} (metadata.jsonl lists them)"


def pending_work(
    items: Sequence[WorkItem],
    out_dir: str | os.PathLike,
    settings: dict[str, Any],
    *,
    overwrite: bool = False,
    state=None,
) -> PendingWork:
    """Compare the work list with what ``out_dir`` holds; call before loading the model (a finished rerun skips it).

    Writes nothing when ``out_dir`` does not exist yet: :func:`run_generation` creates it, so a run refused while
    loading (a LoRA that does not fit the model) leaves no empty folder behind.

    An image is done when its PNG and its record exist and the record's prompt, seed and ``settings`` (what
    decides the pixels besides those: steps, scheduler, model and adapter hashes, ...) match. Images made with
    other settings are an error unless ``overwrite`` (then they are made again).
    """
    from accelerate import PartialState

    state = state or PartialState()
    out_dir = Path(out_dir)
    if state.is_main_process and out_dir.is_dir():
        merge_metadata(out_dir)  # parts left by an interrupted run
    state.wait_for_everyone()

    metadata = out_dir / METADATA_FILE
    records = {r["file"]: r for r in read_metadata_records(metadata)} if metadata.is_file() else {}
    todo, stale = [], []
    for item in items:
        record = records.get(item.file)
        if record is None or not (out_dir / item.file).is_file():
            todo.append(item)
        elif diff := _mismatch(record, {"prompt": item.prompt, "seed": item.seed, **settings}):
            stale.append((item, diff))
    if stale and not overwrite:
        item, diff = stale[0]
        raise UserError(
            f"{out_dir} already holds {len(stale)} image(s) made with other settings (e.g. {item.file}: "
            f"{'; '.join(diff[:3])}); use another paths.infer_path, or set overwrite=true to regenerate them"
        )
    todo += [item for item, _ in stale]
    todo.sort(key=lambda it: (it.prompt_index, it.image_index))
    return PendingWork(out_dir, settings, todo, len(items))


def run_generation(
    work: PendingWork,
    generate: Callable[[list[WorkItem], list[Any]], list[Any]],
    *,
    info: dict[str, Any] | None = None,
    batch_size: int = 1,
    on_error: str = "stop",
    load_inputs: Callable[[WorkItem], Any] | None = None,
    state=None,
) -> GenerationSummary:
    """Make the images of ``work.todo``, split across the accelerate processes; merge the metadata at the end.

    Args:
        work: from :func:`pending_work`.
        generate: ``generate(batch, inputs) -> PIL images``, one per item, in order.
        info: extra record fields not compared on resume (config path, adapter path).
        batch_size: items per ``generate`` call.
        on_error: ``stop`` or ``skip`` for a UserError from ``load_inputs``.
        load_inputs: per-item input loading (e.g. a control image); with ``on_error: skip`` a UserError from it
            fails only that item.
        state: accelerate ``PartialState`` (one is made if None).
    """
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    state = state or PartialState()
    out_dir, settings = work.out_dir, work.settings
    summary = GenerationSummary(total=work.total, skipped=work.total - len(work.todo), out_dir=str(out_dir))
    start = time.perf_counter()
    failed: list[str] = []
    generated = 0
    out_dir.mkdir(
        parents=True, exist_ok=True
    )  # every process (exist_ok): pending_work leaves a new one unmade
    part_path = out_dir / f"metadata.part-{state.process_index:05d}.jsonl"
    with state.split_between_processes(work.todo) as mine, open(part_path, "a", encoding="utf-8") as part:
        bar = tqdm(total=len(mine), desc="generating", unit="img", disable=not state.is_main_process)
        for begin in range(0, len(mine), batch_size):
            batch, inputs = [], []
            for item in mine[begin : begin + batch_size]:
                try:
                    inputs.append(load_inputs(item) if load_inputs else None)
                    batch.append(item)
                except UserError as exc:
                    if on_error == "stop":
                        raise
                    failed.append(f"{item.file}: {exc}")
                    logger.warning("%s: %s; skipped (on_error=skip)", item.file, exc)
            if not batch:
                continue
            t0 = time.perf_counter()
            images = generate(batch, inputs)
            seconds = (time.perf_counter() - t0) / len(batch)
            for item, image in zip(batch, images, strict=True):
                atomic_write_bytes(
                    out_dir / item.file, png_bytes(image, {"prompt": item.prompt, "seed": str(item.seed)})
                )
                record = {
                    "file": item.file,
                    "prompt": item.prompt,
                    "seed": item.seed,
                    **settings,
                    "prompt_index": item.prompt_index,
                    "image_index": item.image_index,
                    **dict.fromkeys(
                        CSV_SOURCE_FIELDS.values()
                    ),  # same keys in every record (None: not from a CSV)
                    **item.source,
                    **(info or {}),
                    "time": datetime.now(UTC).isoformat(timespec="seconds"),
                    "seconds": round(seconds, 4),
                }
                part.write(json.dumps(record, ensure_ascii=False) + "\n")
                part.flush()  # the record follows its PNG: a crash loses at most this image, redone on rerun
                generated += 1
            bar.update(len(batch))
        bar.close()
    state.wait_for_everyone()
    per_process = gather_object([(generated, failed)]) if state.num_processes > 1 else [(generated, failed)]
    if state.is_main_process:
        merge_metadata(out_dir)
    state.wait_for_everyone()
    summary.generated = sum(g for g, _ in per_process)
    summary.failed = [reason for _, f in per_process for reason in f]
    summary.seconds = time.perf_counter() - start
    return summary
