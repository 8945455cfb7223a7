"""Benchmark: captions for a det_train-scale label file vs a bare stdlib ``json.load`` of the same file.

Usage:
    python bench/bench_captions.py [--repeat 2] [--workers N] [--keep] [--compare OTHER_SCRIPT.py]

Writes (once, cached, git-ignored) ``bench/_data/det_scale`` with
``python -m convert.make_mini_bdd --out bench/_data/det_scale --frames 69863 --labels-only``: det_train's real
frame count, ~18.4 boxes per frame, the real class shares. Then, in one run, it times

  (a) ``json.load`` of ``det_train.json`` in this process (stdlib, one core: the naive reader's floor), and
  (b) the whole caption run as users start it, in a subprocess: ``python convert/generate_bdd_captions.py
      --labels_file ... --caption_txt_output_folder <fresh temp folder>`` (interpreter start, imports, msgspec
      parsing, captions, ~70k caption file writes, summary),

and prints both and their ratio (target: (b)/(a) <= 1.0). For scale it also times (c) the file system's part
alone: the same number of ~200-byte files written the way the script writes them (generate_bdd_captions.CaptionWriter:
each created under its name and filled by one write(), one process) into another fresh folder. Before timing, a small
untimed run warms the memoised CLIP word counts (a first-ever run also builds the tokenizer, ~2 s). Other processes
share the cores: the load average before and after is printed with the figures. With --repeat N each is timed N
times, alternating (median, min and all shown; the ratio is of the medians). --compare times another version of the
script (e.g. a copy of the previous one) the same way, alternating with (b), for A/B figures from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "bench" / "_data" / "det_scale"
FRAMES = 69863  # det_train.json's real size
SCRIPT = REPO / "convert" / "generate_bdd_captions.py"


def ensure_data() -> Path:
    labels = DATA / "labels" / "det_20" / "det_train.json"
    if not labels.is_file():
        print(f"generating {DATA} (once) ...", flush=True)
        cmd = [sys.executable, "-m", "convert.make_mini_bdd", "--out", str(DATA), "--frames", str(FRAMES)]
        subprocess.run([*cmd, "--labels-only"], check=True, cwd=REPO)
    return labels


def time_json_load(path: Path) -> float:
    start = time.perf_counter()
    with open(path, "rb") as fh:
        data = json.load(fh)
    seconds = time.perf_counter() - start
    del data
    return seconds


def run_captions(labels: Path, out: Path, workers: int | None, script: Path = SCRIPT) -> tuple[float, str]:
    cmd = [sys.executable, str(script), "--labels_file", str(labels), "--caption_txt_output_folder", str(out)]
    if workers:
        cmd += ["--workers", str(workers)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"caption run failed ({proc.returncode}):\n{proc.stderr}")
    return seconds, proc.stderr


def time_writes_only(names: list[str], out: Path) -> float:
    from convert.generate_bdd_captions import CaptionWriter

    out.mkdir(parents=True)
    data = (
        b"A dashcam photo of a city street at night in clear weather, with three cars and a bus." * 2 + b"\n"
    )
    start = time.perf_counter()
    with CaptionWriter(out) as writer:
        for name in names:
            writer.write(name, data)
    return time.perf_counter() - start


def spread(times: list[float]) -> str:
    return f"min {min(times):.2f}, all: {', '.join(f'{t:.2f}' for t in times)}"


def warm_up(workers: int | None) -> Path:
    """Caption the first 3,000 val frames (untimed) so that the word-count cache holds the common words.

    Returns the temporary folder, deleted only after the timings (see main).
    """
    import msgspec

    from vocab import bdd

    frames = bdd.load_frames(DATA / "labels" / "det_20" / "det_val.json")[:3000]
    tmp = Path(tempfile.mkdtemp(prefix="bench-captions-warm-"))
    small = tmp / "det_val_head.json"
    small.write_bytes(msgspec.json.encode(frames))
    run_captions(small, tmp / "captions", workers)
    return tmp / "captions"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=1, help="times each measurement is taken (default 1)")
    parser.add_argument(
        "--workers", type=int, help="--workers for the caption run (default: its own, all cores)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the caption folders (printed)")
    parser.add_argument(
        "--compare", type=Path, help="another version of generate_bdd_captions.py to time as well (A/B)"
    )
    args = parser.parse_args()

    labels = ensure_data()
    size_mb = labels.stat().st_size / 1e6
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"date: {datetime.now().isoformat(timespec='minutes')}")
    print(f"input: {labels.relative_to(REPO)} ({size_mb:.0f} MB, {FRAMES} frames)")
    outs = [warm_up(args.workers)]
    load_before = os.getloadavg()

    json_times, caption_times, compare_times, summary = [], [], [], ""
    for round_ in range(args.repeat):
        json_times.append(time_json_load(labels))
        runs = [(SCRIPT, caption_times)] + ([(args.compare.resolve(), compare_times)] if args.compare else [])
        for script, times in runs[:: 1 if round_ % 2 == 0 else -1]:  # alternate which goes first
            outs.append(Path(tempfile.mkdtemp(prefix="bench-captions-")) / "captions")
            seconds, stderr = run_captions(labels, outs[-1], args.workers, script)
            times.append(seconds)
            if script == SCRIPT:
                summary = "\n".join(line for line in stderr.splitlines() if "bdd-sdxl.captions" in line)
                names_from = outs[-1]
    names = sorted(entry.name for entry in os.scandir(names_from))
    written = len(names)
    outs.append(Path(tempfile.mkdtemp(prefix="bench-captions-")) / "writes-only")
    writes_only = time_writes_only(names, outs[-1])
    load_after = os.getloadavg()
    # Deleted only now (the warm-up's 3,000 files too): on a journal-less ext4 (this VM's) the inode allocator
    # skips inodes freed in the last 1-6 minutes, rescanning them at every allocation in their block group, so
    # deleting files just before a timed run makes its file creation up to 10x slower.
    for out in outs:
        if args.keep:
            print(f"kept {out}")
        else:
            shutil.rmtree(out.parent, ignore_errors=True)

    a, b = statistics.median(json_times), statistics.median(caption_times)
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} (1 min)")
    print(f"(a) json.load (stdlib, in-process):           median {a:6.2f} s   {spread(json_times)}")
    print(f"(b) caption run (subprocess, {written} files): median {b:6.2f} s   {spread(caption_times)}")
    if compare_times:
        c = statistics.median(compare_times)
        print(f"(b') {args.compare}:  median {c:6.2f} s   {spread(compare_times)}   ratio to (a) {c / a:.2f}")
    print(f"(c) {written} caption-file writes alone, 1 process: {writes_only:6.2f} s")
    print(
        f"ratio (b)/(a) of medians: {b / a:.2f}   (target <= 1.0); of minima: {min(caption_times) / min(json_times):.2f}"
    )
    print("caption run's own summary (last run):")
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
