"""The sweep's runs: several at once, one per device of ``train.devices``, each in its own process
(:func:`train_concurrently`), or one after another in this process (:func:`train_in_turn`).

ultralytics keeps global state (its seeds, the device, the dataloader workers), so concurrent trainings must not
share a process: each run is a subprocess, ``python -m annotation.gain.parallel <job.json>``, that trains and
scores one arm with :func:`annotation.gain.runner.train_and_evaluate`, exactly as the sequential loop does in
process, and writes the same ``result.json`` (same seed and data: the same figures). One thread per device takes
the next run that is neither finished nor locked (:class:`annotation.gain.runner.RunLock`, so several hosts may
share one ``--out``), starts its process with that device and waits for it. Each run's output goes to
``runs/<run>.log``; the main process prints one line when a run starts and one when it ends.

A device may repeat (``[cpu, cpu]``: two CPU trainings at once; ``[0, 0]``: two on one GPU when memory allows).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from annotation.gain import runner
from annotation.gain.data import Item
from annotation.gain.design import Arm, Schedule
from annotation.gain.stats import pct
from core.cli import UserError, run_main
from core.io import atomic_write_text

#: lines of a failed run's log shown in its error
LOG_TAIL = 15


@dataclass(frozen=True)
class TrainSettings:
    """What every run of a sweep trains with besides its arm and device."""

    key: str
    model: str
    imgsz: int
    batch: int
    workers: int
    train_args: dict[str, Any]
    convergence_check: bool


def job_path(out: Path, arm: Arm) -> Path:
    return out / "runs" / f".{arm.name}.job.json"


def log_path(out: Path, arm: Arm) -> Path:
    return out / "runs" / f"{arm.name}.log"


def items_json(items: Sequence[Item]) -> list[list[str]]:
    return [[i.key, str(i.image), str(i.label)] for i in items]


def items_of(rows: Sequence[Sequence[str]]) -> tuple[Item, ...]:
    return tuple(Item(k, Path(image), Path(label)) for k, image, label in rows)


def write_job(
    out: Path, arm: Arm, schedule: Schedule, val: runner.ValSet, settings: TrainSettings, device: str
) -> Path:
    """The job file a worker process reads: everything :func:`runner.train_and_evaluate` takes."""
    job = {
        "out": str(out.resolve()),
        "arm": {
            "share": arm.share, "seed": arm.seed, "kind": arm.kind, "spoil": arm.spoil,
            "real": items_json(arm.real), "synthetic": items_json(arm.synthetic),
            "extra_real": items_json(arm.extra_real),
        },
        "schedule": asdict(schedule),
        "val": {"items": items_json(val.items), "groups": val.groups},
        "settings": asdict(settings),
        "device": device,
    }  # fmt: skip
    path = job_path(out, arm)
    atomic_write_text(path, json.dumps(job) + "\n")
    return path


def run_job(path: Path) -> dict[str, Any]:
    """Train and score the job's arm (the worker process's work)."""
    from annotation import yolo_runtime

    job = json.loads(path.read_text(encoding="utf-8"))
    out = Path(job["out"])
    yolo_runtime.prepare_offline(out / ".ultralytics")
    a = job["arm"]
    arm = Arm(
        a["share"], a["seed"], items_of(a["real"]), items_of(a["synthetic"]), kind=a["kind"],
        extra_real=items_of(a["extra_real"]), spoil=a["spoil"],
    )  # fmt: skip
    val = runner.ValSet(list(items_of(job["val"]["items"])), {}, job["val"]["groups"])
    s = TrainSettings(**job["settings"])
    return runner.train_and_evaluate(
        out, arm, Schedule(**job["schedule"]), val, key=s.key, model=s.model, imgsz=s.imgsz, batch=s.batch,
        device=job["device"], workers=s.workers, train_args=s.train_args, convergence_check=s.convergence_check,
        progress=False,
    )  # fmt: skip


def train_concurrently(
    out: Path,
    arms: Sequence[Arm],
    schedule: Schedule,
    val: runner.ValSet,
    settings: TrainSettings,
    devices: Sequence[str],
    label: Callable[[Arm], str],
) -> tuple[list[dict[str, Any]], list[str], list[str]]:
    """Train ``arms`` (finished ones already left out) over ``devices``, one process per run; returns (results,
    runs another process holds, error lines of failed runs)."""
    pending = list(arms)
    results: list[dict[str, Any]] = []
    held: list[str] = []
    failed: list[str] = []
    guard = threading.Lock()
    procs: dict[str, subprocess.Popen] = {}

    def next_arm() -> tuple[Arm, runner.RunLock] | None:
        with guard:
            while pending:
                arm = pending.pop(0)
                done = runner.finished_result(runner.run_folder(out, arm), settings.key)
                if done is not None:  # another host finished it meanwhile
                    results.append(done)
                    continue
                lock = runner.RunLock.of(out, arm)
                if lock.acquire():
                    return arm, lock
                held.append(arm.name)
                print(f"{label(arm)}: skipped, another process is training it (rerun later to collect it)")
            return None

    def work(slot: int, device: str) -> None:
        while (taken := next_arm()) is not None:
            arm, lock = taken
            try:
                job = write_job(out, arm, schedule, val, settings, device)
                log = log_path(out, arm)
                with guard:
                    print(f"{label(arm)}: training on device {device or 'auto'} (log: {log})", flush=True)
                with log.open("w", encoding="utf-8") as fh:
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "annotation.gain.parallel", str(job)],
                        stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                    )  # fmt: skip
                    with guard:
                        procs[f"{slot}"] = proc
                    code = proc.wait()
                result = runner.finished_result(runner.run_folder(out, arm), settings.key)
                with guard:
                    if code == 0 and result is not None:
                        results.append(result)
                        print(
                            f"{label(arm)}: done in {result['train_seconds']:.0f} s on device {device or 'auto'}: "
                            f"mAP50-95 {pct(result['metrics']['map'])}",
                            flush=True,
                        )
                    else:
                        tail = (
                            log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-LOG_TAIL:]
                        )
                        failed.append(f"{arm.name} (exit {code}; {log}):\n    " + "\n    ".join(tail))
                        print(f"{label(arm)}: FAILED (exit {code}); see {log}", flush=True)
                job.unlink(missing_ok=True)
            finally:
                lock.release()

    threads = [threading.Thread(target=work, args=(n, d), daemon=True) for n, d in enumerate(devices)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(timeout=0.5)
    except KeyboardInterrupt:
        with guard:
            pending.clear()
            for proc in procs.values():
                if proc.poll() is None:
                    proc.terminate()
        raise
    return results, held, failed


def train_in_turn(
    out: Path,
    arms: Sequence[Arm],
    schedule: Schedule,
    val: runner.ValSet,
    settings: TrainSettings,
    device: str,
    label: Callable[[Arm], str],
) -> tuple[list[dict[str, Any]], list[str]]:
    """Train ``arms`` one after another in this process on ``device``, each under its lock (a run another process
    holds is skipped and named); returns the results and the names of the skipped runs."""
    results: list[dict[str, Any]] = []
    held: list[str] = []
    for arm in arms:
        lock = runner.RunLock.of(out, arm)
        if not lock.acquire():
            print(f"{label(arm)}: skipped, another process is training it (rerun later to collect it)")
            held.append(arm.name)
            continue
        try:
            print(
                f"{label(arm)}: training on {arm.real_budget} real + {len(arm.synthetic)} synthetic images "
                f"({schedule.list_length} list entries per epoch)",
                flush=True,
            )
            result = runner.train_and_evaluate(
                out, arm, schedule, val, key=settings.key, model=settings.model, imgsz=settings.imgsz,
                batch=settings.batch, device=device, workers=settings.workers, train_args=dict(settings.train_args),
                convergence_check=settings.convergence_check,
            )  # fmt: skip
        finally:
            lock.release()
        print(
            f"{label(arm)}: done in {result['train_seconds']:.0f} s: mAP50-95 {pct(result['metrics']['map'])}, "
            f"mAP50 {pct(result['metrics']['map50'])}",
            flush=True,
        )
        results.append(result)
    return results, held


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        raise UserError("usage: python -m annotation.gain.parallel <job.json> (written by evaluate_gain.py)")
    result = run_job(Path(args[0]))
    print(
        f"{result['arm']} share {result['share']:g} seed {result['seed']}: mAP50-95 {result['metrics']['map']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
