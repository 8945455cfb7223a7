"""annotation/run_loop.py: each step runs as its stage's command once, is kept while nothing it depends on changes,
resumes after a kill without losing its partial work, reruns (with what follows it, and only that) when a setting,
an input or an upstream step changes; --check prints the plan and runs nothing; bad inputs are clear errors.

The stage commands are replaced by a fake runner (monkeypatched in-process) that writes each step's documented
outputs: the loop's logic is tested in milliseconds, the stages have their own tests.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from annotation import run_loop
from annotation.loop import steps as loop_steps
from annotation.loop.report import compare, verdict
from core.cli import UserError, run_main

REPO = Path(__file__).resolve().parents[1]
ORDER = ["diagnose", "plan", "generate", "annotate", "gain"]


def gain_json(cell: str, real: list[float], synthetic: list[float]) -> dict:
    runs = []
    for share, values in ((0, real), (50, synthetic)):
        for seed, v in enumerate(values):
            runs.append({"share": share, "seed": seed, "real_images": 8, "synthetic_images": 4 if share else 0,
                         "metrics": {"map": v, "per_condition": {cell: {"map": v}}}})  # fmt: skip
    return {"runs": runs}


def diagnose_json(cell: str) -> dict:
    row = {"cell": cell, "class": "car", "map": 0.1, "ci_low": 0.05, "ci_high": 0.2, "boxes": 30}
    return {
        "overall": {"map": 0.3, "gt_boxes": 100},
        "cells": [{**row, "class": "all"}, row],
        "targets": {"rows": [row]},
    }


class FakeStages:
    """Writes each step's outputs; records what ran; can fail one step once (a kill mid-step)."""

    def __init__(self, fail: str | None = None) -> None:
        self.ran: list[str] = []
        self.fail = fail

    def __call__(self, step: loop_steps.Step, log_path: Path) -> None:
        self.ran.append(step.name)
        step.folder.mkdir(parents=True, exist_ok=True)
        (step.folder / "partial").write_text("work in progress")
        if step.name == self.fail:
            self.fail = None
            raise UserError(f"step {step.name} failed (exit code 137)")
        if step.name == "diagnose --check":
            return
        if step.name == "diagnose":
            (step.folder / "diagnose.json").write_text(json.dumps(diagnose_json("rainy|night")))
            targets = step.folder / "targets.yaml"
            if not targets.exists():
                targets.write_text("targets: [{name: a, weather: rainy}]\n")
        elif step.name == "plan":
            (step.folder / "plan.jsonl").write_text("{}\n")
        elif step.name == "generate":
            (step.folder / "generations").mkdir(exist_ok=True)
            (step.folder / "generations" / "metadata.jsonl").write_text("{}\n")
        elif step.name == "annotate":
            (step.folder / "data.yaml").write_text("names: []\n")
            (step.folder / "summary.json").write_text(json.dumps({"accepted": 3, "agreement": {"all": {}}}))
        elif step.name == "gain":
            (step.folder / "gain.json").write_text(
                json.dumps(gain_json("rainy|night", [0.1, 0.12], [0.2, 0.25]))
            )


@pytest.fixture
def loop_config(tmp_path) -> Path:
    """A loop config whose inputs exist (tiny stand-ins: the fake stages never read them)."""
    real = tmp_path / "real"
    (real / "labels" / "val").mkdir(parents=True)
    (real / "data.yaml").write_text("path: .\n")
    (real / "frames.csv").write_text("split,image,weather,timeofday,scene\n")
    (tmp_path / "detector.pt").write_bytes(b"weights")
    (tmp_path / "bdd100k").mkdir()
    config = {
        "out": str(tmp_path / "loop"),
        "detector": str(tmp_path / "detector.pt"),
        "data": {
            "bdd_data_dir": str(tmp_path / "bdd100k"),
            "real": str(real / "data.yaml"),
            "val": str(real / "data.yaml"),
        },  # fmt: skip
        "configs": {
            "diagnose": "config/diagnose.yaml",
            "generate": "config/demo/controlnet_infer.yaml",
            "annotate": "config/demo/annotation.yaml",
            "gain": "config/gain.yaml",
        },  # fmt: skip
        "gain": {"design": {"seeds": [0, 1]}},
    }
    path = tmp_path / "loop.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def loop(monkeypatch, config: Path, *extra: str, fake: FakeStages | None = None) -> FakeStages:
    fake = fake or FakeStages()
    monkeypatch.setattr(loop_steps, "run_command", fake)
    run_loop.main(["--config", str(config), *extra])
    return fake


def test_every_step_runs_once_then_is_kept(monkeypatch, loop_config, tmp_path, capsys):
    assert loop(monkeypatch, loop_config).ran == ORDER
    out = tmp_path / "loop"
    assert (out / "report" / "report.md").is_file() and (out / "report" / "report.png").is_file()
    state = json.loads((out / "loop_state.json").read_text())
    assert set(state["finished"]) == {*ORDER, "report"}
    assert loop(monkeypatch, loop_config).ran == []
    log = (out / "loop.log").read_text()
    assert "$ " in log and "-m annotation.evaluate_gain" in log and "design.seeds=[0, 1]" in log
    assert "--split train" in log  # plans come from the train frames
    assert log.count("report: kept") == 1


def test_a_killed_step_resumes_and_finished_steps_are_kept(monkeypatch, loop_config, tmp_path):
    with pytest.raises(UserError, match="generate failed"):
        loop(monkeypatch, loop_config, fake=FakeStages(fail="generate"))
    out = tmp_path / "loop"
    state = json.loads((out / "loop_state.json").read_text())
    assert set(state["finished"]) == {"diagnose", "plan"}  # state written only after a step succeeds
    assert "generate" in state["started"]
    assert (out / "generate" / "partial").is_file()
    fake = loop(monkeypatch, loop_config)
    assert fake.ran == ["generate", "annotate", "gain"]
    assert (out / "generate" / "partial").is_file()  # resumed in place: the stage's own resume keeps its work


def test_a_changed_step_reruns_with_its_dependants_only(monkeypatch, loop_config, tmp_path):
    loop(monkeypatch, loop_config)
    out = tmp_path / "loop"
    (out / "gain" / "marker").write_text("from the old settings")
    fake = loop(monkeypatch, loop_config, "gain.design.seeds=[0,1,2]")
    assert fake.ran == ["gain"]
    assert not (out / "gain" / "marker").exists()  # other settings: a fresh folder, never mixed
    assert "report: running" in (out / "loop.log").read_text().split("gain: running")[-1]

    (tmp_path / "detector.pt").write_bytes(b"other weights")  # an input of diagnose and annotate
    assert loop(monkeypatch, loop_config, "gain.design.seeds=[0,1,2]").ran == ORDER


def test_an_edited_targets_file_reruns_the_plan_and_is_kept(monkeypatch, loop_config, tmp_path):
    loop(monkeypatch, loop_config)
    targets = tmp_path / "loop" / "diagnose" / "targets.yaml"
    targets.write_text("targets: [{name: mine, weather: snowy}]\n")
    assert loop(monkeypatch, loop_config).ran == ["plan", "generate", "annotate", "gain"]
    # diagnose rerun (another setting) empties its folder but keeps the user's targets
    assert loop(monkeypatch, loop_config, "diagnose.cells.min_boxes=5").ran[0] == "diagnose"
    assert targets.read_text() == "targets: [{name: mine, weather: snowy}]\n"


def test_check_prints_the_plan_and_runs_nothing(monkeypatch, loop_config, tmp_path, capsys):
    fake = loop(monkeypatch, loop_config, "--check")
    assert fake.ran == ["diagnose --check"]  # diagnose validates its own settings; nothing else runs
    printed = capsys.readouterr().out
    assert "diagnose  run (new)" in printed and "plan      run (after diagnose)" in printed
    assert "bash " in printed and "run_controlnet_infer.sh" in printed and "paths.plan=" in printed
    assert not (tmp_path / "loop" / "loop_state.json").exists()
    loop(monkeypatch, loop_config)
    loop(monkeypatch, loop_config, "--check", "gain.train.batch=4")
    printed = capsys.readouterr().out
    assert (
        "annotate  keep" in printed
        and "gain      run (settings, inputs or an upstream step changed)" in printed
    )
    assert "report    run (after gain)" in printed


def test_bad_inputs_are_clear_errors(monkeypatch, loop_config, tmp_path, capsys):
    def fails(*extra: str) -> str:
        monkeypatch.setattr(loop_steps, "run_command", FakeStages())
        assert run_main(run_loop.main, ["--config", str(loop_config), *extra]) == 2
        return capsys.readouterr().err

    err = fails(f"detector={tmp_path / 'none.pt'}")
    assert "detector: file not found" in err
    (tmp_path / "real" / "frames.csv").unlink()
    assert "val set without attributes" in fails()
    (tmp_path / "real" / "frames.csv").write_text("split,image,weather,timeofday,scene\n")
    assert "gain.out" in fails("gain.out=/tmp/x") and "the loop sets" in fails("gain.data.val=/tmp/v")
    assert "not a plan_generation flag" in fails("plan.split=val")
    assert "not a yolo_annotate_folders flag" in fails("annotate.output_folder=x")
    assert "configs.gain: config not found" in fails("configs.gain=config/nope.yaml")
    assert "gain.design.seeds" not in fails("outt=1") and "did you mean 'out'" in fails("outt=1")


def test_a_failing_command_names_the_step_and_the_log(tmp_path, capsys):
    step = loop_steps.Step("gain", (), [sys.executable, "-c", "print('training'); raise SystemExit(3)"],
                           tmp_path, [])  # fmt: skip
    log = tmp_path / "loop.log"
    with pytest.raises(UserError, match=r"step gain failed \(exit code 3\).*loop.log"):
        loop_steps.run_command(step, log)
    assert "training" in log.read_text() and "training" in capsys.readouterr().out


def test_the_report_says_what_did_and_did_not_improve():
    assert verdict([0.05, 0.06, 0.04]) == "improved"
    assert verdict([-0.05, -0.06]) == "worse"
    assert verdict([0.05, -0.01]) == "no measurable change"
    assert verdict([0.05]) == "one seed, no spread: cannot tell"
    assert verdict([0.0, 0.0], baseline=[0.0, 0.0]) == "no signal: real-only scores 0 here"
    assert verdict([0.0, 0.0], baseline=[0.1, 0.2]) == "no measurable change"
    rows = compare(diagnose_json("rainy|night"), gain_json("rainy|night", [0.1, 0.12], [0.2, 0.25]))
    synthetic = next(r for r in rows if r["cell"] == "rainy|night" and r["arm"] == "synthetic 50 %")
    assert synthetic["difference"] == pytest.approx(0.115) and synthetic["verdict"] == "improved"
    assert synthetic["diagnose_map"] == 0.1 and synthetic["diagnose_ci"] == [0.05, 0.2]
    flat = compare(diagnose_json("rainy|night"), gain_json("rainy|night", [0.1, 0.12], [0.11, 0.10]))
    assert next(r for r in flat if r["arm"] != "real" and r["cell"] == "rainy|night")["verdict"] == (
        "no measurable change"
    )


def test_the_report_carries_the_gain_runs_controls_exchange_rates_and_warnings():
    from annotation.loop.report import overall_lines

    overall = {
        "signal": None,
        "controls": {
            "positive control 50 %": {"arm": "positive_control", "map_gain": {"mean": 0.0283, "std": 0.0024}}
        },
        "real_equivalents": {"synthetic 50 %": {"text": "4 synthetic frames are worth ≈ 2.1 real frames"}},
        "warnings": ["the real arm did not converge"],
    }
    text = "\n".join(overall_lines(overall))
    assert "positive control 50 %: gain over real-only +2.83 ± 0.24" in text
    assert "worth ≈ 2.1 real frames" in text and "WARNING: the real arm did not converge" in text
    silent = "\n".join(
        overall_lines(
            {**overall, "signal": "no signal: nothing learned", "warnings": ["no signal: nothing learned"]}
        )
    )
    assert silent.count("no signal: nothing learned") == 1 and "**No signal:**" in silent
    assert overall_lines({}) == []


def test_shipped_loop_configs_load():
    from annotation.loop.config import LoopConfig
    from core.config import load_config

    for name in ("config/loop.yaml", "config/demo/loop.yaml"):
        cfg = load_config(LoopConfig, REPO / name, ["detector=x.pt", "data.bdd_data_dir=b"])
        assert cfg.gain and cfg.configs.gain == "config/gain.yaml"
