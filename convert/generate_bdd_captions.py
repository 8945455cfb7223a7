"""Write one caption .txt per labelled BDD100K frame, built from its labels, within CLIP's 77 tokens.

Usage:
    python convert/generate_bdd_captions.py --bdd_data_dir bdd100k --caption_txt_output_folder captions/train \\
        [--split train|val] [--labels_file F] [--workers K] [--templates FILE] [--include_unlabeled] \\
        [--overwrite] [--image_size 1280x720]

Reads ``labels/det_20/det_<split>.json``, else the legacy ``labels/bdd100k_labels_images_<split>.json``, else
the original 2018 per-image files ``labels/100k/<split>/<name>.json`` (a folder; the format is detected, and
--labels_file names any such file or folder, Scalabel exports included), and writes
``<caption_txt_output_folder>/<image base name>.txt`` (UTF-8, one line). The same scene gives the same caption in
every format (legacy names such as ``person``/``bike``/``motor`` are det_20's classes; light words or codes are
the same colours).
A caption says time of day, weather and scene, counts objects by class in words (traffic lights by colour),
and places the largest road users (left/ahead/right, near/far). For example, a det_20 frame at night in a
city street with three cars, two red lights, a bus and a pedestrian gives::

    A dashcam photo of a city street at night in clear weather, with three cars, two red traffic lights, \
a pedestrian and a bus. A bus close on the left, a car far ahead and a pedestrian far on the right.

and a legacy frame with an undefined scene and weather and one ``person``::

    A dashcam photo of a road in the daytime, with a pedestrian. A pedestrian far ahead.

Rules (phrases come from config/caption_templates.yaml; --templates names another file):

* 'undefined' (or unknown) attribute values are omitted; an unknown scene reads ``scene_unknown`` ("a road").
* Classes are listed by count, then in official order; counts 2-20 in words, larger ones in digits.
* det_20's ignored categories (other person, other vehicle, trailer) are by default named with their own
  nouns ("a person", "a special vehicle", "a trailer") and never merged into the evaluated classes, so that
  "three cars" always means three evaluated car boxes; ``ignored: merge|drop`` in the templates changes that.
  Legacy lanes and drivable areas are not described; unknown categories are counted in the summary.
* Every caption fits CLIP's 77 tokens as the real CLIP BPE tokenizer counts them (start and end included).
  When one does not, parts are dropped in this order: placement items (least salient first), ignored
  categories, light colours (merged into "traffic lights"), then the rarest classes one by one. The scene,
  time and weather and the most frequent classes stay.
* Frames whose ``labels`` are absent, null or [] are skipped (counted by reason) unless --include_unlabeled.
* Reruns are idempotent: identical captions are not rewritten; an existing caption with different content
  stops the run before anything is written (use --overwrite); other files in the folder are left alone.
  No file ever holds part of a caption: a new one is created under its name and filled by a single write() of
  under one page, which lands whole or not at all; a killed run can leave an empty file, and a rerun writes it
  (empty files count as unfinished). Replacements go through a temporary file + rename.

Speed: labels are decoded by msgspec (bdd.load_frames), token counts are memoised per word (convert/captions.py),
large inputs are captioned by --workers forked processes (all cores by default) while the main process writes.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import logging
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from convert.bdd_inputs import resolve_bdd_inputs
from convert.captions import (
    CLIP_WINDOW,
    DEFAULT_TEMPLATES,
    CaptionBuilder,
    load_templates,
    load_token_counter,
    save_token_counter,
)
from core.cli import UserError, run_main, setup_logging
from vocab import bdd

SMALL_INPUT_FRAMES = 4000  # below this, forking workers costs more than it saves
CHUNK_FRAMES = 2000  # frames per worker task (progress granularity)
log = logging.getLogger("bdd-sdxl.captions")

SKIP_REASONS = {
    "absent": "no 'labels' key",
    "null": "'labels': null",
    "empty": "'labels': []",
    "duplicate": "duplicate frame name (first kept)",
    "no_name": "empty frame name",
}

# ---------------------------------------------------------------------------------------------------------------
# Files: one task = caption a list of frames and write (or compare) their .txt files
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TaskResult:
    frames: int = 0
    written: int = 0
    unchanged: int = 0
    replaced: int = 0
    completed: int = 0  # of ``written``: empty files left by a killed run, now filled
    shortened: int = 0
    conflicts: list[str] = field(default_factory=list)  # existing captions that differ (left untouched)
    unfinished: list[int] = field(default_factory=list)  # frames whose caption file is empty (compare pass)
    histogram: Counter = field(default_factory=Counter)
    report: bdd.LabelReport = field(default_factory=bdd.LabelReport)
    new_token_counts: dict[str, int] = field(default_factory=dict)
    processes: int = 1
    to_write: list[tuple[str, bytes, bool]] = field(default_factory=list)  # (name, data, replaces a file)

    def merge(self, other: TaskResult) -> None:
        self.frames += other.frames
        self.written += other.written
        self.unchanged += other.unchanged
        self.replaced += other.replaced
        self.completed += other.completed
        self.shortened += other.shortened
        self.conflicts += other.conflicts
        self.unfinished += other.unfinished
        self.histogram.update(other.histogram)
        self.report.merge(other.report)
        self.new_token_counts.update(other.new_token_counts)
        self.processes = max(self.processes, other.processes)


@dataclass
class Job:
    """Everything a task needs; set before forking so that workers inherit it without pickling."""

    frames: list[bdd.Frame]
    stems: list[str]
    out_dir: Path
    builder: CaptionBuilder
    existing: set[str]  # caption file names already in out_dir
    overwrite: bool


_JOB: Job | None = None
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
# A signal stops a write() to a local file only between pages: one page at offset 0 lands whole or not at all.
ONE_WRITE_BYTES = 4096


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_small_file(folder: str, name: str, data: bytes) -> None:
    """Write ``folder/name`` atomically: a hidden temporary sibling, then a rename (no fsync).

    The same contract as core.io.atomic_write_bytes, with raw os calls instead of file objects.
    """
    tmp = os.path.join(folder, f".{name}.tmp{os.getpid()}")
    try:
        fd = os.open(tmp, _WRITE_FLAGS, 0o666)
        try:
            _write_all(fd, data)
        finally:
            os.close(fd)
        os.replace(tmp, os.path.join(folder, name))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class CaptionWriter:
    """Write caption files into one folder so that a name never shows part of its content (no fsync).

    A new caption (one page at most, as every caption is) is created under its own name and filled by a single
    ``write()``: the fastest way to make a file (one directory entry, no temporary name, no rename), and a
    ``write()`` of one page lands whole or not at all, so a killed run can leave at most an *empty* file, never
    a partial one. Captions are never empty: a rerun takes an empty caption file for one that was being written
    and completes it (see :func:`run_task`). Replacements, larger files and names that appeared meanwhile use
    :func:`write_small_file` (temporary sibling + rename). A failed write removes the name it created.
    """

    def __init__(self, folder: Path):
        self.folder = str(folder)
        self.dir_fd = os.open(self.folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))

    def __enter__(self) -> CaptionWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        os.close(self.dir_fd)

    def write(self, name: str, data: bytes, replace: bool = False) -> None:
        self.write_many([(name, data, replace)])

    def write_many(self, items: Sequence[tuple[str, bytes, bool]]) -> None:
        """Write each ``(name, data, replace)``; an OSError names the file in its ``filename``."""
        dir_fd, open_, write, close = self.dir_fd, os.open, os.write, os.close  # locals: ~70k calls each
        for name, data, replace in items:
            try:
                if replace or len(data) > ONE_WRITE_BYTES:
                    write_small_file(self.folder, name, data)
                    continue
                try:
                    fd = open_(name, _CREATE_FLAGS, 0o666, dir_fd=dir_fd)
                except FileExistsError:  # created meanwhile: replaced, as a rename would
                    write_small_file(self.folder, name, data)
                    continue
                try:
                    try:
                        written = write(fd, data)
                        # never for one page on a local disk; an error rather than half a caption
                        if written != len(data):
                            raise OSError(errno.EIO, f"short write ({written} of {len(data)} bytes)")
                    finally:
                        close(fd)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(name, dir_fd=dir_fd)  # leave no empty or short file behind on an error
                    raise
            except OSError as exc:
                exc.filename = name
                raise


def run_task(task: tuple[list[int], bool]) -> TaskResult:
    """Caption frames ``indices`` and compare them with existing files; ``to_write`` lists what to write.

    Tasks never write: the main process does (one writer per folder; two processes creating files in one
    folder wait on its lock and were 2-3x slower than one). ``write=False`` only looks for conflicts.
    """
    indices, write = task
    job = _JOB
    assert job is not None
    result = TaskResult(frames=len(indices))
    builder, existing, folder = job.builder, job.existing, str(job.out_dir)
    histogram, to_write = result.histogram, result.to_write
    for i in indices:
        frame = job.frames[i]
        name = job.stems[i] + ".txt"
        old = None
        if name in existing:
            try:
                with open(os.path.join(folder, name), "rb") as fh:
                    old = fh.read()
            except OSError as exc:
                raise UserError(f"cannot read caption {job.out_dir / name}: {exc.strerror or exc}") from None
            # empty: a run was killed while writing it; the writing pass completes it
            if not old and not write:
                result.unfinished.append(i)
                continue
        text, counts, shortened = builder.caption(frame)
        result.report.check_frame(frame)
        for key, n in counts.items():  # Counter.update's own loop, without its per-call overhead
            histogram[key] += n
        result.shortened += shortened
        data = (text + "\n").encode("utf-8")
        if old is None:
            if write:
                to_write.append((name, data, False))
                result.written += 1
        elif old == data:
            result.unchanged += 1
        elif not old:  # captions are never empty: this one was being written when a run was killed
            if write:
                to_write.append((name, data, True))
                result.written += 1
                result.completed += 1
        elif not job.overwrite:
            result.conflicts.append(name)
        elif write:
            to_write.append((name, data, True))
            result.replaced += 1
    result.new_token_counts = dict(builder.count_tokens.new)
    builder.count_tokens.new.clear()
    return result


def run_tasks(job: Job, indices: list[int], write: bool, workers: int) -> TaskResult:
    """Run ``indices`` in chunks, in-process for small inputs, else in ``workers`` forked processes, and write
    each chunk's captions here as its result comes in (while the workers caption the next chunks)."""
    from tqdm import tqdm

    total = TaskResult()
    chunk = max(1, min(CHUNK_FRAMES, -(-len(indices) // (workers * 4))))
    tasks = [(indices[i : i + chunk], write) for i in range(0, len(indices), chunk)]
    with contextlib.ExitStack() as stack:
        _set_job(job)
        stack.callback(_set_job, None)
        writer = stack.enter_context(CaptionWriter(job.out_dir)) if write and indices else None
        small = len(indices) < SMALL_INPUT_FRAMES
        bar = stack.enter_context(
            tqdm(total=len(indices), unit="frame", desc="captions", disable=small or None)
        )
        if workers <= 1 or small:
            results = map(run_task, tasks)
        else:
            import multiprocessing

            total.processes = min(workers, len(tasks))
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(total.processes))
            results = pool.imap_unordered(run_task, tasks)
        for res in results:
            if writer is not None:
                try:
                    writer.write_many(res.to_write)
                except OSError as exc:
                    raise UserError(
                        f"cannot write caption {job.out_dir / exc.filename}: {exc.strerror or exc}"
                    ) from None
            res.to_write = []
            total.merge(res)
            bar.update(res.frames)
    total.conflicts.sort()
    return total


def _set_job(job: Job | None) -> None:
    global _JOB
    _JOB = job


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--bdd_data_dir", help="BDD100K root (holding images/ and labels/)")
    parser.add_argument(
        "--caption_txt_output_folder", required=True, help="folder for the <name>.txt captions"
    )
    parser.add_argument(
        "--split", default="train", choices=("train", "val"), help="label split (default: train)"
    )
    parser.add_argument(
        "--labels_file",
        help="label JSON (det_20, legacy, Scalabel or one image's 2018 file), or a folder of per-image JSON "
        "files, to read instead of the labels found under --bdd_data_dir",
    )
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)"
    )
    parser.add_argument("--templates", help=f"caption templates YAML (default: {DEFAULT_TEMPLATES.name})")
    parser.add_argument("--include_unlabeled", action="store_true", help="caption frames without labels too")
    parser.add_argument("--overwrite", action="store_true", help="replace existing captions that differ")
    parser.add_argument(
        "--image_size",
        help="WxH the boxes refer to (default: the first image's size under images/, else 1280x720)",
    )
    args = parser.parse_args(argv)
    if not args.bdd_data_dir and not args.labels_file:
        parser.error("pass --bdd_data_dir (or --labels_file)")
    if args.workers < 1:
        parser.error("--workers must be >= 1")
    return args


def select_frames(
    frames: Sequence[bdd.Frame], include_unlabeled: bool
) -> tuple[list[int], list[str], Counter, bdd.LabelReport]:
    """Indices of the frames to caption, every frame's caption stem, skip counts by reason, skipped frames' report."""
    # bdd.stem, with a fast path for plain BDD names ("<hex>-<hex>.jpg": no folder, no legacy "_" suffix)
    stems = [
        f.name[:-4]
        if f.name.endswith(".jpg") and len(f.name) > 4 and "/" not in f.name and "_" not in f.name
        else bdd.stem(f.name)
        for f in frames
    ]
    skipped: Counter = Counter()
    report = bdd.LabelReport()  # the captioned frames are checked by the tasks
    selected, seen = [], set()
    for i, frame in enumerate(frames):
        state = frame.labels_state
        reason = None
        if not stems[i]:
            reason = "no_name"
        elif state != "ok" and not include_unlabeled:
            reason = state
        elif stems[i] in seen:
            reason = "duplicate"
        if reason is None:
            seen.add(stems[i])
            selected.append(i)
        else:
            skipped[reason] += 1
            report.check_frame(frame)
    return selected, stems, skipped, report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    start = time.perf_counter()

    # Inputs: templates first (a bad file fails in milliseconds), then the labels.
    templates = load_templates(args.templates)
    inputs = resolve_bdd_inputs(args.bdd_data_dir, args.split, args.labels_file, args.image_size)
    labels_file = inputs.labels_file
    out_dir = Path(args.caption_txt_output_folder)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--caption_txt_output_folder {out_dir} is a file, not a folder")
    frames = bdd.load_frames(labels_file)  # decoded with the collector paused (see bdd.decode_frames)
    out_dir.mkdir(parents=True, exist_ok=True)  # only once the labels have parsed
    kind = bdd.detect_format(frames)
    log.info(
        "read %d frames from %s (%s) in %.1f s",
        len(frames),
        labels_file,
        f"per-image files, {kind}" if labels_file.is_dir() else kind,
        time.perf_counter() - start,
    )
    gc.freeze()  # a million label structs: keep the collector (and forked workers' copy-on-write) off them
    try:
        # Setup: which frames, what exists already, a builder whose token counts are warm before forking.
        selected, stems, skipped, skipped_report = select_frames(frames, args.include_unlabeled)
        builder = CaptionBuilder(templates, load_token_counter(), inputs.image_size)
        builder.check_fits()
        for i in selected[:200]:
            builder.caption(frames[i])
        existing = set(os.listdir(out_dir)) & {stems[i] + ".txt" for i in selected}
        job = Job(frames, stems, out_dir, builder, existing, args.overwrite)

        # Loop: with existing captions and no --overwrite, compare first so that a refusal writes nothing.
        total = TaskResult()
        todo = selected
        if existing and not args.overwrite:
            total = run_tasks(
                job, [i for i in selected if stems[i] + ".txt" in existing], False, args.workers
            )
            if total.conflicts:
                save_token_counter(builder.count_tokens, total.new_token_counts)
                shown = ", ".join(total.conflicts[:5]) + (", ..." if len(total.conflicts) > 5 else "")
                raise UserError(
                    f"{len(total.conflicts)} existing captions in {out_dir} differ from the new ones ({shown}); "
                    "nothing was written: pass --overwrite to replace them, or choose another output folder"
                )
            todo = [i for i in selected if stems[i] + ".txt" not in existing] + total.unfinished
        total.merge(run_tasks(job, todo, True, args.workers))
        total.report.merge(skipped_report)
    finally:
        gc.unfreeze()

    # Save: the token counts learnt on the way, then the summary.
    save_token_counter(builder.count_tokens, total.new_token_counts)
    log_summary(len(frames), out_dir, total, skipped, args.include_unlabeled)
    log.info("done in %.1f s (%d processes)", time.perf_counter() - start, total.processes)
    return 0


def log_summary(
    n_frames: int,
    out_dir: Path,
    total: TaskResult,
    skipped: Counter,
    include_unlabeled: bool,
) -> None:
    log.info(
        "frames read: %d; captions written: %d, unchanged: %d, replaced: %d -> %s",
        n_frames,
        total.written,
        total.unchanged,
        total.replaced,
        out_dir,
    )
    if total.completed:
        log.info("empty captions left by an interrupted run, now written: %d", total.completed)
    if skipped:
        reasons = ", ".join(f"{SKIP_REASONS[k]}: {v}" for k, v in sorted(skipped.items()))
        hint = "" if include_unlabeled else " (--include_unlabeled captions them from their attributes)"
        log.info("frames skipped: %d (%s)%s", sum(skipped.values()), reasons, hint)
    else:
        log.info("frames skipped: 0")
    if total.shortened:
        log.info("captions shortened to fit %d CLIP tokens: %d", CLIP_WINDOW, total.shortened)
    for line in total.report.lines():
        log.warning("%s (left out of captions)", line)
    hist = sorted(total.histogram.items(), key=lambda kv: (-kv[1], kv[0]))
    log.info("objects by class: %s", ", ".join(f"{k} {v}" for k, v in hist) or "none")


if __name__ == "__main__":
    sys.exit(run_main(main))
