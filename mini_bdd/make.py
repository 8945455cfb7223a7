"""Write a small synthetic BDD100K in the real formats: the embedded default data set for the demo and tests.

Scenes are drawn, not noise: a pinhole camera looks down a street (city, highway, residential, parking lot, gas
station or tunnel) with sky, road and lane markings, sidewalks, buildings, trees, poles and fences, and objects
(cars, trucks, buses, pedestrians, riders on bicycles and motorcycles, traffic lights, traffic signs, now and then
a train, a trailer or an odd vehicle). Far objects are smaller and higher. Objects are drawn far to near; each
object's box is the bounding box of its own drawn pixels (clipped to the frame), ``occluded`` is set when a nearer
object or the ego car's hood covers any of them and ``truncated`` when the frame edge cuts it. The same pixels carry
the object's trainId in the segmentation mask. Weather, scene and time of day show in the pixels (night dark with
lit lights, dawn/dusk tint, fog haze, rain streaks, snow).

Usage:
    python convert/make_mini_bdd.py --out data/bdd100k --frames 24
    python -m convert.make_mini_bdd --out /tmp/bdd100k --frames 12 --size 320x180 --seed 1
    python -m convert.make_mini_bdd --out /tmp/det --frames 69863 --labels-only   # det_20 files at real scale

What is written under --out (the official download layout; N = --frames):
    images/100k/train/<8hex>-<8hex>.jpg    N images
    images/100k/val/                       max(2, round(N/3)) images
    images/10k/{train,val}/                ceil(n/2) names shared with 100k/<split> + max(2, n//6) of its own
    labels/det_20/det_{train,val}.json     top-level list; train leaves out max(1, round(N*137/70000)) images and
                                           has one frame each with "labels" absent, null and [] (when N >= 6)
    labels/bdd100k_labels_images_{train,val}.json   legacy 2018 format of the same frames (+ lanes, drivable areas)
    labels/sem_seg/masks/{train,val}/<name>.png      mode L trainIds 0-18, 255 = ignore (ego hood, static things)
    labels/sem_seg/colormaps/{train,val}/<name>.png  mode P, official palette (index = trainId)
    .mini_bdd.json                          parameters of the run (a rerun with the same ones is a no-op)

--labels-only writes only labels/det_20/det_{train,val}.json with N train and about N/7 val frames, ~18.4 boxes per
frame and the real class shares, for benchmarks of the label readers (N=69,863 is det_train's real size).
Same seed, same bytes; a different seed gives different data.

Drawing lives in mini_bdd/draw.py (camera, painters, objects) and mini_bdd/scene.py (streets,
placement, rendering); this file plans the data set and writes the files. In the masks, the det_20
ignored classes use the trainId of the class det.toml maps them to (other person -> person, other vehicle -> car,
trailer -> truck); the legacy file leaves them out (they did not exist in 2018).
"""

from __future__ import annotations

import argparse
import io
import math
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
from PIL import Image

from core.cli import UserError, run_main, setup_logging
from core.io import atomic_open, atomic_write_bytes
from mini_bdd.scene import LIGHT_CODE_SHARES, DrawnObject, FrameSpec, RenderedFrame, render_frame
from vocab import bdd

MARKER_NAME = ".mini_bdd.json"
GENERATOR_VERSION = 1
SPLITS = ("train", "val")
MIN_FRAMES = 6  # room for the three no-label frame forms, one unlisted image and labelled frames
REAL_UNLISTED_SHARE = 137 / 70000  # train images with no entry in det_train.json

# Real frame-attribute shares (reference note A4); rare values keep a small weight so they occur.
WEATHER_SHARES = {
    "clear": 0.534,
    "overcast": 0.125,
    "undefined": 0.116,
    "snowy": 0.08,
    "rainy": 0.073,
    "partly cloudy": 0.07,
    "foggy": 0.002,
}
SCENE_SHARES = {
    "city street": 0.62,
    "highway": 0.25,
    "residential": 0.12,
    "parking lot": 0.004,
    "gas stations": 0.001,
    "tunnel": 0.002,
    "undefined": 0.003,
}
TIME_SHARES = {"daytime": 0.53, "night": 0.40, "dawn/dusk": 0.07, "undefined": 0.002}
# det_20 class shares of boxes (reference note A2; ignored classes estimated small).
CATEGORY_SHARES = {
    "car": 0.55,
    "traffic sign": 0.19,
    "traffic light": 0.145,
    "pedestrian": 0.07,
    "truck": 0.023,
    "bus": 0.009,
    "bicycle": 0.006,
    "rider": 0.0035,
    "motorcycle": 0.0023,
    "train": 0.0001,
    "other vehicle": 0.002,
    "other person": 0.001,
    "trailer": 0.0005,
}
LEGACY_LIGHT_WORD = dict(zip(bdd.DET20_LIGHT_CODES, bdd.LEGACY_LIGHT_WORDS, strict=True))
# det_20 name -> legacy 2018 name (the ignored classes did not exist in 2018).
LEGACY_NAME = {
    **{c: c for c in bdd.DET_CLASSES if c in bdd.LEGACY_BOX_CATEGORIES},
    **{det: old for old, det in bdd.LEGACY_NAME_MAP.items() if old in bdd.LEGACY_BOX_CATEGORIES},
}


# ---------------------------------------------------------------------------------------------------------------
# Planning the data set: names, splits, attributes, which frames lack labels
# ---------------------------------------------------------------------------------------------------------------


def _names(rng, n: int, taken: set[str]) -> list[str]:
    out = []
    while len(out) < n:
        a, b = rng.integers(0, 2**32, 2, dtype=np.uint64).tolist()
        name = f"{a:08x}-{b:08x}"
        if name not in taken:
            taken.add(name)
            out.append(name)
    return out


def _attribute_values(rng, shares: dict[str, float], n: int) -> list[str]:
    """Every value once first (in random order) when n allows, then draws with the real shares."""
    values = list(shares)
    first = [values[i] for i in rng.permutation(len(values))][:n]
    p = np.array(list(shares.values()))
    rest = rng.choice(values, size=max(0, n - len(first)), p=p / p.sum()).tolist()
    return first + [str(v) for v in rest]


@dataclass
class DataSetPlan:
    """Which frames the mini data set holds and where each goes (folders, label files)."""

    frames: list[FrameSpec]  # every distinct image, in drawing order
    images: dict[str, list[str]]  # "100k/train" -> names
    det: dict[str, list[str]]  # split -> names listed in det_<split>.json (in file order)


def split_counts(frames: int) -> dict[str, int]:
    """Number of images per folder for N 100K train frames (documented in the module docstring)."""
    val = max(2, round(frames / 3))
    return {
        "100k/train": frames,
        "100k/val": val,
        "10k/train shared": math.ceil(frames / 2),
        "10k/train own": max(2, frames // 6),
        "10k/val shared": math.ceil(val / 2),
        "10k/val own": max(2, val // 6),
    }


def plan_data_set(frames: int, seed: int) -> DataSetPlan:
    rng = np.random.default_rng([seed, 0xB0D])
    counts = split_counts(frames)
    taken: set[str] = set()
    train100, val100 = _names(rng, frames, taken), _names(rng, counts["100k/val"], taken)
    own_train, own_val = (
        _names(rng, counts["10k/train own"], taken),
        _names(rng, counts["10k/val own"], taken),
    )
    shared_train = sorted(rng.choice(train100, counts["10k/train shared"], replace=False).tolist())
    shared_val = sorted(rng.choice(val100, counts["10k/val shared"], replace=False).tolist())
    order = train100 + val100 + own_train + own_val
    n = len(order)
    weathers = _attribute_values(rng, WEATHER_SHARES, n)
    scenes = _attribute_values(rng, SCENE_SHARES, n)
    times = _attribute_values(rng, TIME_SHARES, n)
    specs = [FrameSpec(i, name, weathers[i], scenes[i], times[i]) for i, name in enumerate(order)]
    # det_train: one image left out entirely per ~510 (137 of 70,000), one frame each with labels absent/null/[].
    n_unlisted = max(1, round(frames * REAL_UNLISTED_SHARE))
    picks = rng.permutation(frames).tolist()
    for i in picks[:n_unlisted]:
        specs[i].labels_state = "unlisted"
    for i, state in zip(picks[n_unlisted : n_unlisted + 3], ("absent", "null", "empty"), strict=True):
        specs[i].labels_state = state
    # Every det_20 category in det_train, even for tiny N: spread them over the labelled train frames.
    labelled = sorted(i for i in range(frames) if specs[i].labels_state == "ok")
    for j, category in enumerate(bdd.DET20_CATEGORIES):
        specs[labelled[j % len(labelled)]].required.append(category)
    det_train = [s.name for s in specs[:frames] if s.labels_state != "unlisted"]
    return DataSetPlan(
        specs,
        {
            "100k/train": sorted(train100),
            "100k/val": sorted(val100),
            "10k/train": sorted(shared_train + own_train),
            "10k/val": sorted(shared_val + own_val),
        },
        {"train": det_train, "val": list(val100)},
    )


# ---------------------------------------------------------------------------------------------------------------
# Label files
# ---------------------------------------------------------------------------------------------------------------


class _DetAttrs(msgspec.Struct, gc=False):
    occluded: bool
    truncated: bool
    trafficLightColor: str  # noqa: N815 (the file's key)


class _DetLabel(msgspec.Struct, gc=False):
    """det_20 label with the real file's key order."""

    id: str
    attributes: _DetAttrs
    category: str
    box2d: bdd.Box2D


_ENCODER = msgspec.json.Encoder()


def _frame_dict(spec_name: str, attrs: dict, state: str, labels: list) -> dict:
    frame = {"name": f"{spec_name}.jpg", "attributes": attrs, "timestamp": 10000}
    if state == "null":
        frame["labels"] = None
    elif state != "absent":
        frame["labels"] = labels if state == "ok" else []
    return frame


def det20_labels(objects: list[DrawnObject], next_id: int) -> list[_DetLabel]:
    return [
        _DetLabel(
            str(next_id + k),
            _DetAttrs(o.occluded, o.truncated, o.light if o.category == "traffic light" else "NA"),
            o.category,
            bdd.Box2D(*o.box),
        )
        for k, o in enumerate(objects)
    ]


def legacy_labels(objects: list[DrawnObject], polys: list[dict], next_id: int) -> list[dict]:
    out = []
    for o in objects:
        if o.category not in LEGACY_NAME:
            continue  # other person / other vehicle / trailer are det_20-only categories
        light = LEGACY_LIGHT_WORD[o.light] if o.category == "traffic light" else "none"
        x1, y1, x2, y2 = o.box
        out.append(
            {
                "category": LEGACY_NAME[o.category],
                "attributes": {"occluded": o.occluded, "truncated": o.truncated, "trafficLightColor": light},
                "manualShape": True,
                "manualAttributes": True,
                "box2d": {"x1": x1, "y1": y1, "x2": x2, "y2": y2},
            }
        )
    for poly in polys:
        out.append(
            {
                **{k: poly[k] for k in ("category", "attributes")},
                "manualShape": True,
                "manualAttributes": True,
                "poly2d": poly["poly2d"],
            }
        )
    for k, label in enumerate(out):
        label["id"] = next_id + k
    return out


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------


def _params(frames: int, size: tuple[int, int], seed: int, labels_only: bool) -> dict:
    return {
        "generator": "convert.make_mini_bdd",
        "version": GENERATOR_VERSION,
        "frames": frames,
        "size": f"{size[0]}x{size[1]}",
        "seed": seed,
        "labels_only": labels_only,
    }


def _check_out(out: Path, params: dict) -> dict | None:
    """The summary of a finished identical run in ``out`` (None: go ahead); refuses a foreign non-empty folder."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    marker = out / MARKER_NAME
    if not any(out.iterdir()):
        return None
    if not marker.is_file():
        raise UserError(
            f"--out {out} is not empty and was not written by make_mini_bdd: pick a new or empty folder"
        )
    try:
        previous = msgspec.json.decode(marker.read_bytes())
    except msgspec.DecodeError:
        raise UserError(f"{marker} is unreadable: delete {out} and rerun") from None
    if previous.get("params") != params:
        raise UserError(
            f"--out {out} holds a mini-BDD made with {previous.get('params')}, not {params}: use another folder or delete it"
        )
    return previous.get("summary") if previous.get("complete") else None


def make_mini_bdd(
    out: str | Path,
    frames: int,
    size: tuple[int, int] = (1280, 720),
    seed: int = 0,
    labels_only: bool = False,
) -> dict:
    """Write a mini BDD100K under ``out`` (see the module docstring) and return a summary of what is there.

    Raises:
        UserError: bad parameters, or ``out`` is a non-empty folder that is not this same mini-BDD.
    """
    out = Path(out)
    size = (int(size[0]), int(size[1]))
    if frames < (1 if labels_only else MIN_FRAMES):
        raise UserError(f"--frames {frames}: need at least {1 if labels_only else MIN_FRAMES}")
    if not labels_only and (size[0] < 64 or size[1] < 36):
        raise UserError(f"--size {size[0]}x{size[1]} is too small to draw scenes in (minimum 64x36)")
    params = _params(frames, size, seed, labels_only)
    done = _check_out(out, params)
    if done is not None:
        return {**done, "reused": True}
    out.mkdir(parents=True, exist_ok=True)
    marker = out / MARKER_NAME
    atomic_write_bytes(marker, msgspec.json.format(_ENCODER.encode({"params": params, "complete": False})))
    summary = (
        write_labels_only(out, frames, size, seed) if labels_only else write_mini(out, frames, size, seed)
    )
    summary = {"out": str(out), **params, **summary}
    atomic_write_bytes(
        marker, msgspec.json.format(_ENCODER.encode({"params": params, "complete": True, "summary": summary}))
    )
    return summary


def write_mini(out: Path, frames: int, size: tuple[int, int], seed: int) -> dict:
    from tqdm import tqdm

    plan = plan_data_set(frames, seed)
    split_of = {
        name: split for key, names in plan.images.items() for name in names for split in [key.split("/")[1]]
    }
    in_10k = {name for key in ("10k/train", "10k/val") for name in plan.images[key]}
    in_100k = {name: key for key in ("100k/train", "100k/val") for name in plan.images[key]}
    for key in plan.images:
        (out / "images" / key).mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        for kind in ("masks", "colormaps"):
            (out / "labels" / "sem_seg" / kind / split).mkdir(parents=True, exist_ok=True)
    (out / "labels" / "det_20").mkdir(parents=True, exist_ok=True)

    palette = bdd.seg_palette()
    rendered: dict[str, RenderedFrame] = {}
    for spec in tqdm(plan.frames, desc="drawing", unit="img", disable=len(plan.frames) < 50):
        frame = render_frame(spec, size, seed)
        rendered[spec.name] = frame
        if spec.name in in_100k:
            atomic_write_bytes(out / "images" / in_100k[spec.name] / f"{spec.name}.jpg", frame.jpeg)
        if spec.name in in_10k:
            split = split_of[spec.name]
            atomic_write_bytes(out / "images" / "10k" / split / f"{spec.name}.jpg", frame.jpeg)
            mask = Image.fromarray(frame.mask, mode="L")
            for kind, im in (("masks", mask), ("colormaps", _colormap(mask, palette))):
                buf = io.BytesIO()
                im.save(buf, format="PNG")
                atomic_write_bytes(
                    out / "labels" / "sem_seg" / kind / split / f"{spec.name}.png", buf.getvalue()
                )
        frame.jpeg = b""  # keep only labels in memory

    specs = {s.name: s for s in plan.frames}
    boxes, categories = {}, Counter()
    for split in SPLITS:
        det_frames, legacy_frames, det_id, legacy_id = [], [], 0, 0
        for name in plan.det[split]:
            spec, frame = specs[name], rendered[name]
            attrs = {"weather": spec.weather, "scene": spec.scene, "timeofday": spec.timeofday}
            labels = det20_labels(frame.objects, det_id)
            det_id += len(labels)
            det_frames.append(_frame_dict(name, attrs, spec.labels_state, labels))
            legacy = legacy_labels(frame.objects if spec.labels_state == "ok" else [], frame.polys, legacy_id)
            legacy_id += len(legacy)
            legacy_frames.append(
                {"name": f"{name}.jpg", "attributes": attrs, "timestamp": 10000, "labels": legacy}
            )
            if spec.labels_state == "ok" and split == "train":
                categories.update(o.category for o in frame.objects)
        boxes[split] = sum(len(f.get("labels") or []) for f in det_frames)
        atomic_write_bytes(out / "labels" / "det_20" / f"det_{split}.json", _ENCODER.encode(det_frames))
        atomic_write_bytes(
            out / "labels" / f"bdd100k_labels_images_{split}.json", _ENCODER.encode(legacy_frames)
        )
    missing = [c for c in bdd.DET20_CATEGORIES if c not in categories]
    if missing:  # plan_data_set asks for each; render_frame retries until drawn, so this is a bug
        raise RuntimeError(f"det_train lacks categories {missing}")
    return {
        "images": {key: len(names) for key, names in plan.images.items()},
        "det_frames": {split: len(plan.det[split]) for split in SPLITS},
        "boxes": boxes,
        "masks": {split: len(plan.images[f"10k/{split}"]) for split in SPLITS},
    }


def _colormap(mask: Image.Image, palette: list[int]) -> Image.Image:
    colormap = mask.copy()
    colormap.putpalette(palette)
    return colormap


# ---------------------------------------------------------------------------------------------------------------
# Labels only: det_20 files at real scale, for benchmarks
# ---------------------------------------------------------------------------------------------------------------

# Metric size (width, height, height above the road) of each category's box, for the perspective model.
_BOX_METRES = {
    "car": (1.8, 1.5, 0.0),
    "traffic sign": (0.75, 0.75, 2.3),
    "traffic light": (0.4, 1.0, 4.0),
    "pedestrian": (0.5, 1.7, 0.0),
    "truck": (2.5, 3.0, 0.0),
    "bus": (2.6, 3.2, 0.0),
    "bicycle": (1.6, 1.05, 0.0),
    "rider": (0.6, 1.6, 0.3),
    "motorcycle": (1.2, 1.15, 0.0),
    "train": (25.0, 3.8, 0.0),
    "other vehicle": (2.4, 2.6, 0.0),
    "other person": (0.5, 1.1, 0.0),
    "trailer": (3.5, 2.2, 0.0),
}


def _synthetic_split(rng, n_frames: int, size: tuple[int, int], names: list[str]) -> tuple[list[bytes], int]:
    """det_20 frames as JSON chunks (without brackets) and the number of boxes."""
    width, height = size
    cats = list(CATEGORY_SHARES)
    p = np.array(list(CATEGORY_SHARES.values()))
    counts = rng.negative_binomial(4, 4 / (4 + 18.4), n_frames)
    total = int(counts.sum())
    cat_idx = rng.choice(len(cats), total, p=p / p.sum())
    dims = (
        np.array([_BOX_METRES[c] for c in cats])[cat_idx] * rng.lognormal(0, 0.12, (total, 1)) * [1, 1, 0.9]
    )
    fx, fy, horizon = 1000.0 * width / 1280, 1000.0 * height / 720, height * rng.uniform(0.44, 0.5, total)
    Z = np.exp(rng.uniform(math.log(5), math.log(110), total))
    roadside = np.isin(
        cat_idx, [cats.index(c) for c in ("traffic sign", "traffic light", "pedestrian", "other person")]
    )
    X = np.where(
        roadside, rng.choice([-1, 1], total) * rng.uniform(3.5, 7.5, total), rng.uniform(-7.5, 7.5, total)
    )
    xc = width / 2 + fx * X / Z
    w = np.maximum(fx * dims[:, 0] / Z, 2.0)
    y2 = horizon + fy * (1.4 - dims[:, 2]) / Z
    y1 = y2 - np.maximum(fy * dims[:, 1] / Z, 2.0)
    x1, x2 = xc - w / 2, xc + w / 2
    outside = (x2 < 0) | (x1 > width - 1)
    x1, x2 = np.where(outside, x1 * 0.5 + width * 0.25, x1), np.where(outside, x2 * 0.5 + width * 0.25, x2)
    truncated = (x1 < 0) | (x2 > width - 1) | (y1 < 0) | (y2 > height - 1)
    box = np.round(
        np.stack(
            [
                np.clip(x1, 0, width - 1),
                np.clip(y1, 0, height - 1),
                np.clip(x2, 0, width - 1),
                np.clip(y2, 0, height - 1),
            ],
            1,
        ),
        6,
    )
    occluded = rng.random(total) < 0.47
    codes = np.full(total, "NA", dtype=object)
    lights = cat_idx == cats.index("traffic light")
    codes[lights] = rng.choice(list(LIGHT_CODE_SHARES), int(lights.sum()), p=list(LIGHT_CODE_SHARES.values()))
    states = np.where(counts == 0, "absent", np.where(rng.random(n_frames) < 0.0005, "empty", "ok"))
    w_vals = rng.choice(
        list(WEATHER_SHARES),
        n_frames,
        p=np.array(list(WEATHER_SHARES.values())) / sum(WEATHER_SHARES.values()),
    )
    s_vals = rng.choice(
        list(SCENE_SHARES), n_frames, p=np.array(list(SCENE_SHARES.values())) / sum(SCENE_SHARES.values())
    )
    t_vals = rng.choice(
        list(TIME_SHARES), n_frames, p=np.array(list(TIME_SHARES.values())) / sum(TIME_SHARES.values())
    )

    box_l, occ_l, trunc_l, code_l, cat_l = (
        box.tolist(),
        occluded.tolist(),
        truncated.tolist(),
        codes.tolist(),
        [cats[i] for i in cat_idx.tolist()],
    )
    chunks, start, label_id, n_boxes = [], 0, 0, 0
    frames: list[dict] = []
    for i, k in enumerate(counts.tolist()):
        labels = []
        if states[i] == "ok":
            for j in range(start, start + k):
                labels.append(
                    _DetLabel(
                        str(label_id),
                        _DetAttrs(occ_l[j], trunc_l[j], code_l[j]),
                        cat_l[j],
                        bdd.Box2D(*box_l[j]),
                    )
                )
                label_id += 1
            n_boxes += k
        start += k
        attrs = {"weather": str(w_vals[i]), "scene": str(s_vals[i]), "timeofday": str(t_vals[i])}
        frames.append(_frame_dict(names[i], attrs, str(states[i]), labels))
        if len(frames) == 2000:
            chunks.append(_ENCODER.encode(frames)[1:-1])
            frames = []
    if frames:
        chunks.append(_ENCODER.encode(frames)[1:-1])
    return chunks, n_boxes


def write_labels_only(out: Path, frames: int, size: tuple[int, int], seed: int) -> dict:
    rng = np.random.default_rng([seed, 0xDE7])
    n_val = max(1, round(frames / 7))
    taken: set[str] = set()
    names = {"train": _names(rng, frames, taken), "val": _names(rng, n_val, taken)}
    (out / "labels" / "det_20").mkdir(parents=True, exist_ok=True)
    boxes = {}
    for split in SPLITS:
        chunks, boxes[split] = _synthetic_split(rng, len(names[split]), size, names[split])
        path = out / "labels" / "det_20" / f"det_{split}.json"
        with atomic_open(path, "wb") as fh:
            fh.write(b"[")
            for k, chunk in enumerate(chunks):
                fh.write(b"," + chunk if k else chunk)
            fh.write(b"]")
        path.chmod(0o644)  # atomic_open's temporary file is private
    return {"det_frames": {s: len(names[s]) for s in SPLITS}, "boxes": boxes}


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def _parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 1280x720") from None
    return w, h


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="make_mini_bdd",
        description="Write a small synthetic BDD100K (images, det_20 + legacy labels, sem_seg masks) in the real formats.",
        epilog=__doc__.split("What is written", 1)[1].join(["What is written", ""]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--out", required=True, help="folder to create (empty, or a previous run with the same parameters)"
    )
    parser.add_argument(
        "--frames",
        type=int,
        required=True,
        help="N: number of 100K train images (det_train frames with --labels-only)",
    )
    parser.add_argument(
        "--size",
        default="1280x720",
        help="image size WIDTHxHEIGHT; the whole drawing scales (default 1280x720)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed: same seed, same bytes (default 0)")
    parser.add_argument(
        "--labels-only",
        action="store_true",
        help="write only labels/det_20/det_{train,val}.json, at any scale",
    )
    args = parser.parse_args(argv)
    setup_logging()
    summary = make_mini_bdd(args.out, args.frames, _parse_size(args.size), args.seed, args.labels_only)
    root = Path(summary["out"])
    print(
        ("reused the mini-BDD already in " if summary.get("reused") else "wrote a mini-BDD100K to ")
        + str(root)
    )
    for key, n in summary.get("images", {}).items():
        print(f"  images/{key}: {n} images")
    for split in SPLITS:
        print(
            f"  labels/det_20/det_{split}.json: {summary['det_frames'][split]} frames, {summary['boxes'][split]} boxes"
        )
    if not summary["labels_only"]:
        for split in SPLITS:
            print(
                f"  labels/bdd100k_labels_images_{split}.json (legacy), labels/sem_seg/masks/{split}: {summary['masks'][split]} masks"
            )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
