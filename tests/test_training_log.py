"""ai/common/training_log.py: validation images through accelerate's real TensorBoard tracker, read back."""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
from PIL import Image

from ai.common import training_log


def test_validation_images_of_different_sizes_all_reach_tensorboard(tmp_path):
    """Validation sheets from mixed buckets have different sizes (stacking them crashed the run at its first
    validation); each must be written, with its own size and pixels, at every step."""
    from accelerate.tracking import TensorBoardTracker
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rng = np.random.default_rng(0)
    shapes = [(16, 32), (24, 16), (16, 32)]  # (height, width): a wide sheet, a tall one, another wide one
    tracker = TensorBoardTracker("run", tmp_path)
    tracker.start()
    sent = {}
    for step in (0, 5):
        arrays = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
        images = [Image.fromarray(a) for a in arrays]
        training_log.log_images(SimpleNamespace(trackers=[tracker]), images, ["a", "b", "c"], step)
        sent[step] = arrays
    tracker.finish()

    events = EventAccumulator(str(tmp_path / "run"), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["validation/00", "validation/01", "validation/02"]
    for i in range(len(shapes)):
        logged = events.Images(f"validation/{i:02d}")
        assert [e.step for e in logged] == [0, 5]
        for event in logged:
            got = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
            np.testing.assert_array_equal(got, sent[event.step][i])  # PNG: every pixel, at its own size
    assert "validation/prompts/text_summary" in events.Tags()["tensors"]
