"""Shared test helpers for the SDXL training tests: the tiny model (built once per session) and small image sets.

Import the fixture into a test module with ``from sdxl_fixtures import tiny_sdxl  # noqa: F401``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CAPTIONS = ("a city street at night", "a highway in the rain", "a residential road, clear day")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One CPU thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): on a
    shared 2-core machine OpenMP threads that wait on each other cost 10x in the inference tests."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """The tiny SDXL folder (ai.common.models preset 'tiny'); a complete folder is reused, not rebuilt."""
    from ai.common.build_model import build_model_folder

    return build_model_folder("tiny", tmp_path_factory.getbasetemp() / "tiny-sdxl")


def write_image(path: Path, size: tuple[int, int], seed: int) -> Path:
    """A smooth gradient JPEG (compresses like a photo, differs per seed)."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    a, b, c = rng.uniform(0.3, 1.0, 3)
    arr = np.stack([x * 255 * a / w, y * 255 * b / h, (x + y) * 127 * c / (w + h) + 40 * (seed % 3)], -1)
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def make_image_csv(
    folder: Path,
    n: int = 8,
    sizes=((320, 180), (180, 320), (256, 256)),
    captions=CAPTIONS,
    name: str = "train.csv",
    relative: bool = True,
) -> Path:
    """``n`` JPEGs plus a CSV with image,text columns (paths relative to the CSV unless ``relative=False``)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        img = write_image(folder / f"img{i:02d}.jpg", sizes[i % len(sizes)], seed=i)
        rows.append((img.name if relative else str(img), captions[i % len(captions)]))
    path = folder / name
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "text"])
        writer.writerows(rows)
    return path


def pixels(path: Path) -> np.ndarray:
    """An image file as int16 RGB, so differences of two images do not wrap around."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def records(gen: Path) -> list[dict]:
    """The metadata records of a generations folder."""
    return [json.loads(line) for line in (gen / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]


def steer_outputs(controlnet, seed: int, scale: float = 0.3):
    """Random (seeded) output convolutions, so a fresh ControlNet's condition changes the image; returns it."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return controlnet
