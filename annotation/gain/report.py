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

from annotation.gain.data import ANY
from annotation.gain.design import Schedule
from annotation.gain.stats import Spread, fmt_cell, fmt_spread, paired_gain, spread, summarize
from core.io import atomic_write_text
from core.report import markdown_table, save_figure, subplots

CSV_FIXED = [
    "settings_key", "share", "seed", "real_images", "synthetic_images", "list_length", "epochs", "iterations",
    "images_seen", "batch", "imgsz", "model", "device", "train_seconds", "finished_at", "val_images", "map", "map50",
    "map75",
]  # fmt: skip


def write_reports(
    out: Path,
    key: str,
    settings: dict[str, Any],
    results: Sequence[dict[str, Any]],
    shares: Sequence[float],
    seeds: Sequence[int],
    schedule: Schedule,
    missing: Sequence[str],
) -> dict[str, Any]:
    """All four files from the finished runs' ``results`` (sorted by share and seed); returns the summary."""
    results = sorted(results, key=lambda r: (r["share"], r["seed"]))
    write_csv(out / "gain.csv", results)
    write_markdown(out / "gain.md", results, shares, seeds, settings, schedule, missing)
    summary = summarize(results, shares)
    atomic_write_text(
        out / "gain.json",
        json.dumps({"key": key, "settings": settings, "summary": summary, "runs": results}, indent=2) + "\n",
    )
    if results:
        write_plot(out / "gain.png", results, shares)
    return summary


# ---------------------------------------------------------------------------------------------------------------
# gain.csv: one row per share and seed
# ---------------------------------------------------------------------------------------------------------------


def csv_row(result: dict[str, Any]) -> dict[str, Any]:
    m = result["metrics"]
    row = {k: result.get(k) for k in CSV_FIXED if k not in ("map", "map50", "map75", "val_images")}
    row["settings_key"], row["share"] = result["key"], f"{result['share']:g}"
    row.update(val_images=m["images"], map=m["map"], map50=m["map50"], map75=m["map75"])
    for name, v in m["per_class"].items():
        row[f"map_{name.replace(' ', '_')}"], row[f"map50_{name.replace(' ', '_')}"] = v["map"], v["map50"]
    for size, v in m["per_size"].items():
        row[f"map_{size}"], row[f"map50_{size}"] = v["map"], v["map50"]
    for group, v in m.get("per_condition", {}).items():
        row[f"map@{group}"], row[f"map50@{group}"] = v["map"], v["map50"]
    return row


def write_csv(path: Path, results: Sequence[dict[str, Any]]) -> None:
    rows = [csv_row(r) for r in results]
    columns = list(dict.fromkeys(k for r in rows for k in r))
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
    "synthetic share", "real", "synthetic", "seeds", "mAP50-95", "gain (paired by seed)", "mAP50", "gain (paired)",
)  # fmt: skip


def overall_rows(
    by_share: dict[float, list[dict[str, Any]]], flat: Sequence[dict[str, Any]]
) -> list[list[str]]:
    """One row per share: image counts, seeds, mAP50-95 and mAP50 with their seed-paired gains."""
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
                "(baseline)" if share == 0 else fmt_spread(paired_gain(flat, share, field), signed=True)
            )
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
) -> None:
    by_share = {s: [r for r in results if r["share"] == s] for s in shares}
    flat = [{"share": r["share"], "seed": r["seed"], **r["metrics"]} for r in results]
    lines = [
        "# Gain: real vs real + synthetic at equal iterations",
        "",
        f"Model `{settings['model']}`, imgsz {settings['imgsz']}, batch {schedule.batch}; seeds "
        f"{', '.join(map(str, seeds))}. **Every arm: {schedule.epochs} epoch(s) × {schedule.batches_per_epoch} "
        f"batches = {schedule.iterations} iterations, {schedule.images_seen} images seen** (a training list of "
        f"{schedule.list_length} entries per epoch; smaller arms repeat their images). Figures are COCO mAP × 100 on "
        f"the real val frames ({results[0]['metrics']['images'] if results else 0} images), mean ± sample std "
        "[min, max] over seeds; gains are differences to the 0 % (real-only) arm.",
        "",
    ]
    if missing:
        lines += [f"Not finished (rerun to complete): {', '.join(missing)}.", ""]
    lines += markdown_table(OVERALL_HEADER, overall_rows(by_share, flat))

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


def write_plot(path: Path, results: Sequence[dict[str, Any]], shares: Sequence[float]) -> None:
    """mAP50-95 and mAP50 vs synthetic share: mean with std error bars, every seed as a dot."""
    fig, axes = subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for ax, field, title in zip(axes, ("map", "map50"), ("mAP50-95", "mAP50"), strict=True):
        xs, means, stds = [], [], []
        for share in shares:
            vals = [
                r["metrics"][field]
                for r in results
                if r["share"] == share and r["metrics"][field] is not None
            ]
            if not vals:
                continue
            s = spread(vals)
            xs.append(share)
            means.append(s.mean * 100)
            stds.append((s.std or 0.0) * 100)
            ax.scatter([share] * len(vals), [v * 100 for v in vals], s=12, color="0.6", zorder=2)
        ax.errorbar(xs, means, yerr=stds, fmt="o-", capsize=4, zorder=3, label="mean ± std over seeds")
        ax.set_xlabel("synthetic share (% of the real count)")
        ax.set_ylabel(f"{title} × 100 (real val)")
        ax.set_title(f"{title} at equal iterations")
        ax.set_xticks(list(shares))
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    save_figure(fig, path, dpi=110)


def print_summary(
    out: Path, summary: dict[str, Any], shares: Sequence[float], missing: Sequence[str]
) -> None:
    print(
        "\ngain summary (COCO mAP x 100 on the real val frames; mean ± std over seeds; gain paired by seed):"
    )
    for share in shares:
        e = summary[f"{share:g}"]
        s = None if e["map"] is None else Spread(**e["map"])
        g = None if e.get("map_gain") is None else Spread(**e["map_gain"])
        gain = "baseline" if share == 0 else f"gain {fmt_spread(g, signed=True)}"
        print(f"  {share:>5g} % synthetic: mAP50-95 {fmt_spread(s)}  ({gain}; seeds {e['seeds']})")
    if missing:
        print(f"not finished: {', '.join(missing)} (rerun to complete)")
    print(f"tables: {out / 'gain.md'}; plot: {out / 'gain.png'}; rows: {out / 'gain.csv'}")
    print(
        "a gain counts only if it exceeds the spread over seeds; zero or negative means the synthetic images "
        "added nothing the real frames did not at the same number of iterations"
    )
