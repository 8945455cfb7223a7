"""ai/common/data.py: SDXL buckets, crops with true micro-conditioning, the bucket sampler, table loading."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
from PIL import Image
from sdxl_fixtures import make_image_csv, write_image

from ai.common import data
from core.cli import UserError

# The SDXL paper's 41 training buckets (width, height), written out independently of the generator.
SDXL_PAPER_BUCKETS = {
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024),
}  # fmt: skip
SDXL_PAPER_BUCKETS |= {(h, w) for w, h in SDXL_PAPER_BUCKETS}


def test_buckets_are_the_sdxl_set_and_scale_down():
    assert set(data.sdxl_buckets(1024, 64)) == SDXL_PAPER_BUCKETS
    small = data.sdxl_buckets(128, 16)
    assert (128, 128) in small and all(w % 16 == 0 and h % 16 == 0 for w, h in small)
    assert all(0.9 * 128**2 <= w * h <= 128**2 for w, h in small)
    with pytest.raises(UserError, match="multiple of data.bucket_step"):
        data.sdxl_buckets(1000, 64)


def test_bdd_frame_goes_to_the_16_9_bucket_not_a_square():
    buckets = data.sdxl_buckets()
    assert data.nearest_bucket((1280, 720), buckets) == (1344, 768)
    assert data.nearest_bucket((720, 1280), buckets) == (768, 1344)
    assert data.nearest_bucket((1000, 1000), buckets) == (1024, 1024)


def test_center_crop_plan_and_micro_conditioning():
    plan = data.plan_crop((1280, 720), (1344, 768), "center", flip=False)
    assert plan.resized == (1365, 768)  # scaled by 768/720 to cover the bucket
    assert (plan.top, plan.left) == (0, 10)
    # original (h, w), crop top-left (top, left), target (h, w)
    assert plan.micro_conditioning() == (720, 1280, 0, 10, 768, 1344)


def test_flip_mirrors_pixels_and_the_crop_offset():
    img = Image.fromarray(np.arange(40 * 30 * 3, dtype=np.uint32).reshape(30, 40, 3).astype(np.uint8))
    plan = data.plan_crop((40, 30), (32, 32), "random", flip=False, rng=random.Random(1))
    flipped = data.CropPlan(plan.original, plan.resized, plan.bucket, plan.top, plan.left, True)
    a = np.asarray(data.apply_plan(img, plan, Image.Resampling.NEAREST))
    b = np.asarray(data.apply_plan(img, flipped, Image.Resampling.NEAREST))
    assert a.shape == (32, 32, 3)
    np.testing.assert_array_equal(a[:, ::-1], b)
    top, left = flipped.crop_top_left()
    assert top == plan.top and left == plan.resized[0] - plan.left - 32


def test_random_crop_stays_inside_and_varies():
    plans = {
        data.plan_crop((300, 100), (128, 128), "random", False, random.Random(s)).left for s in range(20)
    }
    assert len(plans) > 3 and all(0 <= left <= 384 - 128 for left in plans)


def test_label_map_geometry_matches_image_with_nearest_neighbour():
    """The same plan on image and label map; nearest-neighbour never invents class ids."""
    ids = np.zeros((90, 160), dtype=np.uint8)
    ids[:, 80:] = 7
    ids[40:, :] = 255  # ignore
    label = Image.fromarray(ids)
    plan = data.plan_crop((160, 90), (160, 96), "center", flip=True)
    out = np.asarray(data.apply_plan(label, plan, Image.Resampling.NEAREST))
    assert out.shape == (96, 160)
    assert set(np.unique(out)) <= {0, 7, 255}
    rgb = Image.fromarray(np.stack([ids] * 3, -1))
    out_rgb = np.asarray(data.apply_plan(rgb, plan, Image.Resampling.NEAREST))[..., 0]
    np.testing.assert_array_equal(out, out_rgb)
    assert out[0, 0] == 7  # flipped: the right half (class 7) is now on the left


def test_sampler_is_deterministic_resumable_and_sharded():
    buckets = [(128, 128)] * 7 + [(160, 96)] * 5
    s = data.BucketBatchSampler(buckets, batch_size=2, seed=3)
    e0, e1 = s.batches(0), s.batches(1)
    assert e0 == data.BucketBatchSampler(buckets, batch_size=2, seed=3).batches(0)
    assert e0 != e1
    assert sorted(p for b in e0 for p in b) == list(range(12))
    assert all(len({buckets[p] for p in b}) == 1 for b in e0)  # one bucket per batch
    s.set_position(1, 2)
    assert [[p for p, _ in b] for b in s] == e1[2:]
    assert [[p for p, _ in b] for b in s] == e1  # the skip applies to the first pass after a resume only
    assert {ep for b in s for _, ep in b} == {1}
    r0 = data.BucketBatchSampler(buckets, 2, seed=3, num_replicas=2, rank=0).batches(0)
    r1 = data.BucketBatchSampler(buckets, 2, seed=3, num_replicas=2, rank=1).batches(0)
    assert len(r0) == len(r1) and not {p for b in r0 for p in b} & {p for b in r1 for p in b}


def test_dataset_item_has_crop_and_micro_conditioning(tmp_path):
    csv = make_image_csv(tmp_path, n=3)
    rows = data.load_rows(csv).rows
    geo = data.Geometry(tuple(data.sdxl_buckets(128, 16)), "center", False, seed=0)
    ds = data.SDXLDataset(rows, geo)
    item = ds[(0, 0)]
    assert item["pixel_values"].shape == (3, 96, 160)  # 320x180 -> 160x96 bucket, CHW
    assert item["pixel_values"].min() >= -1.0 and item["pixel_values"].max() <= 1.0
    assert item["time_ids"].tolist() == [180, 320, 0, 5, 96, 160]  # resized to 171x96, 11 spare px: left 5
    assert item["text"] == "a city street at night"
    batch = data.collate([ds[(0, 0)], ds[(0, 0)]])
    assert batch["pixel_values"].shape == (2, 3, 96, 160) and batch["text"] == ["a city street at night"] * 2


def test_load_rows_relative_paths_and_bad_images(tmp_path):
    csv = make_image_csv(tmp_path, n=4)
    (tmp_path / "img01.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match=r"row 1: cannot read image .*img01.jpg.*data.on_bad_image=skip"):
        data.load_rows(csv)
    report = data.load_rows(csv, on_bad_image="skip")
    assert [r.index for r in report.rows] == [0, 2, 3]
    assert [p.endswith("img01.jpg") for p, _ in report.skipped] == [True]
    assert report.rows[0].size == (320, 180)


def test_csv_columns_are_checked_and_read_as_text(tmp_path):
    write_image(tmp_path / "a.jpg", (64, 64), 0)
    (tmp_path / "t.csv").write_text("image,text\na.jpg,123\n")
    assert data.load_rows(tmp_path / "t.csv").rows[0].text == "123"
    with pytest.raises(UserError, match=r"missing column\(s\) caption; the header has image, text"):
        data.load_rows(tmp_path / "t.csv", caption_column="caption")
    with pytest.raises(UserError, match="training CSV not found"):
        data.load_rows(tmp_path / "none.csv")


def test_hf_dataset_folder_with_image_feature(tmp_path):
    import datasets

    csv = make_image_csv(tmp_path / "imgs", n=3, relative=False)
    table = datasets.load_dataset("csv", data_files=str(csv), split="train")
    table = table.cast_column("image", datasets.Image())
    table.save_to_disk(str(tmp_path / "ds"))
    rows = data.load_rows(dataset=str(tmp_path / "ds")).rows
    assert len(rows) == 3 and isinstance(rows[0].image, bytes)
    assert rows[1].size == (180, 320) and rows[1].text == "a highway in the rain"
    assert data.open_image(rows[0].image).size == (320, 180)


def test_holdout_is_deterministic(tmp_path):
    rows = data.load_rows(make_image_csv(tmp_path, n=6)).rows
    train, held = data.holdout_split(rows, 2, seed=0)
    assert len(train) == 4 and len(held) == 2 and data.holdout_split(rows, 2, seed=0)[1] == held
    with pytest.raises(UserError, match="leaves no training rows"):
        data.holdout_split(rows, 6, seed=0)


# --- EXIF orientation: photos used upright, sizes from headers agree ------------------------------------------


def write_sideways_jpeg(path, orientation: int):
    """An upright 96x160 portrait scene stored turned by 90 degrees with the EXIF tag that undoes it (as phones do).

    Returns the upright original as an array. Orientation 6: the viewer turns the stored pixels 90 degrees
    clockwise; 8: counter-clockwise.
    """
    from PIL import ExifTags

    y, x = np.mgrid[0:160, 0:96]
    upright = np.stack([x * 255 / 96, y * 255 / 160, np.where(y < 40, 230, 20)], -1).astype(np.uint8)
    stored = np.rot90(upright, k=1 if orientation == 6 else -1)  # the inverse of the viewer's turn
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    Image.fromarray(np.ascontiguousarray(stored)).save(path, quality=95, exif=exif)
    return upright


@pytest.mark.parametrize("orientation", [6, 8])
def test_exif_rotated_photo_loads_upright_with_swapped_size(tmp_path, orientation):
    from PIL import ImageOps

    path = tmp_path / "phone.jpg"
    upright = write_sideways_jpeg(path, orientation)
    with Image.open(path) as raw:
        assert raw.size == (160, 96)  # stored landscape
        stored = np.asarray(raw.convert("RGB"))
    assert data._image_size(str(path)) == (96, 160)
    assert data._image_size(path.read_bytes()) == (96, 160)
    img = data.open_image(str(path))
    assert img.size == (96, 160) and img.mode == "RGB"
    pixels = np.asarray(img)
    # exactly the decoded stored pixels turned the way the tag says, and what PIL's exif_transpose gives
    assert np.array_equal(pixels, np.rot90(stored, k=-1 if orientation == 6 else 1))
    with Image.open(path) as raw:
        assert np.array_equal(pixels, np.asarray(ImageOps.exif_transpose(raw).convert("RGB")))
    # and the upright scene itself (JPEG loss aside): the bright band is at the top
    assert np.abs(pixels.astype(int) - upright.astype(int)).mean() < 3
    assert pixels[:40, :, 2].mean() > 200 and pixels[40:, :, 2].mean() < 50
    # label maps and other conditioning images are used as stored
    assert data._image_size(str(path), upright=False) == (160, 96)
    assert np.array_equal(np.asarray(data.open_image(str(path), upright=False)), stored)


def test_exif_rotated_photo_buckets_and_trains_upright(tmp_path):
    path = tmp_path / "phone.jpg"
    write_sideways_jpeg(path, 6)
    (tmp_path / "t.csv").write_text("image,text\nphone.jpg,a street\n")
    rows = data.load_rows(tmp_path / "t.csv").rows
    assert rows[0].size == (96, 160)
    geo = data.Geometry(tuple(data.sdxl_buckets(128, 16)), "center", False, seed=0)
    bucket = geo.bucket_of(rows[0])
    assert bucket == data.nearest_bucket((96, 160), geo.buckets) and bucket[0] < bucket[1]  # portrait
    assert bucket != data.nearest_bucket((160, 96), geo.buckets)
    item = data.SDXLDataset(rows, geo)[(0, 0)]
    assert item["pixel_values"].shape == (3, bucket[1], bucket[0])
    assert item["time_ids"].tolist()[:2] == [160, 96]  # original (h, w) of the upright photo
    blue = item["pixel_values"][2]  # the bright band stays at the top of the crop
    assert blue[:10].mean() > 0.5 and blue[-10:].mean() < -0.5


def test_image_size_reads_headers_only(tmp_path):
    """A file whose pixel data is cut off still has its (upright) size read; decoding it fails."""
    jpeg = tmp_path / "phone.jpg"
    write_sideways_jpeg(jpeg, 6)
    cut = jpeg.read_bytes()[: len(jpeg.read_bytes()) // 2]
    assert data._image_size(cut) == (96, 160)
    png = io.BytesIO()
    Image.new("RGB", (64, 32), (10, 20, 30)).save(png, format="PNG")
    cut_png = png.getvalue()[:-40]  # drop the end of IDAT and IEND
    assert data._image_size(cut_png) == (64, 32)
    for src in (cut, cut_png):
        with pytest.raises(OSError):
            data.open_image(src)
