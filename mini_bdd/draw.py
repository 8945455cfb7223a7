"""Drawing kit of the mini BDD100K (convert/make_mini_bdd.py): a pinhole camera, painters and objects.

Everything is drawn in metres. A :class:`Painter` puts each shape on three layers at once (colour, label and
self-luminous), so an object's pixels in the image and in the segmentation mask are the same set, and its box can
be taken from them. Objects return their extent and a drawing function; :class:`Sprite` draws one at a depth.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from vocab import bdd

SEG = bdd.SEG_ID

# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Camera:
    """Pinhole camera 1.4 m above a flat road, looking along +Z; X right, Y up, metres."""

    width: int
    height: int
    horizon: float
    focal_x: float
    focal_y: float
    height_m: float = 1.4

    def x(self, X: float, Z: float) -> float:
        return self.width / 2 + self.focal_x * X / Z

    def y(self, Y: float, Z: float) -> float:
        return self.horizon + self.focal_y * (self.height_m - Y) / Z

    def depth_of_row(self, row):
        return self.focal_y * self.height_m / np.maximum(row - self.horizon, 1e-3)


class Painter:
    """Draws each shape on an RGB layer, a label layer and a lit (self-luminous) layer at once."""

    def __init__(self, size: tuple[int, int], label_fill: int):
        self.rgb = Image.new("RGB", size)
        self.label = Image.new("L", size, label_fill)
        self.lit = Image.new("RGB", size)
        self.lit_mask = Image.new("L", size)
        self._layers = [ImageDraw.Draw(im) for im in (self.rgb, self.label, self.lit, self.lit_mask)]

    def _fills(self, color, label, lit):
        draw_rgb, draw_label, draw_lit, draw_lit_mask = self._layers
        fills = [(draw_rgb, color), (draw_label, label), (draw_lit_mask, 255 if lit else 0)]
        return [*fills, (draw_lit, lit)] if lit else fills

    def polygon_px(self, xy, color, label, lit=None):
        for draw, fill in self._fills(color, label, lit):
            draw.polygon(xy, fill=fill)

    def ellipse_px(self, box, color, label, lit=None, ring: int = 0):
        x0, y0, x1, y1 = box
        box = [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]
        for draw, fill in self._fills(color, label, lit):
            if ring:
                draw.ellipse(box, outline=fill, width=ring)
            else:
                draw.ellipse(box, fill=fill)

    def line_px(self, xy, color, label, width: int, lit=None):
        for draw, fill in self._fills(color, label, lit):
            draw.line(xy, fill=fill, width=width)


class World(Painter):
    """Full-frame background: planar faces given by 3-D corners in metres."""

    def __init__(self, cam: Camera):
        super().__init__((cam.width, cam.height), SEG["sky"])
        self.cam = cam

    def face(self, corners, color, seg, lit=None):
        cam = self.cam
        self.polygon_px(
            [(cam.x(X, max(Z, 0.5)), cam.y(Y, max(Z, 0.5))) for X, Y, Z in corners], color, seg, lit
        )

    def ground(self, x0, x1, z0, z1, color, seg, y=0.0):
        self.face([(x0, y, z0), (x1, y, z0), (x1, y, z1), (x0, y, z1)], color, seg)

    def side(self, x, z0, z1, y0, y1, color, seg, lit=None):
        """A vertical face parallel to the road (building facade, wall, fence)."""
        self.face([(x, y0, z0), (x, y0, z1), (x, y1, z1), (x, y1, z0)], color, seg, lit)

    def front(self, x0, x1, z, y0, y1, color, seg, lit=None):
        """A vertical face looking at the camera."""
        self.face([(x0, y0, z), (x1, y0, z), (x1, y1, z), (x0, y1, z)], color, seg, lit)


class Sprite(Painter):
    """One object drawn on a local canvas in metres (u right of its anchor, v above the road) at depth Z."""

    def __init__(self, cam: Camera, X: float, Z: float, extent: tuple[float, float, float, float]):
        u0, u1, v0, v1 = extent
        self.cam, self.X, self.Z = cam, X, Z
        self.ox = math.floor(cam.x(X + u0, Z)) - 3
        self.oy = math.floor(cam.y(v1, Z)) - 3
        size = (math.ceil(cam.x(X + u1, Z)) + 4 - self.ox, math.ceil(cam.y(v0, Z)) + 4 - self.oy)
        super().__init__(size, 0)
        self.px_per_m = cam.focal_x / Z

    def _p(self, u, v):
        return (self.cam.x(self.X + u, self.Z) - self.ox, self.cam.y(v, self.Z) - self.oy)

    def poly(self, pts, color, lit=None):
        self.polygon_px([self._p(u, v) for u, v in pts], color, 255, lit)

    def rect(self, u0, v0, u1, v1, color, lit=None):
        self.poly([(u0, v0), (u1, v0), (u1, v1), (u0, v1)], color, lit)

    def ellipse(self, uc, vc, ru, rv, color, lit=None, ring_m: float = 0.0):
        a, b = self._p(uc - ru, vc + rv), self._p(uc + ru, vc - rv)
        ring = max(1, round(ring_m * self.px_per_m)) if ring_m else 0
        self.ellipse_px([*a, *b], color, 255, lit, ring)

    def line(self, pts, width_m, color, lit=None):
        self.line_px([self._p(u, v) for u, v in pts], color, 255, max(1, round(width_m * self.px_per_m)), lit)


def _shade(color, k):
    return tuple(int(max(0, min(255, c * k))) for c in color)


# ---------------------------------------------------------------------------------------------------------------
# Objects, drawn in metres. Each returns its extent (u0, u1, v0, v1) and a function that draws it on a Sprite.
# ---------------------------------------------------------------------------------------------------------------

GLASS, TYRE, HUB = (50, 62, 78), (22, 22, 24), (140, 140, 145)
TAIL, TAIL_LIT, HEAD, HEAD_LIT = (140, 20, 20), (255, 50, 40), (210, 210, 200), (255, 250, 225)
CAR_COLORS = [(205, 205, 210), (30, 30, 34), (145, 148, 152), (165, 25, 30), (25, 50, 120), (238, 238, 236)]
CAR_COLORS += [(95, 98, 104), (120, 105, 80), (40, 85, 55), (200, 150, 40)]
TRUCK_COLORS = [(236, 236, 236), (200, 60, 30), (235, 195, 45), (60, 90, 150), (120, 122, 125)]
BUS_COLORS = [(240, 195, 30), (200, 40, 40), (30, 90, 170), (236, 236, 236), (40, 140, 90)]
SHIRTS = [
    (200, 40, 40),
    (40, 60, 150),
    (230, 230, 230),
    (30, 30, 30),
    (60, 140, 70),
    (230, 180, 40),
    (120, 60, 140),
]
PANTS = [(30, 35, 60), (40, 40, 40), (110, 100, 80), (70, 90, 130), (150, 140, 120)]
SKINS = [(235, 195, 160), (200, 150, 110), (140, 95, 60), (95, 65, 45)]
HAIRS = [(30, 25, 20), (90, 60, 30), (200, 170, 100), (60, 60, 60)]

Drawing = tuple[tuple[float, float, float, float], Callable[[Sprite], None]]


def car(rng, view: str, dark: bool, color=None) -> Drawing:
    color = color or CAR_COLORS[rng.integers(len(CAR_COLORS))]
    trim = _shade(color, 0.6)
    if view == "side":
        sign = 1 if rng.random() < 0.5 else -1

        def draw(s: Sprite):
            s.poly([(-2.2, 0.3), (2.2, 0.3), (2.2, 0.78), (1.9, 0.92), (-2.1, 0.95), (-2.2, 0.8)], color)
            s.poly([(-1.3 * sign, 0.9), (1.1 * sign, 0.9), (0.55 * sign, 1.42), (-0.85 * sign, 1.42)], color)
            s.poly(
                [(-1.15 * sign, 0.96), (-0.2 * sign, 0.96), (-0.2 * sign, 1.36), (-0.8 * sign, 1.36)], GLASS
            )
            s.poly(
                [(-0.08 * sign, 0.96), (0.95 * sign, 0.96), (0.5 * sign, 1.36), (-0.08 * sign, 1.36)], GLASS
            )
            s.rect(-2.2, 0.3, 2.2, 0.4, trim)
            for uc in (-1.4, 1.4):
                s.ellipse(uc, 0.33, 0.33, 0.33, TYRE)
                s.ellipse(uc, 0.33, 0.15, 0.15, HUB)
            s.rect(2.05 * sign, 0.62, 2.2 * sign, 0.75, HEAD, HEAD_LIT if dark else None)
            s.rect(-2.2 * sign, 0.62, -2.08 * sign, 0.78, TAIL, TAIL_LIT if dark else None)

        return (-2.25, 2.25, 0.0, 1.45), draw
    lamp, lamp_lit = (HEAD, HEAD_LIT) if view == "front" else (TAIL, TAIL_LIT)

    def draw(s: Sprite):
        for uc in (-0.72, 0.72):
            s.rect(uc - 0.14, 0.0, uc + 0.14, 0.35, TYRE)
        s.rect(-0.9, 0.22, 0.9, 0.86, color)
        s.poly([(-0.82, 0.86), (0.82, 0.86), (0.62, 1.45), (-0.62, 1.45)], color)
        s.poly([(-0.7, 0.92), (0.7, 0.92), (0.55, 1.37), (-0.55, 1.37)], GLASS)
        s.rect(-0.9, 0.22, 0.9, 0.36, trim)
        s.rect(-0.2, 0.4, 0.2, 0.52, (225, 225, 215) if view == "rear" else (35, 35, 38))
        for uc in (-0.75, 0.75):
            s.rect(uc - 0.13, 0.62, uc + 0.13, 0.76, lamp, lamp_lit if dark else None)

    return (-0.92, 0.92, 0.0, 1.47), draw


def truck(rng, view: str, dark: bool) -> Drawing:
    color = TRUCK_COLORS[rng.integers(len(TRUCK_COLORS))]
    if rng.random() < 0.35 and view == "rear":  # pickup truck, seen from behind
        body = CAR_COLORS[rng.integers(len(CAR_COLORS))]

        def draw_pickup(s: Sprite):
            for uc in (-0.78, 0.78):
                s.rect(uc - 0.16, 0.0, uc + 0.16, 0.42, TYRE)
            s.rect(-1.0, 0.3, 1.0, 1.1, body)
            s.rect(-1.0, 1.0, 1.0, 1.1, _shade(body, 0.7))
            s.poly([(-0.85, 1.1), (0.85, 1.1), (0.7, 1.85), (-0.7, 1.85)], body)
            s.poly([(-0.6, 1.4), (0.6, 1.4), (0.5, 1.78), (-0.5, 1.78)], GLASS)
            for uc in (-0.92, 0.92):
                s.rect(uc - 0.08, 0.6, uc + 0.08, 0.9, TAIL, TAIL_LIT if dark else None)

        return (-1.02, 1.02, 0.0, 1.87), draw_pickup
    if view == "front":  # cab of a box truck or tractor unit, coming towards us

        def draw_front(s: Sprite):
            for uc in (-0.95, 0.95):
                s.rect(uc - 0.2, 0.0, uc + 0.2, 0.55, TYRE)
            s.rect(-1.2, 0.45, 1.2, 2.95, color)
            s.rect(-1.05, 1.75, 1.05, 2.7, GLASS)
            s.rect(-0.65, 0.7, 0.65, 1.45, (45, 45, 48))
            s.rect(-1.2, 0.45, 1.2, 0.65, (40, 40, 42))
            for uc in (-0.95, 0.95):
                s.rect(uc - 0.17, 0.8, uc + 0.17, 1.0, HEAD, HEAD_LIT if dark else None)

        return (-1.22, 1.22, 0.0, 2.97), draw_front
    if view == "side":

        def draw_side(s: Sprite):
            s.rect(-4.5, 0.45, 3.0, 0.8, (40, 40, 42))
            s.rect(-4.5, 0.8, 1.6, 3.6, color)
            s.poly([(1.8, 0.6), (3.4, 0.6), (3.4, 2.1), (3.0, 2.9), (1.8, 2.9)], _shade(color, 0.85))
            s.poly([(2.4, 1.9), (3.15, 1.9), (2.9, 2.6), (2.4, 2.6)], GLASS)
            for uc in (-3.4, -2.3, 2.4):
                s.ellipse(uc, 0.5, 0.5, 0.5, TYRE)
                s.ellipse(uc, 0.5, 0.22, 0.22, HUB)

        return (-4.55, 3.45, 0.0, 3.62), draw_side

    def draw(s: Sprite):
        for uc in (-0.95, -0.55, 0.55, 0.95):
            s.rect(uc - 0.18, 0.0, uc + 0.18, 0.55, TYRE)
        s.rect(-1.25, 0.45, 1.25, 0.85, (40, 40, 42))
        s.rect(-1.25, 0.85, 1.25, 3.6, color)
        s.line([(0.0, 0.9), (0.0, 3.5)], 0.04, _shade(color, 0.55))
        s.rect(-1.2, 0.55, -0.95, 0.75, TAIL, TAIL_LIT if dark else None)
        s.rect(0.95, 0.55, 1.2, 0.75, TAIL, TAIL_LIT if dark else None)

    return (-1.27, 1.27, 0.0, 3.62), draw


def bus(rng, view: str, dark: bool) -> Drawing:
    color = BUS_COLORS[rng.integers(len(BUS_COLORS))]
    window_lit = (255, 235, 170) if dark else None
    if view == "front":

        def draw_front(s: Sprite):
            for uc in (-0.95, 0.95):
                s.rect(uc - 0.2, 0.0, uc + 0.2, 0.5, TYRE)
            s.rect(-1.27, 0.35, 1.27, 3.15, color)
            s.rect(-1.15, 1.25, 1.15, 2.75, GLASS)
            s.rect(-0.9, 2.82, 0.9, 3.08, (30, 30, 30), (255, 160, 40) if dark else None)
            for uc in (-1.0, 1.0):
                s.rect(uc - 0.18, 0.6, uc + 0.18, 0.8, HEAD, HEAD_LIT if dark else None)

        return (-1.3, 1.3, 0.0, 3.17), draw_front
    if view == "side":

        def draw_side(s: Sprite):
            s.rect(-6.0, 0.35, 6.0, 3.1, color)
            for k in range(8):
                u = -5.6 + k * 1.42
                s.rect(u, 1.45, u + 1.2, 2.55, GLASS, window_lit)
            s.rect(3.9, 0.45, 4.9, 2.6, _shade(color, 0.6))
            s.rect(-6.0, 0.35, 6.0, 0.5, _shade(color, 0.5))
            for uc in (-3.8, 3.0):
                s.ellipse(uc, 0.5, 0.5, 0.5, TYRE)
                s.ellipse(uc, 0.5, 0.22, 0.22, HUB)

        return (-6.05, 6.05, 0.0, 3.12), draw_side

    def draw(s: Sprite):
        for uc in (-0.95, 0.95):
            s.rect(uc - 0.2, 0.0, uc + 0.2, 0.5, TYRE)
        s.rect(-1.27, 0.35, 1.27, 3.15, color)
        s.rect(-1.1, 1.9, 1.1, 2.9, GLASS, window_lit)
        s.rect(-0.7, 2.95, 0.7, 3.1, (30, 30, 30), (255, 160, 40) if dark else None)
        s.rect(-1.27, 0.35, 1.27, 0.55, _shade(color, 0.5))
        for uc in (-1.1, 1.1):
            s.rect(uc - 0.12, 0.7, uc + 0.12, 1.1, TAIL, TAIL_LIT if dark else None)

    return (-1.3, 1.3, 0.0, 3.17), draw


def train(rng, dark: bool) -> Drawing:
    color = [(200, 200, 205), (180, 40, 40), (40, 70, 140)][rng.integers(3)]
    n_cars = int(rng.integers(2, 4))
    half = n_cars * 10.0

    def draw(s: Sprite):
        for k in range(n_cars):
            u0 = -half + k * 20.0 + 0.3
            s.rect(u0, 0.9, u0 + 19.4, 3.9, color)
            s.rect(u0, 1.1, u0 + 19.4, 1.35, (240, 200, 40))
            for w in range(9):
                s.rect(
                    u0 + 1.0 + w * 2.0, 2.2, u0 + 2.3 + w * 2.0, 3.2, GLASS, (255, 230, 160) if dark else None
                )
            for uc in (u0 + 3.0, u0 + 16.4):
                s.rect(uc - 1.2, 0.3, uc + 1.2, 0.9, (35, 35, 35))
        s.rect(-half, 0.3, half, 0.45, (60, 60, 60))

    return (-half - 0.05, half + 0.05, 0.3, 3.92), draw


def person(rng, height: float, walking: bool) -> Drawing:
    shirt, pants = SHIRTS[rng.integers(len(SHIRTS))], PANTS[rng.integers(len(PANTS))]
    skin, hair = SKINS[rng.integers(len(SKINS))], HAIRS[rng.integers(len(HAIRS))]
    h = height

    def draw(s: Sprite):
        hip, shoulder = 0.5 * h, 0.81 * h
        if walking:
            s.poly([(-0.05 * h, hip), (0.04 * h, hip), (0.15 * h, 0.0), (0.08 * h, 0.0)], pants)
            s.poly([(-0.04 * h, hip), (0.05 * h, hip), (-0.08 * h, 0.0), (-0.15 * h, 0.0)], pants)
        else:
            s.rect(-0.09 * h, 0.0, -0.01 * h, hip, pants)
            s.rect(0.01 * h, 0.0, 0.09 * h, hip, pants)
        s.poly(
            [
                (-0.1 * h, hip - 0.03 * h),
                (0.1 * h, hip - 0.03 * h),
                (0.13 * h, shoulder),
                (-0.13 * h, shoulder),
            ],
            shirt,
        )
        s.rect(-0.16 * h, 0.47 * h, -0.12 * h, shoulder - 0.01 * h, shirt)
        s.rect(0.12 * h, 0.47 * h, 0.16 * h, shoulder - 0.01 * h, shirt)
        s.rect(-0.03 * h, shoulder, 0.03 * h, 0.86 * h, skin)
        s.ellipse(0.0, 0.925 * h, 0.055 * h, 0.07 * h, skin)
        s.poly([(-0.055 * h, 0.93 * h), (0.055 * h, 0.93 * h), (0.04 * h, h), (-0.04 * h, h)], hair)

    return (-0.17 * h, 0.17 * h, 0.0, h), draw


def two_wheeler(rng, kind: str, view: str, dark: bool) -> Drawing:
    """A bicycle or motorcycle; the rider (if any) is a separate object drawn just after it."""
    color = (CAR_COLORS if kind == "motorcycle" else SHIRTS)[rng.integers(7)]
    if view == "rear":
        wheel_h, half = (0.62, 0.32) if kind == "motorcycle" else (0.68, 0.28)

        def draw_rear(s: Sprite):
            s.rect(-0.06, 0.0, 0.06, wheel_h, TYRE)
            if kind == "motorcycle":
                s.rect(-0.26, 0.45, 0.26, 0.92, color)
                s.rect(-0.1, 0.75, 0.1, 0.85, TAIL, TAIL_LIT if dark else None)
            s.line([(-half, 1.02), (half, 1.02)], 0.05, (40, 40, 40))
            s.rect(-0.1, 0.92, 0.1, 1.0, (30, 30, 30))

        return (-half - 0.03, half + 0.03, 0.0, 1.05), draw_rear
    r, hub = (0.32, 0.72) if kind == "motorcycle" else (0.34, 0.52)

    def draw(s: Sprite):
        if kind == "motorcycle":
            for uc in (-hub, hub):
                s.ellipse(uc, r, r, r, TYRE)
                s.ellipse(uc, r, 0.12, 0.12, HUB)
            s.poly([(-0.6, 0.42), (0.5, 0.42), (0.72, 0.82), (0.2, 0.95), (-0.4, 0.85), (-0.78, 0.68)], color)
            s.poly([(-0.55, 0.85), (0.05, 0.9), (0.0, 0.98), (-0.6, 0.92)], (25, 25, 25))
            s.line([(0.55, 0.9), (0.7, 1.1)], 0.05, (40, 40, 40))
            s.rect(0.72, 0.78, 0.8, 0.9, HEAD, HEAD_LIT if dark else None)
        else:
            for uc in (-hub, hub):
                s.ellipse(uc, r, r, r, TYRE, ring_m=0.05)
            frame = [(-hub, r), (-0.15, 0.92), (0.38, 0.95), (hub, r), (0.38, 0.95), (0.0, 0.32), (-hub, r)]
            s.line(frame, 0.045, color)
            s.line([(-0.15, 0.92), (0.0, 0.32)], 0.045, color)
            s.line([(-0.25, 0.95), (-0.05, 0.95)], 0.06, (25, 25, 25))
            s.line([(0.38, 0.95), (0.42, 1.05), (0.5, 1.05)], 0.04, (40, 40, 40))

    return (-hub - r - 0.03, hub + r + 0.03, 0.0, 1.12), draw


def rider(rng, kind: str, view: str) -> Drawing:
    shirt, pants = SHIRTS[rng.integers(len(SHIRTS))], PANTS[rng.integers(len(PANTS))]
    skin = SKINS[rng.integers(len(SKINS))]
    helmet = [(240, 240, 240), (30, 30, 30), (200, 40, 40)][rng.integers(3)]
    head = helmet if kind == "motorcycle" or rng.random() < 0.5 else HAIRS[rng.integers(len(HAIRS))]
    if view == "rear":

        def draw_rear(s: Sprite):
            s.rect(-0.24, 0.45, -0.1, 0.92, pants)
            s.rect(0.1, 0.45, 0.24, 0.92, pants)
            s.poly([(-0.2, 0.9), (0.2, 0.9), (0.23, 1.45), (-0.23, 1.45)], shirt)
            s.line([(-0.2, 1.4), (-0.34, 1.04)], 0.09, shirt)
            s.line([(0.2, 1.4), (0.34, 1.04)], 0.09, shirt)
            s.ellipse(0.0, 1.58, 0.12, 0.14, head)

        return (-0.4, 0.4, 0.42, 1.74), draw_rear
    seat, bar = ((-0.25, 0.95), (0.62, 1.1)) if kind == "motorcycle" else ((-0.15, 0.95), (0.45, 1.05))
    lean = 0.05 if kind == "motorcycle" else 0.2

    def draw(s: Sprite):
        foot = (0.25, 0.42) if kind == "motorcycle" else (0.02, 0.3)
        s.line([seat, (seat[0] + 0.32, 0.78), foot], 0.13, pants)
        shoulder = (seat[0] + lean, 1.5)
        s.poly(
            [
                (seat[0] - 0.12, seat[1]),
                (seat[0] + 0.12, seat[1]),
                (shoulder[0] + 0.12, 1.5),
                (shoulder[0] - 0.12, 1.5),
            ],
            shirt,
        )
        s.line([shoulder, bar], 0.09, shirt)
        s.ellipse(shoulder[0] + 0.05, 1.64, 0.12, 0.13, head)
        s.rect(shoulder[0] - 0.02, 1.48, shoulder[0] + 0.08, 1.53, skin)

    return (-0.45, 0.72, 0.25, 1.8), draw


def other_vehicle(rng, dark: bool) -> Drawing:
    """A tractor / construction vehicle (det_20 'other vehicle')."""
    color = [(235, 175, 20), (220, 90, 20), (60, 130, 60)][rng.integers(3)]

    def draw(s: Sprite):
        s.rect(-1.6, 0.55, 1.2, 1.5, color)
        s.poly([(-1.4, 1.5), (0.3, 1.5), (0.3, 2.7), (-1.4, 2.7)], _shade(color, 0.8))
        s.rect(-1.25, 1.65, 0.15, 2.5, GLASS, (255, 230, 160) if dark else None)
        s.ellipse(-1.0, 0.8, 0.8, 0.8, TYRE)
        s.ellipse(-1.0, 0.8, 0.35, 0.35, color)
        s.ellipse(1.0, 0.5, 0.5, 0.5, TYRE)

    return (-1.85, 1.55, 0.0, 2.72), draw


def trailer(rng, dark: bool) -> Drawing:
    color = [(230, 230, 225), (150, 150, 150), (170, 120, 70)][rng.integers(3)]

    def draw(s: Sprite):
        s.rect(-1.8, 0.55, 1.5, 2.2, color)
        s.rect(-1.8, 0.55, 1.5, 0.7, _shade(color, 0.5))
        s.line([(1.5, 0.6), (2.3, 0.5)], 0.08, (50, 50, 50))
        s.ellipse(-0.2, 0.36, 0.36, 0.36, TYRE)
        s.ellipse(-0.2, 0.36, 0.15, 0.15, HUB)
        s.rect(-1.8, 1.0, -1.7, 1.15, TAIL, TAIL_LIT if dark else None)

    return (-1.85, 2.35, 0.0, 2.22), draw


LAMP_COLORS = {
    "R": ((90, 20, 15), (255, 45, 30)),
    "Y": ((95, 75, 10), (255, 190, 30)),
    "G": ((15, 80, 45), (60, 255, 140)),
}


def traffic_light(rng, code: str, mount: float) -> Drawing:
    """Three-lamp head at ``mount`` m; the lamp named by ``code`` is lit; 'NA' shows the back of the head."""
    housing = (28, 28, 28) if rng.random() < 0.7 else (200, 165, 20)

    def draw(s: Sprite):
        s.rect(-0.2, mount, 0.2, mount + 1.0, housing)
        if code == "NA":
            s.rect(-0.12, mount + 0.1, 0.12, mount + 0.9, _shade(housing, 1.5))
            return
        for lamp, v in (("R", 0.8), ("Y", 0.5), ("G", 0.2)):
            dim, lit = LAMP_COLORS[lamp]
            if lamp == code:
                s.ellipse(0.0, mount + v, 0.13, 0.13, lit, lit)
            else:
                s.ellipse(0.0, mount + v, 0.12, 0.12, dim)

    return (-0.22, 0.22, mount - 0.02, mount + 1.02), draw


def traffic_sign(rng, mount: float, kind: str | None = None) -> Drawing:
    kind = kind or ["stop", "round", "warning", "blue", "diamond"][rng.integers(5)]
    if kind == "highway":
        w, h = float(rng.uniform(2.5, 4.0)), float(rng.uniform(1.2, 1.8))

        def draw_big(s: Sprite):
            s.rect(-w / 2, mount, w / 2, mount + h, (20, 110, 60))
            s.rect(-w / 2 + 0.1, mount + 0.1, w / 2 - 0.1, mount + h - 0.1, (20, 110, 60))
            for k in range(2):
                v = mount + h * (0.3 + 0.35 * k)
                s.rect(-w / 2 + 0.3, v, w / 2 - 0.5 - 0.3 * k, v + 0.12, (235, 235, 235))

        return (-w / 2 - 0.02, w / 2 + 0.02, mount - 0.02, mount + h + 0.02), draw_big
    r = 0.38

    def draw(s: Sprite):
        c = mount + r
        if kind == "stop":
            pts = [
                (r * math.cos(a), c + r * math.sin(a))
                for a in np.linspace(math.pi / 8, 2 * math.pi + math.pi / 8, 9)[:-1]
            ]
            s.poly(pts, (235, 235, 235))
            s.poly([(0.85 * u, c + 0.85 * (v - c)) for u, v in pts], (200, 25, 30))
            s.rect(-0.22, c - 0.05, 0.22, c + 0.05, (235, 235, 235))
        elif kind == "round":
            s.ellipse(0.0, c, r, r, (200, 25, 30))
            s.ellipse(0.0, c, 0.75 * r, 0.75 * r, (240, 240, 240))
            s.rect(-0.12, c - 0.1, 0.12, c + 0.1, (20, 20, 20))
        elif kind == "warning":
            s.poly([(-r, mount), (r, mount), (0.0, mount + 2 * r)], (200, 25, 30))
            s.poly(
                [(-0.65 * r, mount + 0.12), (0.65 * r, mount + 0.12), (0.0, mount + 1.5 * r)], (240, 240, 240)
            )
        elif kind == "blue":
            s.rect(-r, mount, r, mount + 2 * r, (25, 70, 170))
            s.rect(-0.1, mount + 0.2, 0.1, mount + 1.6 * r, (240, 240, 240))
        else:
            s.poly([(0.0, mount), (r, c), (0.0, mount + 2 * r), (-r, c)], (240, 200, 20))
            s.poly(
                [(0.0, mount + 0.15), (0.7 * r, c), (0.0, mount + 2 * r - 0.15), (-0.7 * r, c)], (20, 20, 20)
            )
            s.poly(
                [(0.0, mount + 0.22), (0.6 * r, c), (0.0, mount + 2 * r - 0.22), (-0.6 * r, c)],
                (240, 200, 20),
            )

    return (-r - 0.02, r + 0.02, mount - 0.02, mount + 2 * r + 0.02), draw


def pole(height: float, arm: float = 0.0, lamp: bool = False, dark: bool = False) -> Drawing:
    """A pole (trainId pole), with an optional mast arm reaching ``arm`` m sideways and a street lamp head."""
    gray = (120, 122, 125)

    def draw(s: Sprite):
        s.rect(-0.09, 0.0, 0.09, height, gray)
        if arm:
            s.poly([(0.0, height - 0.25), (arm, height - 0.1), (arm, height), (0.0, height)], gray)
        if lamp:
            s.rect(
                arm - 0.35 if arm else -0.35, height - 0.2, (arm or 0.0) + 0.35, height + 0.05, (90, 90, 90)
            )
            s.rect(
                arm - 0.3 if arm else -0.3,
                height - 0.22,
                (arm or 0.0) + 0.3,
                height - 0.12,
                (200, 200, 190),
                (255, 225, 150) if dark else None,
            )

    lo, hi = min(0.0, arm) - 0.4, max(0.0, arm) + 0.4
    return (lo, hi, 0.0, height + 0.1), draw


def tree(rng, height: float) -> Drawing:
    green = [(55, 95, 35), (70, 110, 40), (45, 80, 40)][rng.integers(3)]
    crown = height * 0.32

    def draw(s: Sprite):
        s.rect(-0.15, 0.0, 0.15, height * 0.55, (85, 65, 45))
        s.ellipse(0.0, height - crown, crown, crown, green)
        s.ellipse(-crown * 0.45, height - crown * 1.3, crown * 0.6, crown * 0.55, _shade(green, 1.15))

    return (-crown - 0.05, crown + 0.05, 0.0, height + 0.05), draw


def pump(rng) -> Drawing:
    def draw(s: Sprite):
        s.rect(-0.45, 0.0, 0.45, 1.7, (220, 220, 220))
        s.rect(-0.35, 1.1, 0.35, 1.5, (40, 40, 40))
        s.rect(-0.45, 1.55, 0.45, 1.7, (200, 30, 30))

    return (-0.47, 0.47, 0.0, 1.72), draw
