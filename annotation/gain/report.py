"""The gain evaluation's reports in ``--out``: gain.csv, gain.md, gain.json, gain.png and the printed summary.

Every file is written atomically (a killed run never leaves half a table); tables and the figure go through
:mod:`core.report`, so they look like every other stage's.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from annotation.gain import stats
from annotation.gain.curve import exchange_rate
from annotation.gain.data import ANY
from annotation.gain.design import ARM_KINDS, CURVE, NEGATIVE, POSITIVE, REAL, SYNTHETIC, Schedule
from annotation.gain.recipe import Recipe
from annotation.gain.stats import Spread, fmt_cell, fmt_spread, pct, spread
from annotation.metrics import DEFINITION
from core.io import atomic_write_text
from core.report import markdown_table, save_figure, subplots

CSV_FIXED = [
    "settings_key", "arm", "share", "real_budget", "seed", "negative_control", "real_images", "synthetic_images",
    "list_length", "epochs", "iterations", "optimizer_steps", "images_seen", "batch", "imgsz", "model", "device",
    "train_seconds", "finished_at", "val_images", "map", "map50", "map75", "checkpoint_iteration",
    "map_at_checkpoint", "converged",
]  # fmt: skip
COMPUTED = ("map", "map50", "map75", "val_images", "checkpoint_iteration", "map_at_checkpoint", "converged")


def run_order(result: dict[str, Any]) -> tuple:
    """Rows by kind of arm (real, synthetic, controls, curve), then share, real budget and seed."""
    return (ARM_KINDS.index(result["arm"]), result["share"], result["real_budget"], result["seed"])


def main_arms(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in results if r["arm"] in (REAL, SYNTHETIC)]


def write_reports(
    out: Path,
    key: str,
    settings: dict[str, Any],
    results: Sequence[dict[str, Any]],
    shares: Sequence[float],
    seeds: Sequence[int],
    schedule: Schedule,
    missing: Sequence[str],
    *,
    recipe: Recipe | None = None,
    warnings: Sequence[str] = (),
    tolerance: float = 0.05,
) -> dict[str, Any]:
    """All four files from the finished runs' ``results``; returns gain.json's content without the runs."""
    results = sorted(results, key=run_order)
    write_csv(out / "gain.csv", results, tolerance)
    analysis = analyse(results, shares, tolerance, list(warnings))
    write_markdown(out / "gain.md", results, shares, seeds, settings, schedule, missing, recipe, analysis)
    document = {
        "key": key,
        "settings": settings,
        "recipe": None if recipe is None else recipe.as_dict(),
        **analysis,
        "summary": stats.summarize(main_arms(results), shares),
    }
    atomic_write_text(out / "gain.json", json.dumps({**document, "runs": results}, indent=2) + "\n")
    if results:
        write_plot(out / "gain.png", results, shares, analysis)
    return document


# ---------------------------------------------------------------------------------------------------------------
# What the runs say beyond each share's mean: signal, convergence, controls, the curve, exchange rates
# ---------------------------------------------------------------------------------------------------------------


def arm_title(result: dict[str, Any]) -> str:
    arm, share = result["arm"], result["share"]
    if arm == REAL:
        return "real only"
    if arm == SYNTHETIC:
        return f"{share:g} % synthetic"
    if arm == POSITIVE:
        return f"positive control ({share:g} %: real frames instead)"
    if arm == NEGATIVE:
        return f"negative control ({share:g} %: {result['negative_control'].replace('_', ' ')})"
    return f"real curve, {result['real_budget']} real frames"


def learning_curves(results: Sequence[dict[str, Any]]) -> dict[int, list[tuple[float, float]]]:
    """seed -> (real budget, mAP50-95) of its real-only runs: the baseline, the curve, the positive control."""
    curves: dict[int, list[tuple[float, float]]] = {}
    for r in results:
        if r["arm"] in (REAL, CURVE, POSITIVE) and r["metrics"]["map"] is not None:
            curves.setdefault(r["seed"], []).append((float(r["real_budget"]), r["metrics"]["map"]))
    return curves


def analyse(
    results: Sequence[dict[str, Any]], shares: Sequence[float], tolerance: float, warnings: list[str]
) -> dict[str, Any]:
    """gain.json's verdicts: signal, per-arm convergence, controls, the real curve and the exchange rates."""
    signal = stats.no_signal(results)
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault(arm_title(r), []).append(r)
    convergence = {}
    for title, runs in groups.items():
        flags = [stats.converged(r, tolerance) for r in runs]
        convergence[title] = {
            "converged": sum(f is True for f in flags),
            "checked": sum(f is not None for f in flags),
        }
    rising = [t for t, c in convergence.items() if c["converged"] < c["checked"]]
    if rising:
        warnings.append(
            f"not converged: {'; '.join(rising)} (mAP50-95 still rose by more than {tolerance:.0%} over the last "
            "fifth of the iterations on some seed): equal iterations at a budget too small for the largest arm "
            "favour the smaller one; raise --iterations/--epochs"
        )
    if signal:
        warnings.insert(0, signal)
    base = {r["seed"]: r["real_budget"] for r in results if r["arm"] == REAL}
    curves = learning_curves(results)
    rates = {}
    if not signal and base:
        for title, runs in groups.items():
            if runs[0]["arm"] not in (SYNTHETIC, NEGATIVE):
                continue
            rate = exchange_rate(curves, {r["seed"]: r["metrics"]["map"] for r in runs}, min(base.values()))
            if rate is not None:
                rates[title] = {**rate.__dict__, "synthetic_images": runs[0]["synthetic_images"],
                                "text": rate.text(runs[0]["synthetic_images"])}  # fmt: skip
    budgets = sorted({b for c in curves.values() for b, _ in c})
    curve = [
        {"real_budget": int(b), **(spread(v for c in curves.values() for bb, v in c if bb == b).__dict__)}
        for b in budgets
    ]
    controls = {}
    for title, runs in groups.items():
        if runs[0]["arm"] in (POSITIVE, NEGATIVE) or (
            runs[0]["arm"] == SYNTHETIC and runs[0]["share"] == max(shares)
        ):
            g = stats.paired_vs_real(results, runs)
            m = spread(r["metrics"]["map"] for r in runs)
            controls[title] = {
                "arm": runs[0]["arm"], "map": None if m is None else m.__dict__,
                "map_gain": None if g is None else g.__dict__,
            }  # fmt: skip
    return {
        "signal": signal,
        "warnings": warnings,
        "convergence": convergence,
        "controls": controls if len(controls) > 1 else {},
        "real_curve": curve if len(curve) > 1 else [],
        "real_equivalents": rates,
    }


def bracket(controls: dict[str, Any]) -> str | None:
    """Where the largest share's gain sits between the controls' gains, in words."""
    by_arm = {v["arm"]: (t, v["map_gain"]) for t, v in controls.items() if v["map_gain"] is not None}
    if SYNTHETIC not in by_arm:
        return None
    title, g = by_arm[SYNTHETIC]
    parts = [f"{title}: gain {pct(g['mean'], signed=True)}"]
    if NEGATIVE in by_arm:
        n = by_arm[NEGATIVE][1]["mean"]
        parts.append(
            f"{'above' if g['mean'] > n else 'not above'} the negative control's {pct(n, signed=True)}"
        )
    if POSITIVE in by_arm:
        p = by_arm[POSITIVE][1]["mean"]
        share = g["mean"] / p if p > 0 and g["mean"] >= 0 else None  # a share of a loss means nothing
        parts.append(
            f"{'below' if g['mean'] < p else 'at or above'} the positive control's {pct(p, signed=True)}"
            + (f" ({share:.0%} of what as many real frames gave)" if share is not None else "")
        )
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# gain.csv: one row per arm and seed
# ---------------------------------------------------------------------------------------------------------------


def csv_row(result: dict[str, Any], tolerance: float) -> dict[str, Any]:
    m = result["metrics"]
    row = {k: result.get(k) for k in CSV_FIXED if k not in COMPUTED}
    row["settings_key"], row["share"] = result["key"], f"{result['share']:g}"
    check = result.get("convergence") or {}
    flag = stats.converged(result, tolerance)
    row.update(
        val_images=m["images"], map=m["map"], map50=m["map50"], map75=m["map75"],
        checkpoint_iteration=check.get("iteration"), map_at_checkpoint=check.get("map"),
        converged=None if flag is None else str(flag).lower(),
    )  # fmt: skip
    for name, v in m["per_class"].items():
        row[f"map_{name.replace(' ', '_')}"], row[f"map50_{name.replace(' ', '_')}"] = v["map"], v["map50"]
    for size, v in m["per_size"].items():
        row[f"map_{size}"], row[f"map50_{size}"] = v["map"], v["map50"]
    for group, v in m.get("per_condition", {}).items():
        row[f"map@{group}"], row[f"map50@{group}"] = v["map"], v["map50"]
    return row


def write_csv(path: Path, results: Sequence[dict[str, Any]], tolerance: float = 0.05) -> None:
    rows = [csv_row(r, tolerance) for r in results]
    columns = list(dict.fromkeys([*CSV_FIXED, *(k for r in rows for k in r)]))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("" if r.get(k) is None else r[k]) for k in columns})
    atomic_write_text(path, buf.getvalue())


# ---------------------------------------------------------------------------------------------------------------
# gain.md: the overall table, per class, per weather / time of day
# ---------------------------------------------------------------------------------------------------------------

OVERALL_HEADER = (
    "synthetic share",
    "real",
    "synthetic",
    "seeds",
    "mAP50-95",
    "gain (paired by seed)",
    "mAP50",
    "gain (paired)",
)


def overall_rows(
    by_share: dict[float, list[dict[str, Any]]], flat: Sequence[dict[str, Any]], signal: str | None = None
) -> list[list[str]]:
    """One row per share: image counts, seeds, mAP50-95 and mAP50 with their seed-paired gains ("no signal"
    instead of gains when the sweep has none)."""
    rows = []
    for share, runs in by_share.items():
        if not runs:
            rows.append([f"{share:g} %", "–", "–", "0", "–", "–", "–", "–"])
            continue
        real = "/".join(str(v) for v in sorted({r["real_images"] for r in runs}))
        syn = "/".join(str(v) for v in sorted({r["synthetic_images"] for r in runs}))
        cells = []
        for field in ("map", "map50"):
            cells.append(fmt_spread(spread(r["metrics"][field] for r in runs)))
            cells.append(
                "(baseline)" if share == 0
                else "no signal" if signal
                else fmt_spread(stats.paired_gain(flat, share, field), signed=True)
            )  # fmt: skip
        rows.append([f"{share:g} %", real, syn, str(len(runs)), *cells])
    return rows


def breakdown_table(
    title: str, labels: list[tuple[str, str, int]], by_share: dict[float, list[dict[str, Any]]], getter
) -> list[str]:
    """One row per label (class or condition): its val boxes, then each share's mean ± std (gain vs 0 %)."""
    rows = []
    for label, key, count in labels:
        base: Spread | None = spread(getter(r, key) for r in by_share.get(0, []))
        cells = [
            fmt_cell([getter(r, key) for r in runs], None if s == 0 else base) for s, runs in by_share.items()
        ]
        rows.append([label, str(count), *cells])
    return markdown_table([title, "val boxes", *(f"{s:g} %" for s in by_share)], rows)


def write_markdown(
    path: Path,
    results: Sequence[dict[str, Any]],
    shares: Sequence[float],
    seeds: Sequence[int],
    settings: dict[str, Any],
    schedule: Schedule,
    missing: Sequence[str],
    recipe: Recipe | None = None,
    analysis: dict[str, Any] | None = None,
) -> None:
    analysis = analysis or {}
    signal = analysis.get("signal")
    every = list(results)
    results = main_arms(results)
    by_share = {s: [r for r in results if r["share"] == s] for s in shares}
    flat = [{"share": r["share"], "seed": r["seed"], **r["metrics"]} for r in results]
    steps = (
        f", **{recipe.optimizer_steps} optimizer steps** (gradients accumulated over {recipe.accumulate} "
        f"batches to ultralytics' nominal batch; {recipe.warmup_iterations} warmup iterations; mosaic in "
        f"{recipe.mosaic_epochs} of {recipe.epochs} epochs)"
        if recipe
        else ""
    )
    lines = [
        "# Gain: real vs real + synthetic at equal iterations",
        "",
        f"Model `{settings['model']}`, imgsz {settings['imgsz']}, batch {schedule.batch}; seeds "
        f"{', '.join(map(str, seeds))}. **Every arm: {schedule.epochs} epoch(s) × {schedule.batches_per_epoch} "
        f"batches = {schedule.iterations} iterations, {schedule.images_seen} images seen**{steps} (a training "
        f"list of {schedule.list_length} entries per epoch; smaller arms repeat their images). Figures are COCO "
        f"mAP × 100 on the real val frames ({every[0]['metrics']['images'] if every else 0} images), mean ± "
        "sample std [min, max] over seeds; gains are differences to the real-only arm at the same seed. "
        f"The mAP: {DEFINITION}.",
        "",
    ]
    if signal:
        lines += [f"**{signal[0].upper()}{signal[1:]}.** Gains are not ranked.", ""]
    for warning in analysis.get("warnings", []):
        if warning != signal:
            lines += [f"**Warning:** {warning}.", ""]
    if missing:
        lines += [f"Not finished (rerun to complete): {', '.join(missing)}.", ""]
    lines += markdown_table(OVERALL_HEADER, overall_rows(by_share, flat, signal))
    convergence = analysis.get("convergence") or {}
    if any(c["checked"] for c in convergence.values()):
        lines += ["", "Converged (mAP50-95 flat over the last fifth of the iterations), seeds per arm: " + "; ".join(
            f"{t} {c['converged']}/{c['checked']}" for t, c in convergence.items() if c["checked"]
        ) + "."]  # fmt: skip
    controls = analysis.get("controls") or {}
    if controls:
        lines += ["", "## Controls (the largest share between them)", ""]
        rows = [
            [t, fmt_spread(None if v["map"] is None else Spread(**v["map"])),
             "no signal" if signal else fmt_spread(None if v["map_gain"] is None else Spread(**v["map_gain"]), True)]
            for t, v in sorted(controls.items(), key=lambda kv: (kv[1]["map"] or {}).get("mean", 0))
        ]  # fmt: skip
        lines += markdown_table(("arm", "mAP50-95", "gain (paired by seed)"), rows)
        where = None if signal else bracket(controls)
        if where:
            lines += ["", where + "."]
    curve = analysis.get("real_curve") or []
    if curve:
        lines += ["", "## Real-data learning curve (real only, same iterations)", ""]
        rows = [
            [
                str(c["real_budget"]),
                str(c["n"]),
                fmt_spread(Spread(**{k: c[k] for k in Spread.__dataclass_fields__})),
            ]
            for c in curve
        ]
        lines += markdown_table(("real frames", "runs", "mAP50-95"), rows)
        rates = analysis.get("real_equivalents") or {}
        if rates:
            lines += ["", "Real-equivalents (each seed's mAP read off its own curve, piecewise linear in log "
                      "budget on the curve made monotone; mean ± std over seeds):", ""]  # fmt: skip
            lines += [f"- {t}: {v['text']}" for t, v in rates.items()]
    lines += [""]
    if results:
        m0 = results[0]["metrics"]
        classes = [(n, n, v["gt_boxes"]) for n, v in m0["per_class"].items() if v["gt_boxes"]]
        lines += ["", "## Per class (mAP50-95 × 100, mean ± std; gain vs 0 % in brackets)", ""]
        lines += breakdown_table("class", classes, by_share, lambda r, k: r["metrics"]["per_class"][k]["map"])
        lines += ["", "## Per class, mAP50", ""]
        lines += breakdown_table(
            "class", classes, by_share, lambda r, k: r["metrics"]["per_class"][k]["map50"]
        )
        groups = m0.get("per_condition") or {}
        if groups:
            labels = [
                (g.replace("|", " / ").replace(ANY, "all"), g, v["gt_boxes"]) for g, v in groups.items()
            ]
            title = "weather / time of day"
            lines += ["", "## Per weather / time of day (mAP50-95 × 100; cells, then margins)", ""]
            lines += breakdown_table(
                title, labels, by_share, lambda r, k: r["metrics"]["per_condition"][k]["map"]
            )
            lines += ["", "## Per weather / time of day, mAP50", ""]
            lines += breakdown_table(
                title, labels, by_share, lambda r, k: r["metrics"]["per_condition"][k]["map50"]
            )
        else:
            lines += [
                "",
                "Per weather / time of day: skipped (--skip_conditions: the val set has no attributes).",
            ]
    lines += [
        "",
        "## Reading it",
        "",
        "A gain is only evidence when it is larger than the spread over seeds (and the paired gain keeps its sign "
        "on every seed). A zero or negative gain means the synthetic images did not teach the detector anything "
        "the real frames at the same number of iterations did not: expected when the generations are unrealistic "
        "or their labels wrong (check the fidelity report), or when the real data already suffices (try "
        "--max_real for the low-data regime). A toy model on a few images gives noise, not a finding.",
        "",
    ]
    atomic_write_text(path, "\n".join(lines))


# ---------------------------------------------------------------------------------------------------------------
# gain.png and the printed summary
# ---------------------------------------------------------------------------------------------------------------


def share_points(runs: Sequence[dict[str, Any]], field: str) -> tuple[list[float], Spread] | None:
    vals = [r["metrics"][field] for r in runs if r["metrics"][field] is not None]
    return (vals, spread(vals)) if vals else None


def write_plot(
    path: Path,
    results: Sequence[dict[str, Any]],
    shares: Sequence[float],
    analysis: dict[str, Any] | None = None,
) -> None:
    """mAP50-95 and mAP50 vs synthetic share (mean with std error bars, every seed as a dot; the controls beside
    the largest share), and with a real curve a third panel: mAP50-95 vs real frames (log), the synthetic arms and
    the negative control as levels read off it."""
    analysis = analysis or {}
    curve = analysis.get("real_curve") or []
    fig, axes = subplots(1, 3 if curve else 2, figsize=(15 if curve else 10, 4), constrained_layout=True)
    main = main_arms(results)
    colours = {POSITIVE: "tab:green", NEGATIVE: "tab:red"}
    for ax, field, title in zip(axes, ("map", "map50"), ("mAP50-95", "mAP50"), strict=False):
        xs, means, stds = [], [], []
        for share in shares:
            got = share_points([r for r in main if r["share"] == share], field)
            if got is None:
                continue
            vals, s = got
            xs.append(share)
            means.append(s.mean * 100)
            stds.append((s.std or 0.0) * 100)
            ax.scatter([share] * len(vals), [v * 100 for v in vals], s=12, color="0.6", zorder=2)
        ax.errorbar(xs, means, yerr=stds, fmt="o-", capsize=4, zorder=3, label="mean ± std over seeds")
        for kind, colour in colours.items():
            got = share_points([r for r in results if r["arm"] == kind], field)
            if got is not None:
                share = next(r["share"] for r in results if r["arm"] == kind)
                ax.errorbar(
                    [share], [got[1].mean * 100], yerr=[(got[1].std or 0) * 100], fmt="s", color=colour, capsize=4,
                    zorder=4, label=kind.replace("_", " "),
                )  # fmt: skip
        ax.set_xlabel("synthetic share (% of the real count)")
        ax.set_ylabel(f"{title} × 100 (real val)")
        ax.set_title(f"{title} at equal iterations")
        ax.set_xticks(list(shares))
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    if curve:
        ax = axes[2]
        xs = [c["real_budget"] for c in curve]
        ax.errorbar(
            xs, [c["mean"] * 100 for c in curve], yerr=[(c["std"] or 0) * 100 for c in curve], fmt="o-",
            capsize=4, color="tab:blue", label="real only",
        )  # fmt: skip
        for title, runs in {arm_title(r): [q for q in results if arm_title(q) == arm_title(r)] for r in results
                            if r["arm"] in (SYNTHETIC, NEGATIVE)}.items():  # fmt: skip
            got = share_points(runs, "map")
            if got is not None:
                style = ":" if runs[0]["arm"] == NEGATIVE else "--"
                ax.axhline(got[1].mean * 100, linestyle=style, linewidth=1, label=title,
                           color=colours.get(runs[0]["arm"]))  # fmt: skip
        ax.set_xscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])  # the budgets, not powers of ten
        ax.minorticks_off()
        ax.set_xlabel("real frames (log)")
        ax.set_ylabel("mAP50-95 × 100 (real val)")
        ax.set_title("real-data curve; synthetic arms as levels")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=7)
    save_figure(fig, path, dpi=110)


def print_summary(
    out: Path, summary: dict[str, Any], shares: Sequence[float], missing: Sequence[str]
) -> None:
    """The console summary from :func:`write_reports`' document."""
    print(
        "\ngain summary (COCO mAP x 100 on the real val frames; mean ± std over seeds; gain paired by seed):"
    )
    per_share = summary["summary"]
    for share in shares:
        e = per_share[f"{share:g}"]
        s = None if e["map"] is None else Spread(**e["map"])
        g = None if e.get("map_gain") is None else Spread(**e["map_gain"])
        gain = (
            "baseline"
            if share == 0
            else "no signal"
            if summary.get("signal")
            else f"gain {fmt_spread(g, signed=True)}"
        )
        print(f"  {share:>5g} % synthetic: mAP50-95 {fmt_spread(s)}  ({gain}; seeds {e['seeds']})")
    for title, v in (summary.get("controls") or {}).items():
        if v["arm"] != SYNTHETIC:
            g = None if v["map_gain"] is None else Spread(**v["map_gain"])
            gain = "no signal" if summary.get("signal") else f"gain {fmt_spread(g, signed=True)}"
            print(
                f"  {title}: mAP50-95 {fmt_spread(None if v['map'] is None else Spread(**v['map']))} ({gain})"
            )
    where = None if summary.get("signal") else bracket(summary.get("controls") or {})
    if where:
        print(f"  {where}")
    for title, v in (summary.get("real_equivalents") or {}).items():
        print(f"  {title}: {v['text']}")
    for warning in summary.get("warnings", []):
        print(f"WARNING: {warning}")
    if missing:
        print(f"not finished: {', '.join(missing)} (rerun to complete)")
    print(f"tables: {out / 'gain.md'}; plot: {out / 'gain.png'}; rows: {out / 'gain.csv'}")
    print(
        "a gain counts only if it exceeds the spread over seeds; zero or negative means the synthetic images "
        "added nothing the real frames did not at the same number of iterations"
    )
