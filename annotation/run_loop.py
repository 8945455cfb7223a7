"""One loop from "where is my detector weak" to data that targets it, and a before/after report.

Usage::

    bash annotation/run_loop.sh config/loop.yaml [--check] [key=value ...]     # the launcher (.env, then this)
    python -m annotation.run_loop --config config/loop.yaml [--check] [key=value ...]

Steps, each the documented command of its stage (logged with its exact command line to the console and to
``<out>/loop.log``), each in its own folder under ``out``:

1. ``diagnose``  ``python -m annotation.diagnose``: the detector on the real val frames, mAP per class x weather x
   time of day with bootstrap intervals; the weakest cells -> ``diagnose/targets.yaml`` (edit it: kept);
2. ``plan``      ``python -m convert.plan_generation --split train``: scenes for those targets from the TRAIN
   frames' layouts (never the val frames the gain is scored on) -> ``plan/plan.jsonl``;
3. ``generate``  ``bash ai/controlnet/run_controlnet_infer.sh``: the box-layout ControlNet draws the plan
   (accelerate launch) -> ``generate/generations/``;
4. ``annotate``  ``python -m annotation.yolo_annotate_folders``: stage 4's labels of the generations (the
   annotation config's label source, consensus by default) -> ``annotated/data.yaml``;
5. ``gain``      ``python -m annotation.evaluate_gain``: real-only vs real + synthetic (and whatever arms the gain
   config adds) on the real val frames -> ``gain/gain.json``;
6. ``report``    per weak cell before/after, stage 4's agreement on the generations, a plot -> ``report/``.

Every step is skipped when its key (its command, the keys of the steps before it, fingerprints of its input files)
matches the one it last finished with, resumes when it was killed under the same key, and reruns in an emptied
folder otherwise, which changes the keys after it (annotation/loop/steps.py). ``--check`` validates the config and
the inputs (and diagnose's settings, through its own ``--check``) and prints which steps would run or be kept.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from annotation.loop import steps as loop_steps
from annotation.loop.config import LoopConfig, as_text, dotted
from annotation.loop.report import REPORT_FILES, write_report
from core.cli import UserError, run_main
from core.config import add_config_arguments, load_config, save_resolved_config

REPO_ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = REPO_ROOT / "ai" / "controlnet" / "run_controlnet_infer.sh"


def overrides(mapping: dict) -> list[str]:
    return [f"{k}={as_text(v)}" for k, v in dotted(mapping).items()]


def flags(mapping: dict) -> list[str]:
    words: list[str] = []
    for key, value in mapping.items():
        if value is True:
            words.append(f"--{key}")
        elif value not in (None, False):
            words += [f"--{key}", ",".join(map(str, value)) if isinstance(value, list) else as_text(value)]
    return words


def repo_path(value: str) -> str:
    """A stage config named relative to the current folder, else to the repo root (as the launchers find them)."""
    return value if Path(value).is_file() or not (REPO_ROOT / value).is_file() else str(REPO_ROOT / value)


def build_steps(cfg: LoopConfig) -> list[loop_steps.Step]:
    """The six steps, with their commands as a user would type them."""
    out = cfg.out_dir
    configs = {name: repo_path(value) for name, value in cfg.configs.model_dump().items()}
    py = sys.executable
    env = {"PYTHONPATH": str(REPO_ROOT)}
    d = {name: out / name for name in ("diagnose", "plan", "generate", "annotated", "gain", "report")}
    targets = d["diagnose"] / "targets.yaml"
    data_inputs = [
        Path(p).parent / extra for p in {cfg.data.real, cfg.data.val} for extra in ("frames.csv", "labels")
    ]

    def step(name, deps, argv, folder, outputs, extra_inputs=(), step_env=None, **kw) -> loop_steps.Step:
        inputs = loop_steps.path_inputs(argv or [], out) + [p for p in extra_inputs if p not in (argv or [])]
        step_env = {**env, **(step_env or {})} if argv is not None else {}
        return loop_steps.Step(name, deps, argv, folder, outputs, inputs, step_env, **kw)

    gen_env = {"PYTHON": py}
    if cfg.accelerate_config:
        gen_env["ACCELERATE_CONFIG"] = cfg.accelerate_config
    return [
        step(
            "diagnose",
            (),
            [
                py,
                "-m",
                "annotation.diagnose",
                "--config",
                configs["diagnose"],
                "--val",
                cfg.data.val,
                "--detector",
                cfg.detector,
                "--out",
                str(d["diagnose"]),
                *overrides(cfg.diagnose),
            ],
            d["diagnose"],
            [d["diagnose"] / "diagnose.json", targets],
            data_inputs,
            keep=("targets.yaml", "targets.yaml.sha256"),
        ),  # fmt: skip
        step(
            "plan",
            ("diagnose",),
            [
                py,
                "-m",
                "convert.plan_generation",
                "--bdd_data_dir",
                cfg.data.bdd_data_dir,
                "--split",
                "train",
                "--targets",
                str(targets),
                "--out",
                str(d["plan"]),
                "--overwrite",
                *flags(cfg.plan),
            ],
            d["plan"],
            [d["plan"] / "plan.jsonl"],
            [targets],
        ),  # fmt: skip
        step(
            "generate",
            ("plan",),
            [
                "bash",
                str(LAUNCHER),
                configs["generate"],
                f"paths.plan={d['plan'] / 'plan.jsonl'}",
                f"paths.infer_path={d['generate']}",
                *overrides(cfg.generate),
            ],
            d["generate"],
            [d["generate"] / "generations" / "metadata.jsonl"],
            step_env=gen_env,
        ),  # fmt: skip
        step(
            "annotate",
            ("generate",),
            [
                py,
                "-m",
                "annotation.yolo_annotate_folders",
                "--config",
                configs["annotate"],
                "--model",
                cfg.detector,
                "--input_folder",
                str(d["generate"] / "generations"),
                "--output_folder",
                str(d["annotated"]),
                *flags(cfg.annotate),
            ],
            d["annotated"],
            [d["annotated"] / "data.yaml", d["annotated"] / "summary.json"],
        ),  # fmt: skip
        step(
            "gain",
            ("annotate",),
            [
                py,
                "-m",
                "annotation.evaluate_gain",
                "--config",
                configs["gain"],
                "--real",
                cfg.data.real,
                "--val",
                cfg.data.val,
                "--synthetic",
                str(d["annotated"] / "data.yaml"),
                "--out",
                str(d["gain"]),
                *overrides(cfg.gain),
            ],
            d["gain"],
            [d["gain"] / "gain.json"],
            data_inputs,
        ),  # fmt: skip
        step(
            "report",
            ("diagnose", "annotate", "gain"),
            None,
            d["report"],
            [d["report"] / f for f in REPORT_FILES],
            note="annotation.loop.report.write_report",
            action=lambda: write_report(
                d["report"], d["diagnose"] / "diagnose.json", d["gain"] / "gain.json", d["annotated"]
            ),
        ),  # fmt: skip
    ]


def check_inputs(cfg: LoopConfig) -> None:
    """Everything the loop reads from outside ``out``, before any step runs; all problems at once."""
    problems = []
    for key, value in (("detector", cfg.detector), ("data.real", cfg.data.real), ("data.val", cfg.data.val)):
        if not Path(value).is_file():
            problems.append(f"{key}: file not found: {value}")
    if not Path(cfg.data.bdd_data_dir).is_dir():
        problems.append(f"data.bdd_data_dir: folder not found: {cfg.data.bdd_data_dir}")
    for name, value in cfg.configs.model_dump().items():
        if not (Path(value).is_file() or (REPO_ROOT / value).is_file()):
            problems.append(f"configs.{name}: config not found: {value}")
    if cfg.accelerate_config and not Path(cfg.accelerate_config).is_file():
        problems.append(f"accelerate_config: file not found: {cfg.accelerate_config}")
    if Path(cfg.data.val).is_file() and not (Path(cfg.data.val).parent / "frames.csv").is_file():
        problems.append(
            f"data.val: val set without attributes: no frames.csv beside {cfg.data.val}; write it with "
            "`python -m convert.bdd_to_yolo --split val`"
        )
    if problems:
        raise UserError("the loop's inputs are not ready:\n  " + "\n  ".join(problems))


def print_plan(cfg: LoopConfig, steps: list[loop_steps.Step], state: loop_steps.State) -> None:
    print(f"loop into {cfg.out}:")
    for step, what in loop_steps.plan_of_steps(steps, state):
        print(f"  {step.name:9s} {what}\n            $ {step.command_line()}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m annotation.run_loop",
        description="diagnose -> plan -> generate -> annotate -> gain -> report, each step resumable and skipped "
        "when up to date.",
        epilog="Every key is documented in config/loop.yaml; key=value overrides replace its values.",
    )
    add_config_arguments(
        parser, "config/loop.yaml", "validate the config and inputs, print which steps would run"
    )
    args = parser.parse_args(argv)
    config = args.config if Path(args.config).is_file() else str(REPO_ROOT / args.config)
    cfg = load_config(LoopConfig, config, args.overrides)
    check_inputs(cfg)
    steps = build_steps(cfg)
    state = loop_steps.State(cfg.out_dir)
    if args.check:
        diagnose = steps[0]
        assert diagnose.argv is not None
        loop_steps.run_command(
            loop_steps.Step(
                "diagnose --check", (), [*diagnose.argv, "--check"], diagnose.folder, [], env=diagnose.env
            ),  # fmt: skip
            Path("/dev/null"),
        )
        print_plan(cfg, steps, state)
        return 0
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    save_resolved_config(cfg, cfg.out_dir / "loop_config.resolved.yaml")
    log_path = cfg.out_dir / loop_steps.LOG_FILE
    loop_steps.run_steps(steps, state, log_path, loop_steps.run_command)
    report = cfg.out_dir / "report"
    print(f"loop done: {report / 'report.md'}, {report / 'report.png'}; log: {log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
