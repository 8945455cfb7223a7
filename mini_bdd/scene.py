"""Scenes of the mini BDD100K (convert/make_mini_bdd.py): streets, object placement and frame rendering.

A frame is a street seen by a pinhole camera: background faces (sky, ground, road with lane markings, buildings,
walls, fences) are drawn first, then objects far to near. Each object's box is the bounding box of its own drawn
pixels, clipped to the frame; ``occluded`` means a nearer object (or the ego car's hood) covers some of them and
``truncated`` that the frame edge cuts it. Time of day and weather are applied to the pixels afterwards.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from mini_bdd.draw import (
    Camera,
    Drawing,
    Sprite,
    World,
    _shade,
    bus,
    car,
    other_vehicle,
    person,
    pole,
    pump,
    rider,
    traffic_light,
    traffic_sign,
    trailer,
    train,
    tree,
    truck,
    two_wheeler,
)
from vocab import bdd

IGNORE = bdd.SEG_IGNORE_ID
SEG = bdd.SEG_ID
JPEG_QUALITY = 90
#: Shares of det_20 trafficLightColor codes on traffic lights (NA: the head faces away).
LIGHT_CODE_SHARES = {"G": 0.45, "R": 0.33, "Y": 0.04, "NA": 0.18}


def seg_id_of(category: str) -> int:
    """trainId drawn for a det_20 category (ignored classes use the class det.toml maps them to)."""
    return bdd.DET_CLASS_TO_SEG_ID[bdd.canonical_category(category).det_class]


# ---------------------------------------------------------------------------------------------------------------
# Scenes: background faces, then placed objects drawn far to near
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Item:
    category: str | None  # det_20 category, None for unlabelled things (poles, trees, pumps)
    seg_id: int
    X: float
    Z: float
    drawing: Drawing
    order: int = 0  # at equal depth, higher is drawn later (in front)
    light: str = "NA"


@dataclass
class Look:
    """How the frame is rendered (the 'undefined' attribute values render as one of the others)."""

    weather: str
    time: str
    snow: bool
    dark: bool


@dataclass
class Street:
    """A street's plan in world coordinates: lanes, sidewalks, a cross street and what stands on it."""

    kind: str
    lane_edges: list[float]  # X of lane boundaries, left to right; first and last are the road edges
    oncoming: int  # number of leftmost lanes with oncoming traffic
    sidewalk: float
    crossing: tuple[float, float] | None = None  # Z range of a cross street
    items: list[Item] = field(default_factory=list)
    lane_lines: list[dict] = field(default_factory=list)  # legacy lanes: X, laneType, laneStyle, z range

    @property
    def left(self) -> float:
        return self.lane_edges[0]

    @property
    def right(self) -> float:
        return self.lane_edges[-1]

    def lane_centre(self, k: int) -> float:
        return (self.lane_edges[k] + self.lane_edges[k + 1]) / 2


SKY = {
    "clear": ((70, 125, 200), (170, 200, 232)),
    "partly cloudy": ((85, 135, 200), (180, 205, 230)),
    "overcast": ((150, 154, 160), (195, 197, 200)),
    "rainy": ((105, 110, 118), (150, 153, 158)),
    "snowy": ((190, 195, 202), (222, 225, 230)),
    "foggy": ((195, 197, 200), (212, 213, 215)),
}
ROAD, ROAD_WET, SIDEWALK, SNOW = (92, 92, 96), (70, 72, 78), (170, 165, 155), (232, 235, 240)
BUILDINGS = [
    (150, 140, 130),
    (120, 110, 105),
    (175, 165, 150),
    (95, 100, 110),
    (160, 120, 100),
    (200, 195, 185),
]


def _ground_colours(look: Look):
    if look.snow:
        return SNOW, (225, 228, 235), (210, 215, 220)  # sidewalk, terrain, vegetation floor
    return SIDEWALK, (140, 160, 90), (90, 120, 50)


def draw_sky(world: World, cam: Camera, look: Look, rng) -> None:
    top, bottom = SKY[look.weather]
    if look.time == "dawn/dusk":
        top, bottom = (80, 85, 130), (250, 160, 95)
    rows = np.clip(np.linspace(0, 1, cam.height) * cam.height / max(cam.horizon, 1), 0, 1)[:, None, None]
    grad = (np.array(top)[None, None] * (1 - rows) + np.array(bottom)[None, None] * rows).astype(np.uint8)
    world.rgb.paste(Image.fromarray(np.repeat(grad, cam.width, axis=1)))
    if look.weather == "partly cloudy":
        for _ in range(int(rng.integers(3, 7))):
            cx, cy = rng.uniform(0, cam.width), rng.uniform(0, cam.horizon * 0.7)
            rx, ry = rng.uniform(0.05, 0.15) * cam.width, rng.uniform(0.02, 0.05) * cam.height
            world.ellipse_px([cx - rx, cy - ry, cx + rx, cy + ry], (240, 240, 242), SEG["sky"])


def draw_buildings(world: World, rng, x_face: float, z_from: float, z_to: float, gaps, look: Look, low=False):
    """Blocks along one side of the street (facade plane at ``x_face``), drawn far to near."""
    blocks, z = [], z_from
    while z < z_to:
        length = float(rng.uniform(8, 25))
        if not any(g0 < z + length and z < g1 for g0, g1 in gaps):
            blocks.append((z, min(z + length, z_to)))
        z += length + (float(rng.uniform(0, 6)) if rng.random() < 0.3 else 0.0)
    out = 1.0 if x_face > 0 else -1.0
    for z0, z1 in reversed(blocks):
        h = float(rng.uniform(4, 9) if low else rng.uniform(8, 35))
        color = BUILDINGS[rng.integers(len(BUILDINGS))]
        world.front(x_face, x_face + out * 15, z0, 0, h, _shade(color, 0.85), SEG["building"])
        world.side(x_face, z0, z1, 0, h, color, SEG["building"])
        if low:  # pitched roof of a house
            world.face(
                [
                    (x_face, h, z0),
                    (x_face, h, z1),
                    (x_face + out * 5, h + 3, z1),
                    (x_face + out * 5, h + 3, z0),
                ],
                (120, 60, 50),
                SEG["building"],
            )
        if z0 > 120 or (z1 - z0) < 3:
            continue
        floor_h = 3.2
        for f in range(int(h // floor_h)):
            y0 = f * floor_h + 1.0
            for k in range(int((z1 - z0 - 1) // 3)):
                za = z0 + 1.0 + 3 * k
                lit = (255, 220, 140) if look.dark and rng.random() < 0.4 else None
                world.side(x_face, za, za + 1.6, y0, y0 + 1.6, (60, 70, 85), SEG["building"], lit)


def build_street(kind: str, cam: Camera, look: Look, rng, empty: bool) -> tuple[World, Street]:
    """Background of one frame and the placements of its objects (none when ``empty``)."""
    world = World(cam)
    draw_sky(world, cam, look, rng)
    sidewalk_c, terrain_c, veg_floor = _ground_colours(look)
    road_c = ROAD_WET if look.weather == "rainy" else ROAD
    far = 400.0
    lane_w = 3.5
    if kind == "highway":
        n_ego, n_onc = int(rng.integers(2, 4)), 0
    elif kind in ("residential", "tunnel") or kind == "parking":
        n_ego, n_onc = 1, 1
    else:
        n_ego, n_onc = int(rng.integers(1, 3)), int(rng.integers(1, 3))
    ego = int(rng.integers(n_ego))
    left = -(ego + 0.5) * lane_w - n_onc * lane_w
    edges = [left + k * lane_w for k in range(n_ego + n_onc + 1)]
    sidewalk = {"city": 4.0, "residential": 2.0, "gas": 4.0, "parking": 3.0}.get(kind, 0.0)
    lay = Street(kind, edges, n_onc, sidewalk)
    if kind == "city" and rng.random() < 0.8:
        z_cross = float(rng.uniform(22, 45))
        lay.crossing = (z_cross, z_cross + 14.0)
    gaps = [lay.crossing] if lay.crossing else []

    # Ground: outer terrain, sidewalks, road, cross street.
    world.ground(
        -300,
        300,
        1.0,
        far,
        terrain_c if kind in ("highway", "residential") else sidewalk_c,
        SEG["terrain"] if kind in ("highway", "residential") else SEG["sidewalk"],
    )
    if kind == "tunnel":
        world.rgb.paste((48, 46, 44), (0, 0, cam.width, cam.height))
        world.label.paste(IGNORE, (0, 0, cam.width, cam.height))
    if sidewalk:
        world.ground(lay.right, lay.right + sidewalk, 1.0, far, sidewalk_c, SEG["sidewalk"])
        world.ground(lay.left - sidewalk, lay.left, 1.0, far, sidewalk_c, SEG["sidewalk"])
    if kind == "residential":
        for sgn in (-1, 1):
            edge = lay.right + sidewalk if sgn > 0 else lay.left - sidewalk
            world.ground(
                min(edge, edge + sgn * 6), max(edge, edge + sgn * 6), 1.0, far, terrain_c, SEG["terrain"]
            )
    if kind == "parking":
        world.ground(-40, 40, 1.0, 70, road_c, SEG["road"])
    world.ground(lay.left, lay.right, 1.0, 60 if kind == "tunnel" else far, road_c, SEG["road"])
    if lay.crossing:
        world.ground(-300, 300, *lay.crossing, road_c, SEG["road"])
    if look.snow:
        for x in (lay.left, lay.right - 0.8):
            world.ground(x, x + 0.8, 1.0, far, (200, 204, 210), SEG["road"])

    # Lane markings (road class in masks, legacy lane polylines).
    for k, x in enumerate(edges):
        if k in (0, len(edges) - 1):
            lay.lane_lines.append({"X": x, "type": "road curb", "style": "solid"})
            world.ground(x - 0.08 if k else x, x if k else x + 0.08, 1.0, far, (215, 215, 210), SEG["road"])
        elif k == n_onc and n_onc:
            lay.lane_lines.append({"X": x, "type": "double yellow", "style": "solid"})
            for dx in (-0.2, 0.08):
                world.ground(x + dx, x + dx + 0.12, 1.0, far, (225, 180, 40), SEG["road"])
        else:
            lay.lane_lines.append({"X": x, "type": "single white", "style": "dashed"})
            for z in np.arange(2.0, 120.0, 9.0):
                world.ground(x - 0.07, x + 0.07, z, z + 3.0, (225, 225, 222), SEG["road"])
    if lay.crossing:
        z0 = lay.crossing[0] - 3.5
        lay.lane_lines.append({"X": None, "Z": z0, "type": "crosswalk", "style": "solid"})
        for x in np.arange(lay.left + 0.2, lay.right - 0.4, 1.0):
            world.ground(x, x + 0.5, z0, z0 + 3.0, (225, 225, 222), SEG["road"])
    if kind == "parking":
        for z in (12.0, 20.0, 28.0, 36.0):
            for x in np.arange(-25.0, 25.0, 2.7):
                if abs(x) > 3:
                    world.ground(x, x + 0.1, z - 2.5, z + 2.5, (225, 225, 222), SEG["road"])

    # Sides of the street.
    if kind == "city" or kind == "gas":
        draw_buildings(
            world, rng, lay.right + sidewalk, 2.0, 220.0, gaps + ([(10, 45)] if kind == "gas" else []), look
        )
        draw_buildings(world, rng, lay.left - sidewalk, 2.0, 220.0, gaps, look)
        for x0 in np.arange(-60.0, 60.0, 9.0):  # skyline at the end of the street
            world.front(
                x0,
                x0 + 9,
                230,
                0,
                float(rng.uniform(10, 60)),
                BUILDINGS[rng.integers(len(BUILDINGS))],
                SEG["building"],
            )
    elif kind == "residential":
        draw_buildings(world, rng, lay.right + sidewalk + 6, 4.0, 160.0, gaps, look, low=True)
        draw_buildings(world, rng, lay.left - sidewalk - 6, 4.0, 160.0, gaps, look, low=True)
        world.front(-300, 300, far * 0.8, 0, 25, (60, 95, 45), SEG["vegetation"])
    elif kind == "highway":
        world.front(-400, 400, far * 0.9, 0, 30, (65, 95, 55), SEG["vegetation"])
        world.side(lay.right + 6, 1.0, far, 0, 1.6, (150, 140, 120), SEG["fence"])
        world.side(lay.left - 0.3, 1.0, far, 0, 0.9, (175, 175, 170), SEG["wall"])
        world.face(
            [
                (lay.left - 0.3, 0.9, 1.0),
                (lay.left - 0.6, 0.9, 1.0),
                (lay.left - 0.6, 0.9, far),
                (lay.left - 0.3, 0.9, far),
            ],
            (200, 200, 195),
            SEG["wall"],
        )
    elif kind == "parking":
        world.front(-60, 60, 75, 0, 8, BUILDINGS[rng.integers(len(BUILDINGS))], SEG["building"])
        world.front(
            -20, 20, 74.9, 5.5, 7, (200, 40, 40), SEG["building"], (255, 90, 80) if look.dark else None
        )
    elif kind == "tunnel":
        z_end = float(rng.uniform(60, 140))
        world.ground(lay.left, lay.right, 1.0, z_end, road_c, SEG["road"])
        for x in (lay.left - 1.0, lay.right + 1.0):
            world.side(x, 1.0, z_end, 0, 5.5, (185, 178, 160), SEG["wall"])
        opening = (230, 235, 240) if not look.dark else (30, 35, 50)
        world.front(lay.left - 1.0, lay.right + 1.0, z_end, 0, 5.5, opening, SEG["sky"])
        for z in np.arange(3.0, z_end, 6.0):
            world.face(
                [(-0.3, 5.5, z), (0.3, 5.5, z), (0.3, 5.5, z + 2.5), (-0.3, 5.5, z + 2.5)],
                (250, 220, 160),
                IGNORE,
                (255, 215, 150),
            )
    if kind == "gas":
        x0 = lay.right + sidewalk + 2
        world.face(
            [(x0, 4.6, 12), (x0 + 16, 4.6, 12), (x0 + 16, 4.6, 28), (x0, 4.6, 28)],
            (230, 230, 225),
            SEG["building"],
            (255, 250, 230) if look.dark else None,
        )
        world.front(x0, x0 + 16, 12, 4.6, 5.6, (230, 230, 230), SEG["building"])
        world.front(x0, x0 + 16, 11.99, 4.9, 5.2, (200, 30, 30), SEG["building"])
    if not empty:
        populate(lay, cam, look, rng)
    add_street_furniture(lay, look, rng)
    return world, lay


def add_street_furniture(lay: Street, look: Look, rng) -> None:
    """Unlabelled poles and trees."""
    if lay.kind in ("city", "residential", "parking", "highway"):
        for z in np.arange(float(rng.uniform(8, 20)), 120.0, float(rng.uniform(18, 30))):
            x = lay.right + (lay.sidewalk - 0.6 if lay.sidewalk else 1.5)
            lay.items.append(Item(None, SEG["pole"], x, float(z), pole(8.0, -1.5, True, look.dark)))
    if lay.kind in ("residential", "highway"):
        for z in np.arange(float(rng.uniform(6, 14)), 150.0, float(rng.uniform(9, 16))):
            for x in (
                lay.right + lay.sidewalk + 3.0 + float(rng.uniform(0, 4)),
                lay.left - lay.sidewalk - 3.0 - float(rng.uniform(0, 4)),
            ):
                if rng.random() < 0.7:
                    lay.items.append(
                        Item(
                            None,
                            SEG["vegetation"],
                            x,
                            float(z + rng.uniform(-2, 2)),
                            tree(rng, float(rng.uniform(5, 11))),
                        )
                    )
    if lay.kind == "gas":
        for z in (18.0, 24.0):
            lay.items.append(Item(None, IGNORE, lay.right + lay.sidewalk + 6, z, pump(rng)))


def place(lay: Street, cam: Camera, look: Look, rng, category: str, near: bool = False) -> None:
    """Add one object of ``category`` at a plausible spot (``near``: closer, so it is surely visible)."""
    dark = look.dark
    z_lo, z_hi = (9.0, 22.0) if near else (7.0, 75.0)
    Z = float(math.exp(rng.uniform(math.log(z_lo), math.log(z_hi))))
    lanes = len(lay.lane_edges) - 1
    right_side = lay.right + (lay.sidewalk / 2 if lay.sidewalk else 1.2)
    add = lay.items.append
    if category in ("car", "truck", "bus", "other vehicle", "trailer"):
        lane = int(rng.integers(lanes))
        X = lay.lane_centre(lane) + float(rng.uniform(-0.4, 0.4))
        view = "front" if lane < lay.oncoming else "rear"
        if lay.kind == "parking" and rng.random() < 0.6:
            X, Z = (
                float(rng.choice(np.arange(-24.0, 24.0, 2.7)) + 1.35),
                float(rng.choice([12.0, 20.0, 28.0, 36.0]) + 2.5),
            )
        if lay.crossing and rng.random() < 0.25:
            view, Z, X = "side", lay.crossing[0] + float(rng.uniform(3, 11)), float(rng.uniform(-18, 18))
        if category == "car":
            drawing = car(rng, view, dark)
        elif category == "truck":
            drawing = truck(rng, view, dark)
        elif category == "bus":
            drawing = bus(rng, view, dark)
        elif category == "other vehicle":
            X, Z = right_side + 1.0, Z
            drawing = other_vehicle(rng, dark)
        else:
            drawing = trailer(rng, dark)
        add(Item(category, seg_id_of(category), X, Z, drawing))
    elif category in ("pedestrian", "other person"):
        X = (
            right_side + float(rng.uniform(-1, 1))
            if rng.random() < 0.6
            else lay.left - (lay.sidewalk / 2 if lay.sidewalk else 1.2)
        )
        if lay.crossing and rng.random() < 0.3:
            X, Z = float(rng.uniform(lay.left, lay.right)), lay.crossing[0] - 2.0
        height = float(rng.uniform(1.55, 1.9)) if category == "pedestrian" else float(rng.uniform(0.9, 1.2))
        add(Item(category, seg_id_of(category), X, Z, person(rng, height, rng.random() < 0.5)))
    elif category in ("rider", "bicycle", "motorcycle"):
        kind = category if category != "rider" else ("bicycle" if rng.random() < 0.6 else "motorcycle")
        with_rider = category == "rider" or rng.random() < 0.7
        view = "rear" if rng.random() < 0.5 else "side"
        X = lay.right - 0.9 if with_rider else right_side
        add(Item(kind, seg_id_of(kind), X, Z, two_wheeler(rng, kind, view, dark)))
        if with_rider:
            add(Item("rider", seg_id_of("rider"), X, Z, rider(rng, kind, view), order=1))
    elif category == "traffic light":
        code = str(rng.choice(list(LIGHT_CODE_SHARES), p=list(LIGHT_CODE_SHARES.values())))
        mount = float(rng.uniform(3.2, 4.5))
        X = lay.right + 0.6 if rng.random() < 0.6 else lay.left - 0.6
        if lay.crossing:
            Z = lay.crossing[0] - 1.0 if rng.random() < 0.5 else lay.crossing[1] + 1.0
        add(Item(None, SEG["pole"], X, Z, pole(mount + 0.3)))
        add(
            Item(
                "traffic light",
                SEG["traffic light"],
                X + 0.3 * np.sign(-X),
                Z,
                traffic_light(rng, code, mount),
                order=1,
                light=code,
            )
        )
        if lay.crossing and rng.random() < 0.6:  # heads hanging from a mast arm over the lanes
            arm = -(lay.right - lay.lane_centre(lanes - 1) + 2.0) if X > 0 else lay.lane_centre(0) - X
            add(Item(None, SEG["pole"], X, Z, pole(6.0, arm)))
            add(
                Item(
                    "traffic light",
                    SEG["traffic light"],
                    X + arm * 0.8,
                    Z,
                    traffic_light(rng, code, 4.8),
                    order=1,
                    light=code,
                )
            )
    elif category == "traffic sign":
        if lay.kind == "highway" and rng.random() < 0.4:
            X, mount, kind = float(rng.uniform(lay.left + 2, lay.right - 2)), 5.5, "highway"
            add(Item(None, SEG["pole"], lay.right + 1.0, Z, pole(mount + 1.0, X - lay.right - 1.0)))
        else:
            X, mount, kind = (
                (right_side if rng.random() < 0.7 else lay.left - 1.0),
                float(rng.uniform(2.0, 2.8)),
                None,
            )
            add(Item(None, SEG["pole"], X, Z, pole(mount + 0.2)))
        add(Item("traffic sign", SEG["traffic sign"], X, Z - 0.05, traffic_sign(rng, mount, kind), order=1))
    elif category == "train":
        X = float(rng.uniform(-15, 15))
        add(Item("train", seg_id_of("train"), X, float(rng.uniform(35, 60)), train(rng, dark)))
    else:
        raise ValueError(f"unknown category {category!r}")


POPULATION = {  # category: (min, max) count per frame, by layout
    "city": {
        "car": (3, 9),
        "pedestrian": (1, 5),
        "traffic light": (1, 3),
        "traffic sign": (1, 3),
        "truck": (0, 2),
        "bus": (0, 1),
        "rider": (0, 1),
        "bicycle": (0, 1),
    },
    "highway": {"car": (4, 10), "truck": (1, 3), "bus": (0, 1), "traffic sign": (1, 3)},
    "residential": {
        "car": (1, 4),
        "pedestrian": (1, 3),
        "traffic sign": (1, 2),
        "bicycle": (0, 2),
        "rider": (0, 1),
    },
    "parking": {"car": (6, 12), "pedestrian": (1, 3), "traffic sign": (0, 1)},
    "gas": {
        "car": (2, 5),
        "pedestrian": (0, 2),
        "traffic sign": (1, 2),
        "truck": (0, 1),
        "traffic light": (0, 1),
    },
    "tunnel": {"car": (3, 8), "truck": (0, 2), "traffic sign": (0, 1)},
}


def populate(lay: Street, cam: Camera, look: Look, rng) -> None:
    for category, (lo, hi) in POPULATION[lay.kind].items():
        for _ in range(int(rng.integers(lo, hi + 1))):
            place(lay, cam, look, rng, category)
    if rng.random() < 0.03:
        place(lay, cam, look, rng, "motorcycle")


# ---------------------------------------------------------------------------------------------------------------
# Rendering one frame
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class FrameSpec:
    index: int
    name: str
    weather: str
    scene: str
    timeofday: str
    labels_state: str = "ok"  # ok | absent | null | empty (det_20 "labels" forms); unlisted = no det_20 entry
    required: list[str] = field(default_factory=list)


@dataclass
class DrawnObject:
    category: str
    box: tuple[float, float, float, float]  # inclusive pixels
    occluded: bool
    truncated: bool
    light: str


@dataclass
class RenderedFrame:
    jpeg: bytes
    mask: np.ndarray
    objects: list[DrawnObject]
    polys: list[dict]  # legacy poly2d labels (lanes and drivable areas), without ids


SCENE_LAYOUT = {
    "city street": "city",
    "highway": "highway",
    "residential": "residential",
    "parking lot": "parking",
    "gas stations": "gas",
    "tunnel": "tunnel",
}


def _look(spec: FrameSpec, rng) -> Look:
    weather = (
        spec.weather
        if spec.weather != "undefined"
        else str(rng.choice(["clear", "overcast", "partly cloudy"]))
    )
    time = (
        spec.timeofday
        if spec.timeofday != "undefined"
        else str(rng.choice(["daytime", "night", "dawn/dusk"]))
    )
    return Look(weather, time, weather == "snowy", time == "night" or spec.scene == "tunnel")


def render_frame(spec: FrameSpec, size: tuple[int, int], seed: int) -> RenderedFrame:
    """Draw one frame; retried with a fresh stream until every required category is visible and labelled."""
    for attempt in range(8):
        rng = np.random.default_rng([seed, spec.index, attempt])
        out = _render_once(spec, size, rng)
        have = {o.category for o in out.objects}
        if all(c in have for c in spec.required):
            return out
    raise RuntimeError(f"could not draw {spec.required} visibly in frame {spec.name} (seed {seed})")


def _render_once(spec: FrameSpec, size: tuple[int, int], rng) -> RenderedFrame:
    width, height = size
    cam = Camera(
        width, height, height * float(rng.uniform(0.42, 0.5)), 1000.0 * width / 1280, 1000.0 * height / 720
    )
    look = _look(spec, rng)
    kind = SCENE_LAYOUT.get(spec.scene) or str(rng.choice(["city", "residential", "highway"]))
    world, lay = build_street(kind, cam, look, rng, empty=spec.labels_state in ("absent", "null", "empty"))
    if spec.labels_state == "ok" or spec.labels_state == "unlisted":
        for category in spec.required:
            place(lay, cam, look, rng, category, near=True)

    img = np.array(world.rgb)
    seg = np.array(world.label)
    lit = np.array(world.lit)
    lit_mask = np.array(world.lit_mask) > 0
    inst = np.zeros((height, width), np.int32)  # 0 = background, -1 = ego hood, k = object k
    depth = np.where(
        np.arange(height)[:, None] > cam.horizon + 1,
        cam.depth_of_row(np.arange(height, dtype=np.float32))[:, None],
        300.0,
    )
    depth = np.broadcast_to(depth, (height, width)).astype(np.float32).copy()

    drawn = []  # (item, index, clipped box, truncated, pixel count)
    items = sorted(enumerate(lay.items), key=lambda p: (-p[1].Z, p[1].order, p[0]))
    for k, (_, item) in enumerate(items, start=1):
        extent, draw = item.drawing
        sprite = Sprite(cam, item.X, item.Z, extent)
        draw(sprite)
        sil = np.asarray(sprite.label) > 0
        ys, xs = np.nonzero(sil)
        if not len(ys):
            continue
        gx0, gy0 = sprite.ox + xs.min(), sprite.oy + ys.min()
        gx1, gy1 = sprite.ox + xs.max(), sprite.oy + ys.max()
        truncated = gx0 < 0 or gy0 < 0 or gx1 > width - 1 or gy1 > height - 1
        fx0, fy0 = max(sprite.ox, 0), max(sprite.oy, 0)
        fx1, fy1 = min(sprite.ox + sil.shape[1], width), min(sprite.oy + sil.shape[0], height)
        if fx0 >= fx1 or fy0 >= fy1:
            continue
        local = (slice(fy0 - sprite.oy, fy1 - sprite.oy), slice(fx0 - sprite.ox, fx1 - sprite.ox))
        glob = (slice(fy0, fy1), slice(fx0, fx1))
        m = sil[local]
        if not m.any():
            continue
        img[glob][m] = np.asarray(sprite.rgb)[local][m]
        seg[glob][m] = item.seg_id
        inst[glob][m] = k
        depth[glob][m] = item.Z
        sprite_lit = (np.asarray(sprite.lit_mask)[local] > 0) & m
        lit_mask[glob][m] = sprite_lit[m]
        lit[glob][sprite_lit] = np.asarray(sprite.lit)[local][sprite_lit]
        if item.category is not None:
            yy, xx = np.nonzero(m)
            box = (fx0 + xx.min(), fy0 + yy.min(), fx0 + xx.max(), fy0 + yy.max())
            drawn.append((item, k, box, truncated, int(m.sum())))

    _draw_hood(img, seg, inst, lit_mask, cam, rng)
    counts = np.bincount(inst[inst > 0].ravel(), minlength=len(items) + 1)
    objects = []
    for item, k, box, truncated, n_pixels in drawn:
        visible = int(counts[k])
        w, h = box[2] - box[0] + 1, box[3] - box[1] + 1
        if visible < 0.2 * n_pixels or visible < 4 or w < 2 or h < 2:
            continue  # hidden or too small to label, like unlabelled far objects in the real data
        objects.append(
            DrawnObject(
                item.category,
                _jitter(box, rng, width, height),
                bool(visible < n_pixels),
                bool(truncated),
                item.light,
            )
        )
    image = _apply_look(img, seg, depth, lit, lit_mask, cam, look, rng)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=2)
    return RenderedFrame(buf.getvalue(), seg, objects, _legacy_polys(lay, cam))


def _jitter(box, rng, width, height):
    """Sub-pixel float coordinates like the real annotations, staying within half a pixel of the drawn extent."""
    j = rng.uniform(-0.45, 0.45, 4)
    x1, y1, x2, y2 = (float(b) + float(d) for b, d in zip(box, j, strict=True))
    return (
        round(min(max(x1, 0.0), width - 1.0), 6),
        round(min(max(y1, 0.0), height - 1.0), 6),
        round(min(max(x2, 0.0), width - 1.0), 6),
        round(min(max(y2, 0.0), height - 1.0), 6),
    )


def _draw_hood(img, seg, inst, lit_mask, cam: Camera, rng) -> None:
    """The ego car's bonnet at the bottom edge (trainId 255, as unlabelled in BDD100K masks)."""
    h, w = cam.height, cam.width
    top = h * float(rng.uniform(0.9, 0.95))
    xs = np.arange(w)
    edge = top + (h - top) * ((xs - w / 2) / (w / 2)) ** 2 * 0.8
    hood = np.arange(h)[:, None] >= edge[None, :]
    shade = (np.arange(h)[:, None] - top) / max(h - top, 1)
    color = np.array([45.0, 48.0, 55.0])
    img[hood] = (color[None] * (1 + 0.5 * np.broadcast_to(shade, (h, w))[hood][:, None])).astype(np.uint8)
    seg[hood] = IGNORE
    inst[hood] = -1
    lit_mask[hood] = False


TONE = {"daytime": (1.0, 1.0, 1.0), "dawn/dusk": (0.85, 0.66, 0.52), "night": (0.17, 0.18, 0.24)}


def _apply_look(img, seg, depth, lit, lit_mask, cam: Camera, look: Look, rng) -> np.ndarray:
    """Time-of-day tone, weather, self-luminous pixels, sensor noise."""
    h, w = cam.height, cam.width
    out = img.astype(np.float32)
    if look.weather in ("overcast", "rainy", "foggy", "snowy"):
        luma = out.mean(axis=2, keepdims=True)
        out = out * 0.6 + luma * 0.4
        out *= 0.8 if look.weather == "rainy" else 0.95
    out *= np.array(TONE[look.time], np.float32)
    if look.time == "night":  # ego headlights on the road ahead
        rows = np.arange(h, dtype=np.float32)[:, None]
        z = cam.depth_of_row(rows)
        beam = np.clip(1 - z / 35, 0, 1) * (np.abs(np.arange(w)[None] - w / 2) < (rows - cam.horizon) * 1.6)
        out *= 1 + 2.5 * (beam * (seg == SEG["road"]))[..., None]
    out[lit_mask] = lit[lit_mask]
    if look.weather == "foggy":
        haze = (0.92 * (1 - np.exp(-depth / 30.0)))[..., None]
        fog = np.array(
            (200, 202, 205)
            if look.time == "daytime"
            else (90, 80, 75)
            if look.time == "dawn/dusk"
            else (40, 42, 48),
            np.float32,
        )
        out = out * (1 - haze) + fog * haze
    if look.weather in ("rainy", "snowy"):
        layer = Image.new("L", (w, h))
        draw = ImageDraw.Draw(layer)
        scale = h / 720
        n = int(w * h / (900 if look.weather == "rainy" else 1500))
        xs, ys = rng.uniform(0, w, n), rng.uniform(0, h, n)
        if look.weather == "rainy":
            length = rng.uniform(10, 25, n) * scale
            for x, y, ln in zip(xs, ys, length, strict=True):
                draw.line([(x, y), (x - 0.25 * ln, y + ln)], fill=110, width=1)
        else:
            radius = rng.uniform(0.6, 2.6, n) * scale
            for x, y, r in zip(xs, ys, radius, strict=True):
                draw.ellipse([x - r, y - r, x + r, y + r], fill=220)
        alpha = np.asarray(layer, np.float32)[..., None] / 255.0
        out = out * (1 - alpha) + np.float32(235.0) * alpha
    out += rng.normal(0.0, 2.0, out.shape).astype(np.float32)
    return np.clip(out, 0, 255).astype(np.uint8)


def _clip_segment(p, q, width, height):
    """Liang-Barsky clipping of segment p-q to the frame; None when outside."""
    (x0, y0), (x1, y1) = p, q
    dx, dy = x1 - x0, y1 - y0
    t0, t1 = 0.0, 1.0
    for pk, qk in ((-dx, x0), (dx, width - 1 - x0), (-dy, y0), (dy, height - 1 - y0)):
        if pk == 0:
            if qk < 0:
                return None
            continue
        t = qk / pk
        if pk < 0:
            t0 = max(t0, t)
        else:
            t1 = min(t1, t)
    if t0 > t1:
        return None
    return (x0 + t0 * dx, y0 + t0 * dy), (x0 + t1 * dx, y0 + t1 * dy)


def _legacy_polys(lay: Street, cam: Camera) -> list[dict]:
    """Lanes (open polylines) and drivable areas (closed polygons) in the 2018 label format, in pixels."""
    r = lambda v: round(float(v), 6)  # noqa: E731
    out = []
    z_near, z_far = 1.5, 150.0
    for line in lay.lane_lines:
        if line["X"] is None:  # crosswalk: a line across the road
            p, q = (
                (cam.x(lay.left, line["Z"]), cam.y(0, line["Z"])),
                (cam.x(lay.right, line["Z"]), cam.y(0, line["Z"])),
            )
            direction = "vertical"
        else:
            p, q = (cam.x(line["X"], z_near), cam.y(0, z_near)), (cam.x(line["X"], z_far), cam.y(0, z_far))
            direction = "parallel"
        seg = _clip_segment(p, q, cam.width, cam.height)
        if seg is None:
            continue
        (ax, ay), (bx, by) = seg
        if line["type"] == "road curb":  # a Bezier span: end points with two control points on the line
            verts = [
                [r(ax), r(ay)],
                [r(ax + (bx - ax) / 3), r(ay + (by - ay) / 3)],
                [r(ax + 2 * (bx - ax) / 3), r(ay + 2 * (by - ay) / 3)],
                [r(bx), r(by)],
            ]
            types = "LCCL"
        else:
            verts, types = [[r(ax), r(ay)], [r(bx), r(by)]], "LL"
        attrs = {"laneDirection": direction, "laneStyle": line["style"], "laneType": line["type"]}
        out.append(
            {
                "category": "lane",
                "attributes": attrs,
                "poly2d": [{"vertices": verts, "types": types, "closed": False}],
            }
        )
    lanes = len(lay.lane_edges) - 1
    z_row = float(cam.depth_of_row(np.float32(cam.height - 1)))
    for k in range(lay.oncoming, lanes):
        x0, x1 = lay.lane_edges[k], lay.lane_edges[k + 1]
        area = "direct" if x0 < 0 < x1 else "alternative"
        clamp = lambda x: r(min(max(x, 0.0), cam.width - 1.0))  # noqa: E731
        bl, br = [clamp(cam.x(x0, z_row)), r(cam.height - 1)], [clamp(cam.x(x1, z_row)), r(cam.height - 1)]
        tl, tr = [clamp(cam.x(x0, 80.0)), r(cam.y(0, 80.0))], [clamp(cam.x(x1, 80.0)), r(cam.y(0, 80.0))]
        c1 = [r(tr[0] + (br[0] - tr[0]) / 3), r(tr[1] + (br[1] - tr[1]) / 3)]
        c2 = [r(tr[0] + 2 * (br[0] - tr[0]) / 3), r(tr[1] + 2 * (br[1] - tr[1]) / 3)]
        poly = {"vertices": [bl, tl, tr, c1, c2, br], "types": "LLLCCL", "closed": True}
        out.append({"category": "drivable area", "attributes": {"areaType": area}, "poly2d": [poly]})
    return out
