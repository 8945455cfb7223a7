"""ai/common/generation.py and pipelines.py: prompts, work list, resume, metadata merging, checks, fingerprints.

The run loop is driven here by a small image-making function so that its bookkeeping (records, skips, errors,
merging) is checked in milliseconds; tests/test_lora_infer.py runs it with the real pipeline.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pytest

from ai.common import pipelines
from ai.common.generation import (
    METADATA_FILE,
    SCHEDULERS,
    GenerationConfig,
    PromptEntry,
    build_work_items,
    merge_metadata,
    pending_work,
    read_metadata_records,
    read_prompts,
    run_generation,
)
from ai.common.pipelines import check_resolution, make_scheduler, model_fingerprint
from core.cli import UserError
from core.config import load_config
from core.io import sha256_file


def make_config(tmp_path, *overrides: str) -> GenerationConfig:
    return load_config(GenerationConfig, None, list(overrides))


# --- prompts and work list ------------------------------------------------------------------------------------


def test_prompts_from_every_source_in_fixed_order(tmp_path):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("# comment\nfrom file one\n\n  from file two  \n", encoding="utf-8")
    csv_path = tmp_path / "train.csv"
    csv_path.write_text(
        '\ufeffimage,conditioning_image,text\nimgs/a.jpg,/masks/a.png,"rainy, night"\n/abs/b.jpg,,clear day\n',
        encoding="utf-8",
    )
    cfg = make_config(
        tmp_path,
        "prompt=single",
        "prompts=[listed]",
        f"prompts_file={prompts_file}",
        f"captions_csv={csv_path}",
    )
    entries = read_prompts(cfg)
    assert [e.text for e in entries] == [
        "single",
        "listed",
        "from file one",
        "from file two",
        "rainy, night",
        "clear day",
    ]
    assert entries[2].source == {"prompt_source": f"{prompts_file}:2"}
    assert entries[4].source == {
        "prompt_source": f"{csv_path}:2",
        "source_frame": str(tmp_path / "imgs/a.jpg"),  # relative paths are relative to the CSV's folder
        "mask_path": "/masks/a.png",
    }
    assert entries[5].source == {"prompt_source": f"{csv_path}:3", "source_frame": "/abs/b.jpg"}
    assert [e.text for e in read_prompts(cfg.model_copy(update={"max_prompts": 2}))] == ["single", "listed"]


def test_csv_errors_name_the_file_column_and_row(tmp_path):
    csv_path = tmp_path / "c.csv"
    csv_path.write_text("image,caption\na.jpg,x\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"c\.csv has no column 'text'; its columns are: image, caption"):
        read_prompts(make_config(tmp_path, f"captions_csv={csv_path}"))
    csv_path.write_text("image,text\na.jpg,ok\nb.jpg,\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"c\.csv line 3: empty 'text'; fix the row or set on_error=skip"):
        read_prompts(make_config(tmp_path, f"captions_csv={csv_path}"))
    skipped = read_prompts(make_config(tmp_path, f"captions_csv={csv_path}", "on_error=skip"))
    assert [e.text for e in skipped] == ["ok"]


def test_no_prompts_and_missing_files_are_errors(tmp_path):
    with pytest.raises(UserError, match="no prompts: set prompt, prompts"):
        read_prompts(make_config(tmp_path, "prompts=[]"))
    with pytest.raises(UserError, match=r"prompts\[1\] is empty"):
        read_prompts(make_config(tmp_path, "prompts=[a, '  ']"))
    with pytest.raises(UserError, match="prompts_file not found: .*nope.txt"):
        read_prompts(make_config(tmp_path, f"prompts_file={tmp_path / 'nope.txt'}"))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"caf\xe9\n")
    with pytest.raises(UserError, match="not UTF-8 text"):
        read_prompts(make_config(tmp_path, f"prompts_file={bad}"))


def test_work_items_names_and_seeds_depend_only_on_position():
    items = build_work_items([PromptEntry("a"), PromptEntry("b")], images_per_prompt=3, seed=10)
    assert [(it.file, it.seed) for it in items] == [
        ("00000_00.png", 10),
        ("00000_01.png", 11),
        ("00000_02.png", 12),
        ("00001_00.png", 13),
        ("00001_01.png", 14),
        ("00001_02.png", 15),
    ]
    assert [it.prompt for it in items] == ["a"] * 3 + ["b"] * 3


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "resolution.width=130",
            r"resolution\.width: Value error, must be a positive multiple of 8 .*got 130",
        ),
        ("resolution.height=0", r"resolution\.height: Value error, must be a positive multiple of 8"),
        ("schedular=euler", r"schedular: unknown key \(did you mean 'scheduler'\?\)"),
        ("scheduler=dpm", r"scheduler: Input should be 'default', 'euler'"),
        ("num_inference_steps=many", r"num_inference_steps: Input should be a valid integer"),
        ("device=gpu", r"device: Value error, use auto, cpu, cuda"),
        ("speed.attention=flash", r"speed\.attention: Input should be 'sdpa' or 'xformers'"),
    ],
)
def test_config_errors_name_key_and_value(tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        make_config(tmp_path, override)


# --- checks ---------------------------------------------------------------------------------------------------


def test_resolution_warning_scales_with_the_model():
    assert check_resolution(1280, 720, native=1024) is None
    assert check_resolution(1024, 1024, native=1024) is None
    assert "is 0.062x the pixel count" in check_resolution(256, 256, native=1024)
    assert check_resolution(3072, 3072, native=1024) is not None
    assert check_resolution(128, 128, native=128) is None  # the tiny model at its own size: no warning
    assert check_resolution(64, 64, native=128) is None
    assert check_resolution(1024, 1024, native=128) is not None


def test_every_scheduler_name_builds_from_the_model_scheduler():
    from diffusers import EulerDiscreteScheduler

    base = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1
    )
    for name, (cls_name, extra) in SCHEDULERS.items():
        scheduler = make_scheduler(name, base)
        assert type(scheduler).__name__ == (cls_name or "EulerDiscreteScheduler"), name
        assert scheduler.config.beta_schedule == "scaled_linear"
        for key, value in extra.items():
            assert scheduler.config[key] == value, (name, key)


def test_model_fingerprint_follows_config_and_unet_weights(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "model_index.json").write_text("{}")
    weights = tmp_path / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"weights-1")
    first = model_fingerprint(str(tmp_path))
    assert first == model_fingerprint(str(tmp_path)) and len(first) == 64
    weights.write_bytes(b"weights-2")
    second = model_fingerprint(str(tmp_path))
    assert second != first
    (tmp_path / "model_index.json").write_text('{"a": 1}')
    assert model_fingerprint(str(tmp_path)) not in (first, second)
    assert (
        model_fingerprint("stabilityai/stable-diffusion-xl-base-1.0")
        == "hub:stabilityai/stable-diffusion-xl-base-1.0"
    )


# --- outputs: metadata merging, resume, the run loop ----------------------------------------------------------


def test_merge_keeps_one_line_per_file_newest_wins_and_ignores_torn_lines(tmp_path):
    (tmp_path / METADATA_FILE).write_text(json.dumps({"file": "a.png", "v": 1}) + "\n", encoding="utf-8")
    (tmp_path / "metadata.part-00000.jsonl").write_text(
        json.dumps({"file": "a.png", "v": 2}) + "\n" + json.dumps({"file": "c.png", "v": 1}) + "\n"
    )
    (tmp_path / "metadata.part-00001.jsonl").write_text(
        json.dumps({"file": "b.png", "v": 1}) + '\n{"file": "d.pn'
    )
    records = merge_metadata(tmp_path)
    assert sorted(records) == ["a.png", "b.png", "c.png"]
    lines = (tmp_path / METADATA_FILE).read_text().splitlines()
    assert [json.loads(line)["file"] for line in lines] == ["a.png", "b.png", "c.png"]
    assert json.loads(lines[0])["v"] == 2
    assert not list(tmp_path.glob("metadata.part-*"))


def solid_images(batch, inputs):
    from PIL import Image

    return [Image.new("RGB", (8, 8), (item.seed % 256, 0, 0)) for item in batch]


def test_run_loop_records_skips_and_resumes(tmp_path):
    items = build_work_items([PromptEntry("a"), PromptEntry("b", {"source_frame": "/f/b.jpg"})], 2, seed=3)
    settings = {"num_inference_steps": 2}
    plan = pending_work(items, tmp_path, settings)
    assert len(plan.todo) == 4
    summary = run_generation(plan, solid_images, info={"config": "x.yaml"}, batch_size=3)
    assert (summary.generated, summary.skipped, summary.failed) == (4, 0, [])
    records = read_metadata_records(tmp_path / METADATA_FILE)
    assert [(r["file"], r["seed"], r["prompt"]) for r in records] == [
        ("00000_00.png", 3, "a"),
        ("00000_01.png", 4, "a"),
        ("00001_00.png", 5, "b"),
        ("00001_01.png", 6, "b"),
    ]
    assert records[2]["source_frame"] == "/f/b.jpg" and records[0]["source_frame"] is None
    assert records[0]["config"] == "x.yaml" and records[0]["num_inference_steps"] == 2
    from PIL import Image

    with Image.open(tmp_path / "00001_01.png") as im:
        assert im.getpixel((0, 0)) == (6, 0, 0) and im.text["prompt"] == "b" and im.text["seed"] == "6"

    assert pending_work(items, tmp_path, settings).todo == []
    (tmp_path / "00000_01.png").unlink()  # PNG gone: redo it
    lines = (tmp_path / METADATA_FILE).read_text().splitlines()  # record gone (PNG kept): redo it too
    (tmp_path / METADATA_FILE).write_text("\n".join(line for line in lines if "00001_00" not in line) + "\n")
    plan = pending_work(items, tmp_path, settings)
    assert [it.file for it in plan.todo] == ["00000_01.png", "00001_00.png"]
    assert run_generation(plan, solid_images).generated == 2
    assert len((tmp_path / METADATA_FILE).read_text().splitlines()) == 4


def test_changed_settings_refuse_then_overwrite(tmp_path):
    items = build_work_items([PromptEntry("a")], 2, seed=0)
    run_generation(pending_work(items, tmp_path, {"steps": 2}), solid_images)
    with pytest.raises(
        UserError,
        match=r"holds 2 image\(s\) made with other settings \(e\.g\. 00000_00\.png: steps: 2 -> 3\)",
    ):
        pending_work(items, tmp_path, {"steps": 3})
    plan = pending_work(items, tmp_path, {"steps": 3}, overwrite=True)
    assert len(plan.todo) == 2
    run_generation(plan, solid_images)
    assert [r["steps"] for r in read_metadata_records(tmp_path / METADATA_FILE)] == [3, 3]


def test_a_folder_begun_before_generate_at_bucket_resumes(tmp_path):
    """Records written before the generate_at_bucket setting existed were all made without it: a rerun with it
    off resumes them (it was refused image by image, and overwrite=true regenerated the whole folder); with it on
    they are other settings."""
    items = build_work_items([PromptEntry("a"), PromptEntry("b")], 1, seed=0)
    old = {"width": 1280, "height": 720}  # what the records held before the key existed
    run_generation(pending_work(items[:1], tmp_path, old), solid_images)
    now = {**old, "generate_at_bucket": False}
    plan = pending_work(items, tmp_path, now)
    assert [it.file for it in plan.todo] == ["00001_00.png"]  # only the new prompt's image
    with pytest.raises(UserError, match=r"00000_00\.png: generate_at_bucket: False -> True"):
        pending_work(items, tmp_path, {**old, "generate_at_bucket": True})


def test_unreadable_input_stops_or_is_skipped(tmp_path):
    items = build_work_items([PromptEntry("a"), PromptEntry("b"), PromptEntry("c")], 1, seed=0)

    def load_inputs(item):
        if item.prompt == "b":
            raise UserError("control image b.png is not an image")
        return item.prompt

    with pytest.raises(UserError, match="b.png is not an image"):
        run_generation(pending_work(items, tmp_path / "stop", {}), solid_images, load_inputs=load_inputs)
    summary = run_generation(
        pending_work(items, tmp_path / "skip", {}), solid_images, load_inputs=load_inputs, on_error="skip"
    )
    assert summary.generated == 2
    assert summary.failed == ["00001_00.png: control image b.png is not an image"]
    assert [r["file"] for r in read_metadata_records(tmp_path / "skip" / METADATA_FILE)] == [
        "00000_00.png",
        "00002_00.png",
    ]
    # the stopped run kept what it finished: its records are merged by the next run's plan
    assert [it.file for it in pending_work(items, tmp_path / "stop", {}).todo] == [
        "00001_00.png",
        "00002_00.png",
    ]


# --- cached file digests for model fingerprints -----------------------------------------------------------------


def make_model_folder(folder, weights: bytes = b"unet-weights-1"):
    """A model folder whose files were last written an hour ago (settled: their digests may be cached)."""
    (folder / "unet").mkdir(parents=True)
    config, unet = folder / "model_index.json", folder / "unet" / "diffusion_pytorch_model.safetensors"
    config.write_text('{"_class_name": "StableDiffusionXLPipeline"}')
    unet.write_bytes(weights)
    past = time.time() - 3600
    for path in (config, unet):
        os.utime(path, (past, past))
    return config, unet


def plain_fingerprint(*paths) -> str:
    """The fingerprint as it was defined before caching: sha256 over the files' sha256 lines."""
    lines = [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


@pytest.fixture
def counted_hashing(monkeypatch):
    """Records every file that model_fingerprint actually reads to hash."""
    read = []

    def counting_sha256_file(path, *args, **kwargs):
        read.append(Path(path).name)
        return sha256_file(path, *args, **kwargs)

    monkeypatch.setattr(pipelines, "sha256_file", counting_sha256_file)
    return read


def test_model_fingerprint_is_cached_by_path_size_and_mtime(tmp_path, monkeypatch, counted_hashing):
    config, unet = make_model_folder(tmp_path / "model")
    cache = tmp_path / "cache" / "hashes.json"
    first = model_fingerprint(str(tmp_path / "model"), hash_cache=cache)
    assert first == plain_fingerprint(config, unet)  # the same value as before caching: old metadata compares
    assert sorted(counted_hashing) == ["diffusion_pytorch_model.safetensors", "model_index.json"]
    entries = json.loads(cache.read_text())
    assert entries[str(unet.resolve())]["size"] == len(b"unet-weights-1")
    assert entries[str(unet.resolve())]["mtime_ns"] == unet.stat().st_mtime_ns

    counted_hashing.clear()
    assert model_fingerprint(str(tmp_path / "model"), hash_cache=cache) == first
    assert counted_hashing == []  # nothing read again

    past = time.time() - 1800  # touched: same bytes, new mtime -> hashed again, same value
    os.utime(unet, (past, past))
    assert model_fingerprint(str(tmp_path / "model"), hash_cache=cache) == first
    assert counted_hashing == ["diffusion_pytorch_model.safetensors"]

    counted_hashing.clear()  # rewritten with the same size and an old mtime: the mtime still differs
    unet.write_bytes(b"unet-weights-2")
    os.utime(unet, (past - 60, past - 60))
    second = model_fingerprint(str(tmp_path / "model"), hash_cache=cache)
    assert counted_hashing == ["diffusion_pytorch_model.safetensors"]
    assert second == plain_fingerprint(config, unet) != first

    counted_hashing.clear()  # the same file reached by another path (relative) shares the entry
    monkeypatch.chdir(tmp_path)
    assert model_fingerprint("./model", hash_cache=cache) == second and counted_hashing == []


def test_model_fingerprint_cache_trusts_only_settled_files(tmp_path, counted_hashing):
    """A file written just now could be rewritten within the mtime's granularity: hashed on every call."""
    config, unet = make_model_folder(tmp_path / "model")
    unet.write_bytes(b"fresh weights")
    cache = tmp_path / "hashes.json"
    for _ in range(2):
        assert model_fingerprint(str(tmp_path / "model"), hash_cache=cache) == plain_fingerprint(config, unet)
    assert counted_hashing.count("diffusion_pytorch_model.safetensors") == 2
    assert counted_hashing.count("model_index.json") == 1


def test_model_fingerprint_cache_defaults_to_xdg_and_survives_unwritable_or_corrupt_cache(
    tmp_path, monkeypatch, counted_hashing
):
    config, unet = make_model_folder(tmp_path / "model")
    expected = plain_fingerprint(config, unet)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pipelines.default_hash_cache() == tmp_path / "xdg" / "bdd-sdxl" / "file-sha256.json"
    assert model_fingerprint(str(tmp_path / "model")) == expected
    assert pipelines.default_hash_cache().is_file()
    assert sorted(p.name for p in (tmp_path / "model").rglob("*")) == [  # nothing written into the model
        "diffusion_pytorch_model.safetensors",
        "model_index.json",
        "unet",
    ]

    blocker = tmp_path / "not-a-dir"  # a cache whose folder cannot be made (works as root, unlike chmod)
    blocker.write_text("")
    counted_hashing.clear()
    for _ in range(2):
        assert model_fingerprint(str(tmp_path / "model"), hash_cache=blocker / "hashes.json") == expected
    assert len(counted_hashing) == 4  # no cache: hashed every time, silently

    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text('{"torn": ')
    counted_hashing.clear()
    assert model_fingerprint(str(tmp_path / "model"), hash_cache=corrupt) == expected
    assert len(counted_hashing) == 2 and str(unet.resolve()) in json.loads(corrupt.read_text())


# --- output sizes -----------------------------------------------------------------------------------------------


def test_bucket_grid_from_model_configs_and_output_sizes():
    from ai.common.generation_config import BucketGrid, OutputSize

    sdxl = BucketGrid.from_configs(
        {"sample_size": 128, "block_out_channels": [320, 640, 1280]},
        {"block_out_channels": [128, 256, 512, 512]},
    )
    assert sdxl.native == 1024 and (1344, 768) in sdxl.buckets and all(w % 64 == 0 for w, _ in sdxl.buckets)
    assert sdxl.nearest((1280, 720)) == (1344, 768) and sdxl.nearest((720, 1280)) == (768, 1344)
    sizes = sdxl.output_size((1280, 720), generate_at_bucket=True)
    assert sizes == OutputSize(generated=(1344, 768), saved=(1280, 720))
    assert sizes.record() == {"width": 1280, "height": 720, "generated_width": 1344, "generated_height": 768}
    assert sdxl.output_size((1280, 720), generate_at_bucket=False) == OutputSize((1280, 720), (1280, 720))
    tiny = BucketGrid.from_configs(
        {"sample_size": 16, "block_out_channels": [32, 64]}, {"block_out_channels": [8, 16, 32, 32]}
    )
    assert tiny.native == 128 and tiny.nearest((1280, 720)) == (
        160,
        96,
    )  # sides: multiples of 16 (x8, one /2)
    three_levels = BucketGrid.from_configs(
        {"sample_size": 16, "block_out_channels": [32, 32, 64]}, {"block_out_channels": [8, 16, 32, 32]}
    )
    assert all(w % 32 == 0 and h % 32 == 0 for w, h in three_levels.buckets)  # x8 and two /2 steps


def test_resize_to_stretches_the_whole_image_and_keeps_an_exact_size():
    from PIL import Image

    from ai.common.generation import resize_to

    image = Image.new("RGB", (160, 96), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 80, 48))  # top-left quarter red
    same = resize_to(image, (160, 96))
    assert same is image
    out = resize_to(image, (1280, 720))
    assert out.size == (1280, 720)
    assert out.getpixel((320, 180)) == (255, 0, 0) and out.getpixel((960, 540)) == (0, 0, 255)
    assert (
        out.getpixel((620, 180))[0] > 200 and out.getpixel((660, 180))[2] > 200
    )  # the edge at 640: a stretch
