"""The loop's steps as the commands a user would type, their keys, and the state file that makes them resumable.

A step is a command (argv and environment) with the steps it depends on, the input files it reads from outside
the loop's folder, the outputs that say it finished, and its own folder under ``out``. Its **key** hashes the
command, the keys of the steps it depends on and fingerprints of its inputs (a file's SHA-256, or size and mtime
above :data:`HASH_LIMIT`; a folder's names, sizes and mtimes), so a changed setting, input or upstream step gives a
new key, and only then, the step and everything after it run again.

``<out>/loop_state.json`` (written atomically) records per step the key it ``started`` with and the key it
``finished`` with. A step is

* **kept** when its finished key is the current key and its outputs exist;
* **resumed** when it started with the current key but did not finish (killed): its folder is left as it is,
  since every stage resumes its own work (generation skips finished images, annotation finished records, gain
  finished runs);
* **run** otherwise, in an emptied folder (a stage would refuse or mix outputs made under other settings), except
  the files a step keeps across runs (diagnose's targets.yaml, which the user may have edited).

Nothing here imports another stage: each step runs as a subprocess (:func:`run_command`), its command line logged
to the console and to ``<out>/loop.log`` with everything it prints.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.cli import UserError
from core.io import atomic_write_text, sha256_file

STATE_FILE = "loop_state.json"
LOG_FILE = "loop.log"
HASH_LIMIT = 512 << 20  # files above this are fingerprinted by size and mtime (weights of several GB)


@dataclass
class Step:
    name: str
    deps: tuple[str, ...]
    argv: list[str] | None  # None: runs in-process (``action``)
    folder: Path
    outputs: list[Path]
    inputs: list[Path] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    keep: tuple[str, ...] = ()  # files in ``folder`` that survive a fresh run
    action: Callable[[], None] | None = None
    note: str = ""

    def command_line(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in self.env.items())
        return (env + " " if env else "") + shlex.join(
            self.argv or [f"(in-process: {self.note or self.name})"]
        )


# ---------------------------------------------------------------------------------------------------------------
# Keys: settings + upstream keys + input fingerprints
# ---------------------------------------------------------------------------------------------------------------


def fingerprint(path: Path) -> str:
    """A file's content hash (size and mtime above HASH_LIMIT), a folder's listing with sizes and mtimes."""
    if path.is_file():
        st = path.stat()
        if st.st_size > HASH_LIMIT:
            return f"size {st.st_size} mtime {st.st_mtime_ns}"
        return "sha256 " + sha256_file(path)
    if path.is_dir():
        h = hashlib.sha256()
        for root, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                p = Path(root) / name
                try:
                    st = p.stat()
                except OSError:
                    continue
                h.update(f"{p.relative_to(path).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return "tree " + h.hexdigest()
    return "missing"


def step_key(step: Step, upstream: dict[str, str]) -> str:
    payload = {
        "step": step.name,
        "argv": step.argv if step.argv is not None else step.note,
        "env": step.env,
        "upstream": {d: upstream[d] for d in step.deps},
        "inputs": {str(p): fingerprint(p) for p in step.inputs},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def path_inputs(argv: Sequence[str], out: Path) -> list[Path]:
    """Existing files and folders named by the command (as words or as ``key=value`` values) outside ``out``."""
    found: list[Path] = []
    out = out.resolve()
    for word in argv:
        value = word.split("=", 1)[1] if "=" in word and not word.startswith("-") else word
        if not value or value.startswith("-") or "\n" in value:
            continue
        p = Path(value).expanduser()
        try:
            if not p.exists() or p.resolve() == out or out in p.resolve().parents:
                continue
        except OSError:
            continue
        if p.resolve() != Path(sys.executable).resolve() and p not in found:
            found.append(p)
    return found


# ---------------------------------------------------------------------------------------------------------------
# The state file
# ---------------------------------------------------------------------------------------------------------------


class State:
    def __init__(self, out: Path) -> None:
        self.path = out / STATE_FILE
        self.data: dict[str, Any] = {"started": {}, "finished": {}}
        if self.path.is_file():
            try:
                self.data = json.loads(self.path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise UserError(
                    f"{self.path} is not valid JSON ({exc}); delete it to rerun every step"
                ) from None

    def finished_key(self, name: str) -> str | None:
        return (self.data["finished"].get(name) or {}).get("key")

    def started_key(self, name: str) -> str | None:
        return self.data["started"].get(name)

    def start(self, name: str, key: str) -> None:
        self.data["started"][name] = key
        self.save()

    def finish(self, name: str, key: str, seconds: float) -> None:
        self.data["finished"][name] = {
            "key": key,
            "seconds": round(seconds, 1),
            "at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.data, indent=2) + "\n")


def decide(step: Step, key: str, state: State) -> str:
    """'keep', 'resume' or 'run' (see the module docstring)."""
    if state.finished_key(step.name) == key and all(p.exists() for p in step.outputs):
        return "keep"
    if state.started_key(step.name) == key:
        return "resume"
    return "run"


def clear_folder(step: Step) -> None:
    """Empty the step's folder for a fresh run, keeping ``step.keep``."""
    if not step.folder.is_dir():
        return
    for child in step.folder.iterdir():
        if child.name in step.keep:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


# ---------------------------------------------------------------------------------------------------------------
# Running a command
# ---------------------------------------------------------------------------------------------------------------


def log_line(log_path: Path, text: str, echo: bool = True) -> None:
    if echo:
        print(text, flush=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a", encoding="utf-8") as fh:
        fh.write(text + "\n")


def run_command(step: Step, log_path: Path) -> None:
    """Run ``step.argv`` with ``step.env`` added to the environment; its output goes to the console and the log.
    A non-zero exit is a UserError naming the step, its exit code and the log."""
    assert step.argv is not None
    env = {**os.environ, **step.env}
    with (
        log_path.open("a", encoding="utf-8") as log,
        subprocess.Popen(
            step.argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        ) as proc,
    ):
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
            log.flush()
    if proc.returncode != 0:
        raise UserError(
            f"step {step.name} failed (exit code {proc.returncode}): {step.command_line()}; its output is above and in "
            f"{log_path}. Fix the cause and rerun the loop: finished steps are kept, this one resumes"
        )


def run_steps(
    steps: Sequence[Step], state: State, log_path: Path, runner: Callable[[Step, Path], None]
) -> None:
    """Run the steps in order: keep, resume or run each (keys computed just before, after its upstream ran)."""
    keys: dict[str, str] = {}
    for step in steps:
        key = step_key(step, keys)
        keys[step.name] = key
        action = decide(step, key, state)
        if action == "keep":
            log_line(log_path, f"== {step.name}: kept (up to date, key {key})")
            continue
        if action == "run":
            clear_folder(step)
            state.start(step.name, key)
        log_line(log_path, f"== {step.name}: {'resuming' if action == 'resume' else 'running'} (key {key})")
        log_line(log_path, f"$ {step.command_line()}")
        step.folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        if step.action is not None:
            step.action()
        else:
            runner(step, log_path)
        missing = [str(p) for p in step.outputs if not p.exists()]
        if missing:
            raise UserError(
                f"step {step.name} finished but did not write {', '.join(missing)}; see {log_path}"
            )
        state.finish(step.name, key, time.perf_counter() - started)
        log_line(log_path, f"== {step.name}: done in {time.perf_counter() - started:.1f} s")


def plan_of_steps(steps: Sequence[Step], state: State) -> list[tuple[Step, str]]:
    """What a run would do, without running: (step, what and why). A step after one that runs, runs."""
    keys: dict[str, str] = {}
    runs: set[str] = set()
    out = []
    for step in steps:
        upstream = [d for d in step.deps if d in runs]
        if upstream:
            runs.add(step.name)
            out.append((step, f"run (after {', '.join(upstream)})"))
            continue
        key = step_key(step, keys)
        keys[step.name] = key
        action = decide(step, key, state)
        if action == "keep":
            out.append((step, f"keep (up to date, key {key})"))
            continue
        runs.add(step.name)
        if action == "resume":
            why = "resume (interrupted under the same key)"
        elif state.finished_key(step.name) or state.started_key(step.name):
            why = "run (settings, inputs or an upstream step changed)"
        else:
            why = "run (new)"
        out.append((step, why))
    return out
