"""The loop's final report: per diagnosed weak cell, before (the user's detector, diagnose) and after (the gain run's
arms on the same val frames of that cell), what stage 4 made of the generations, and a plot.

Reads only the steps' documented outputs (``diagnose/diagnose.json``, ``gain/gain.json``,
``annotated/summary.json``), never their code. What did not improve is listed beside what did, with the same rule:
an arm improves a cell when its mAP there is higher than the real-only arm's on every seed (paired by seed) and the
mean difference exceeds the spread of the differences; worse when the same holds the other way; otherwise "no
measurable change" (with one seed: "one seed, no spread: cannot tell").
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.cli import UserError
from core.io import atomic_write_text
from core.report import markdown_table, save_figure, subplots

REPORT_FILES = ("report.md", "report.json", "report.png")


def read_json(path: Path, step: str) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"report: {path} not found: the {step} step did not finish; rerun the loop")
    return json.loads(path.read_text(encoding="utf-8"))


def arm_of(run: dict[str, Any]) -> str:
    """A gain run's arm label: its ``arm`` (real, synthetic, positive_control, ...) with its share or budget."""
    arm = run.get("arm") or ("real" if run.get("share", 0) == 0 else "synthetic")
    if arm in ("synthetic", "positive_control", "negative_control") and run.get("share") is not None:
        return f"{arm} {run['share']:g} %"
    if arm == "real_curve":
        budget = run.get("budget", run.get("real_images"))
        return f"real_curve {budget}"
    return arm


def condition_value(run: dict[str, Any], cell: str, field: str = "map") -> float | None:
    """A run's figure on a diagnose cell; a cell with a scene reads its weather x time of day (gain has no scenes)."""
    key = "|".join(cell.split("|")[:2])
    entry = run.get("metrics", {}).get("per_condition", {}).get(key)
    return None if entry is None else entry.get(field)


NO_SIGNAL = "no signal: real-only scores 0 here"


def verdict(differences: Sequence[float], baseline: Sequence[float] = ()) -> str:
    """improved / worse / no measurable change from the per-seed differences to real-only; 'no signal' when the
    real-only arm scores 0 on every seed and so does the arm (a broken evaluation would read the same)."""
    if not differences:
        return "not measured"
    if baseline and all(b == 0 for b in baseline) and all(d == 0 for d in differences):
        return NO_SIGNAL
    if len(differences) == 1:
        return "one seed, no spread: cannot tell"
    mean, std = statistics.fmean(differences), statistics.stdev(differences)
    if all(d > 0 for d in differences) and mean > std:
        return "improved"
    if all(d < 0 for d in differences) and -mean > std:
        return "worse"
    return "no measurable change"


def compare(diagnose: dict[str, Any], gain: dict[str, Any]) -> list[dict[str, Any]]:
    """Per target cell and arm: mean ± std over seeds, the paired difference to the real arm, the verdict."""
    runs = gain.get("runs", [])
    base = {r["seed"]: r for r in runs if arm_of(r) == "real"}
    arms = sorted({arm_of(r) for r in runs}, key=lambda a: (a != "real", a))
    rows = []
    cells = []
    for target in diagnose["targets"]["rows"]:
        if target["cell"] not in cells:
            cells.append(target["cell"])
    for target_cell in [*cells, "all"]:
        before = next(
            (c for c in diagnose["cells"] if c["cell"] == target_cell and c["class"] == "all"), None
        ) if target_cell != "all" else {"map": diagnose["overall"]["map"], "ci_low": None, "ci_high": None,
                                       "boxes": diagnose["overall"]["gt_boxes"]}  # fmt: skip
        for arm in arms:
            values, diffs, bases = [], [], []
            for r in (r for r in runs if arm_of(r) == arm):
                value = r["metrics"]["map"] if target_cell == "all" else condition_value(r, target_cell)
                if value is None:
                    continue
                values.append(value)
                b = base.get(r["seed"])
                b_value = (
                    None
                    if b is None
                    else (b["metrics"]["map"] if target_cell == "all" else condition_value(b, target_cell))
                )
                if arm != "real" and b_value is not None:
                    diffs.append(value - b_value)
                    bases.append(b_value)
            rows.append({
                "cell": target_cell, "arm": arm, "seeds": len(values),
                "diagnose_map": None if before is None else before["map"],
                "diagnose_ci": None if not before or before["ci_low"] is None else [before["ci_low"], before["ci_high"]],
                "val_boxes": None if before is None else before["boxes"],
                "mean": statistics.fmean(values) if values else None,
                "std": statistics.stdev(values) if len(values) > 1 else None,
                "difference": statistics.fmean(diffs) if diffs else None,
                "difference_std": statistics.stdev(diffs) if len(diffs) > 1 else None,
                "verdict": "(baseline)" if arm == "real" else verdict(diffs, bases),
            })  # fmt: skip
    return rows


def _cell(name: str) -> str:
    return "all val frames" if name == "all" else name.replace("|", " / ")


def _p(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value * 100:+.2f}" if signed else f"{value * 100:.2f}"


def markdown(result: dict[str, Any]) -> str:
    rows = result["comparison"]
    lines = [
        "# The loop: the weakest cells before and after",
        "",
        "*Before*: the user's detector on the real val frames of each cell (diagnose; mAP50-95 × 100, with its "
        "bootstrap interval). *After*: the gain run's detectors, trained from the same start on the real frames alone "
        "(`real`) and with the loop's synthetic data, scored on the same val frames of that cell (mean ± std over "
        "seeds; the difference is paired by seed). The two are different detectors: compare the arms with each "
        "other, and read *before* as where the weakness was found.",
        "",
    ]
    table = []
    for r in rows:
        ci = "" if not r["diagnose_ci"] else f" [{_p(r['diagnose_ci'][0])}, {_p(r['diagnose_ci'][1])}]"
        spread = "" if r["std"] is None else f" ± {r['std'] * 100:.2f}"
        diff = (
            ""
            if r["difference"] is None
            else _p(r["difference"], True)
            + ("" if r["difference_std"] is None else f" ± {r['difference_std'] * 100:.2f}")
        )
        table.append([_cell(r["cell"]), _p(r["diagnose_map"]) + ci, r["arm"], r["seeds"],
                      _p(r["mean"]) + spread, diff or "–", r["verdict"]])  # fmt: skip
    lines += markdown_table(
        ["cell", "before (diagnose)", "arm", "seeds", "after: mAP", "vs real (paired)", "verdict"],
        table,
        "lrlrrrl",
    )
    improved = [f"{_cell(r['cell'])} ({r['arm']})" for r in rows if r["verdict"] == "improved"]
    not_improved = [f"{_cell(r['cell'])} ({r['arm']}: {r['verdict']})" for r in rows
                    if r["arm"] != "real" and r["verdict"] != "improved"]  # fmt: skip
    lines += [
        "",
        "**Improved:** " + ("; ".join(improved) if improved else "nothing."),
        "",
        "**Did not improve:** "
        + ("; ".join(not_improved) if not_improved else "nothing: every arm improved every cell."),
        "",
    ]
    lines += overall_lines(result.get("overall") or {})
    ann = result.get("annotation")
    if ann:
        agreement = ann.get("agreement", {}).get("all", {})
        rejected = ", ".join(f"{k} {v}" for k, v in (ann.get("rejected_by_reason") or {}).items())
        lines += [
            "## The generated images (stage 4)",
            "",
            f"{ann.get('images_seen', '–')} generated images, {ann.get('accepted', '–')} accepted as labelled data "
            f"(rejected: {rejected or 'none'}). How well the detector finds the planned boxes in "
            f"them (layout fidelity against the plan's boxes): recall {_p(agreement.get('layout_recall'))} %, precision "
            f"{_p(agreement.get('layout_precision'))} % over {agreement.get('total', 0)} boxes. "
            "(`annotation/evaluate_fidelity.py` needs a real frame per layout; a plan's layouts are edited, so stage "
            "4's agreement is the fidelity figure here.)",
            "",
        ]
        per_class = ann.get("agreement", {}).get("per_class", {})
        if per_class:
            lines += markdown_table(
                ["class", "boxes", "layout recall", "layout precision"],
                [
                    [c, v["total"], _p(v["layout_recall"]), _p(v["layout_precision"])]
                    for c, v in per_class.items()
                ],
                "lrrr",
            )
            lines.append("")
    lines += [f"Inputs: `{result['diagnose']}`, `{result['gain']}`, `{result['annotated']}`.", ""]
    return "\n".join(lines)


def overall_lines(overall: dict[str, Any]) -> list[str]:
    """The gain run's verdict over all val frames: its controls, the real-equivalents and its warnings."""
    lines = ["## Over all val frames (the gain run)", ""]
    if overall.get("signal"):
        lines += [f"**No signal:** {overall['signal']}", ""]
    for title, v in (overall.get("controls") or {}).items():
        g = v.get("map_gain")
        gain = (
            "–"
            if not g or g.get("mean") is None
            else _p(g["mean"], True) + ("" if g.get("std") is None else f" ± {g['std'] * 100:.2f}")
        )
        lines.append(f"- {title}: gain over real-only {gain} mAP50-95 points (paired by seed)")
    for title, v in (overall.get("real_equivalents") or {}).items():
        lines.append(f"- {title}: {v.get('text', '–')}")
    lines += [f"- WARNING: {w}" for w in overall.get("warnings") or [] if w != overall.get("signal")]
    return [*lines, ""] if len(lines) > 2 else []


def plot(result: dict[str, Any], path: Path) -> None:
    rows = result["comparison"]
    cells = list(dict.fromkeys(r["cell"] for r in rows))
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    fig, ax = subplots(figsize=(max(4.0, 1.6 * len(cells) + 1), 3.6))
    width = 0.8 / max(1, len(arms))
    for a, arm in enumerate(arms):
        xs, ys, errs = [], [], []
        for c, cell in enumerate(cells):
            r = next((r for r in rows if r["cell"] == cell and r["arm"] == arm), None)
            if r is None or r["mean"] is None:
                continue
            xs.append(c - 0.4 + width * (a + 0.5))
            ys.append(r["mean"] * 100)
            errs.append((r["std"] or 0.0) * 100)
        ax.bar(xs, ys, width=width, yerr=errs, capsize=3, label=arm)
    ax.set_xticks(range(len(cells)), [_cell(c).replace(" / ", "\n") for c in cells], fontsize=8)
    ax.set_ylim(bottom=0)
    if not any(r["mean"] for r in rows):
        ax.set_ylim(0, 1)
        ax.text(
            0.5, 0.5, "every arm scores 0: no signal", transform=ax.transAxes, ha="center", color="#aa0000"
        )
    ax.set_ylabel("mAP50-95 × 100 (mean ± std over seeds)")
    ax.set_title("Weakest cells after: each arm of the gain run", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, dpi=110)


def write_report(out: Path, diagnose_json: Path, gain_json: Path, annotated: Path) -> dict[str, Any]:
    diagnose = read_json(diagnose_json, "diagnose")
    gain = read_json(gain_json, "gain")
    summary = annotated / "summary.json"
    result = {
        "diagnose": str(diagnose_json),
        "gain": str(gain_json),
        "annotated": str(annotated),
        "targets": diagnose["targets"]["rows"],
        "comparison": compare(diagnose, gain),
        "overall": {k: gain.get(k) for k in ("signal", "controls", "real_equivalents", "warnings")},
        "annotation": json.loads(summary.read_text(encoding="utf-8")) if summary.is_file() else None,
    }
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "report.md", markdown(result))
    plot(result, out / "report.png")
    return result
