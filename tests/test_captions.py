"""Captions from BDD100K labels: exact sentences, CLIP token budget, templates, files on disk, errors, summary."""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from convert import generate_bdd_captions as gen
from convert.captions import CLIP_WINDOW, DEFAULT_TEMPLATES, CaptionBuilder, TokenCounter, load_templates
from core.cli import UserError, run_main
from vocab import bdd
from vocab.clip_tokenizer import count_tokens

# ---------------------------------------------------------------------------------------------------------------
# Helpers: frames as they appear in the files
# ---------------------------------------------------------------------------------------------------------------


def det_label(category, box, color="NA", lid="0"):
    x1, y1, x2, y2 = box
    return {
        "id": lid,
        "attributes": {"occluded": False, "truncated": False, "trafficLightColor": color},
        "category": category,
        "box2d": {"x1": x1, "y1": y1, "x2": x2, "y2": y2},
    }


def frame_dict(
    name="b1c66a42-6f7d68ca", labels=None, weather="clear", scene="city street", timeofday="daytime"
):
    out = {
        "name": f"{name}.jpg",
        "attributes": {"weather": weather, "scene": scene, "timeofday": timeofday},
        "timestamp": 10000,
    }
    if labels is not None:
        out["labels"] = labels
    return out


def decode(*frames) -> list[bdd.Frame]:
    return bdd.decode_frames(json.dumps(list(frames)).encode())


def small_box(i):  # 21x21 px boxes along the top: never the largest, so never placed before bigger ones
    return (10.0 + 30 * i, 10.0, 30.0 + 30 * i, 30.0)


def builder(templates=None, size=(1280, 720)) -> CaptionBuilder:
    return CaptionBuilder(templates or load_templates(), TokenCounter(), size)


def load_templates_from(data: dict):
    from convert.captions import CaptionTemplates
    from core.config import validate_config

    return validate_config(CaptionTemplates, data)


def caption_of(frame_json, **kwargs) -> str:
    return builder(**kwargs).caption(decode(frame_json)[0])[0]


# The docstring's det_20 example: a big bus on the left, a mid car ahead, a pedestrian on the right.
DOC_DET20 = frame_dict(
    scene="city street",
    timeofday="night",
    weather="clear",
    labels=[
        det_label("bus", (0.0, 400.0, 299.0, 599.0)),  # 300x200: largest, centre x 150 (left), 200 px (near)
        det_label("car", (600.0, 350.0, 700.0, 400.0)),  # centre 650 (ahead), 51 px high (far)
        det_label("pedestrian", (1000.0, 300.0, 1040.0, 400.0)),  # centre 1020 (right), far
        det_label("car", small_box(0)),
        det_label("car", small_box(1)),
        det_label("traffic light", small_box(2), "R"),
        det_label("traffic light", small_box(3), "R"),
    ],
)
DOC_DET20_CAPTION = (
    "A dashcam photo of a city street at night in clear weather, with three cars, two red traffic lights, "
    "a pedestrian and a bus. A bus close on the left, a car far ahead and a pedestrian far on the right."
)


def write_labels(path: Path, frames) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(frames, indent=1), encoding="utf-8")
    return path


def run(labels: Path, out: Path, *extra: str) -> int:
    return run_main(gen.main, ["--labels_file", str(labels), "--caption_txt_output_folder", str(out), *extra])


def read_all(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


# ---------------------------------------------------------------------------------------------------------------
# Exact sentences
# ---------------------------------------------------------------------------------------------------------------


def test_det20_caption_exact_with_lights_and_placement():
    assert caption_of(DOC_DET20) == DOC_DET20_CAPTION
    assert DOC_DET20_CAPTION.replace("\\\n", "") in " ".join(gen.__doc__.replace("\\\n", "").split())


def test_legacy_caption_exact_names_mapped_polygons_ignored_undefined_omitted():
    legacy = {
        "name": "0000f77c-6257be58.jpg",
        "attributes": {"weather": "undefined", "scene": "undefined", "timeofday": "daytime"},
        "timestamp": 10000,
        "labels": [
            {
                "category": "person",
                "attributes": {"occluded": False, "truncated": False, "trafficLightColor": "none"},
                "manualShape": True,
                "manualAttributes": True,
                "box2d": {"x1": 620.0, "y1": 300.0, "x2": 650.0, "y2": 380.0},
                "id": 7,
            },
            {
                "category": "lane",
                "attributes": {"laneDirection": "parallel", "laneStyle": "solid", "laneType": "road curb"},
                "manualShape": True,
                "manualAttributes": True,
                "poly2d": [{"vertices": [[0, 600], [500, 400]], "types": "LL", "closed": False}],
                "id": 8,
            },
        ],
    }
    frames = decode(legacy)
    assert bdd.detect_format(frames) == "legacy"
    expected = "A dashcam photo of a road in the daytime, with a pedestrian. A pedestrian far ahead."
    assert builder().caption(frames[0])[0] == expected
    assert expected in gen.__doc__


def test_legacy_light_words_and_bike_motor():
    legacy = frame_dict(
        scene="highway",
        timeofday="dawn/dusk",
        weather="snowy",
        labels=[
            {"category": "bike", "box2d": {"x1": 900.0, "y1": 300.0, "x2": 1000.0, "y2": 500.0}, "id": 1},
            {"category": "motor", "box2d": {"x1": 100.0, "y1": 300.0, "x2": 150.0, "y2": 340.0}, "id": 2},
            {"category": "traffic light", "attributes": {"trafficLightColor": "green"}, "id": 3},
            {"category": "traffic light", "attributes": {"trafficLightColor": "green"}, "id": 4},
            {"category": "traffic light", "attributes": {"trafficLightColor": "none"}, "id": 5},
        ],
    )
    assert caption_of(legacy) == (
        "A dashcam photo of a highway at dawn or dusk in the snow, with two green traffic lights, "
        "another traffic light, a motorcycle and a bicycle. A bicycle close on the right and a motorcycle far "
        "on the left."
    )


@pytest.mark.parametrize(
    ("n", "phrase"),
    [
        (1, "a car"),
        (2, "two cars"),
        (7, "seven cars"),
        (20, "twenty cars"),
        (21, "21 cars"),
        (104, "104 cars"),
    ],
)
def test_counts_in_words_singular_plural(n, phrase):
    frame = frame_dict(labels=[det_label("car", small_box(i)) for i in range(n)])
    templates = load_templates().model_copy(
        update={"placement": load_templates().placement.model_copy(update={"max_objects": 0})}
    )
    text = caption_of(frame, templates=templates)
    assert text == f"A dashcam photo of a city street in the daytime in clear weather, with {phrase}."


def test_plural_forms_of_other_nouns_and_ignored_categories_described():
    labels = [det_label("bus", small_box(i)) for i in range(2)]
    labels += [det_label("other person", small_box(2 + i)) for i in range(3)]
    labels += [det_label("other vehicle", small_box(5)), det_label("trailer", small_box(6))]
    text = caption_of(
        frame_dict(weather="partly cloudy", scene="parking lot", timeofday="night", labels=labels)
    )
    assert text == (
        "A dashcam photo of a parking lot at night under a partly cloudy sky, with three people, two buses, "
        "a special vehicle and a trailer. Two buses far on the left."
    )


def test_undefined_and_unknown_attributes_are_omitted():
    frame = frame_dict(weather="undefined", scene="undefined", timeofday="undefined", labels=[])
    frame["labels"] = [det_label("car", small_box(0))]
    assert caption_of(frame) == "A dashcam photo of a road, with a car. A car far on the left."
    no_attrs = {"name": "x.jpg", "labels": [det_label("truck", small_box(0))]}
    assert caption_of(no_attrs) == "A dashcam photo of a road, with a truck. A truck far on the left."
    sunny = frame_dict(
        weather="sunny", scene="moon base", timeofday="night", labels=[det_label("car", small_box(0))]
    )
    assert caption_of(sunny) == "A dashcam photo of a road at night, with a car. A car far on the left."


def test_light_colours_grouped_known_first():
    labels = [
        det_label("traffic light", small_box(i), c) for i, c in enumerate(["NA", "G", "R", "NA", "Y", "G"])
    ]
    labels += [det_label("car", small_box(10 + i)) for i in range(7)]
    templates = load_templates().model_copy(
        update={"placement": load_templates().placement.model_copy(update={"max_objects": 0})}
    )
    assert caption_of(frame_dict(labels=labels), templates=templates) == (
        "A dashcam photo of a city street in the daytime in clear weather, with seven cars, two green traffic "
        "lights, a red traffic light, a yellow traffic light and two other traffic lights."
    )


def test_ignored_categories_merge_and_drop_modes(tmp_path):
    labels = [det_label("car", small_box(0)), det_label("other vehicle", small_box(1))]
    labels.append(det_label("other person", small_box(2)))
    base = load_templates()
    no_place = base.placement.model_copy(update={"max_objects": 0})
    merge = base.model_copy(update={"ignored": "merge", "placement": no_place})
    drop = base.model_copy(update={"ignored": "drop", "placement": no_place})
    head = "A dashcam photo of a city street in the daytime in clear weather, with "
    assert caption_of(frame_dict(labels=labels), templates=merge) == head + "two cars and a pedestrian."
    assert caption_of(frame_dict(labels=labels), templates=drop) == head + "a car."


# ---------------------------------------------------------------------------------------------------------------
# CLIP token budget
# ---------------------------------------------------------------------------------------------------------------


def crowded_frame() -> dict:
    """90 objects of every category and light colour, with the big ones spread for placement."""
    spec = {
        "car": 25,
        "traffic sign": 15,
        "pedestrian": 10,
        "truck": 6,
        "bus": 5,
        "motorcycle": 3,
        "bicycle": 3,
        "train": 2,
        "rider": 2,
        "other person": 2,
        "other vehicle": 2,
        "trailer": 1,
    }
    labels, i = [], 0
    for category, n in spec.items():
        for _ in range(n):
            x = (i * 97) % 1200
            labels.append(det_label(category, (float(x), 200.0, float(x + 20 + i), 230.0 + i), lid=str(i)))
            i += 1
    for color, n in (("R", 5), ("G", 4), ("Y", 3), ("NA", 2)):
        for _ in range(n):
            labels.append(det_label("traffic light", small_box(i % 40), color, lid=str(i)))
            i += 1
    assert len(labels) == 90
    return frame_dict(weather="partly cloudy", scene="residential", timeofday="dawn/dusk", labels=labels)


def test_crowded_frame_fits_77_tokens_and_keeps_the_important_parts():
    b = builder()
    frame = decode(crowded_frame())[0]
    text, counts, shortened = b.caption(frame)
    assert shortened
    assert count_tokens(text) <= CLIP_WINDOW  # the real tokenizer, start and end included
    scene_text = b.scene_text(frame.scene, frame.timeofday, frame.weather)
    items = b.list_items(counts)
    assert count_tokens(b.render(scene_text, items, b.place(frame.labels))) > CLIP_WINDOW
    # Dropped in order: placement (all of it here), ignored categories, then light colours were merged.
    assert count_tokens(b.render(scene_text, items, ())) > CLIP_WINDOW
    assert text == b.render(scene_text, [(k, n) for k, n in items if k not in bdd.DET20_IGNORED], ())
    assert text == (
        "A dashcam photo of a residential street at dawn or dusk under a partly cloudy sky, with 25 cars, "
        "fifteen traffic signs, five red traffic lights, four green traffic lights, three yellow traffic lights, "
        "two other traffic lights, ten pedestrians, six trucks, five buses, three motorcycles, three bicycles, "
        "two riders and two trains."
    )


def test_rarest_classes_dropped_last_when_still_too_long():
    data = yaml.safe_load(DEFAULT_TEMPLATES.read_text(encoding="utf-8"))
    data["prefix"] = "A " + "very " * 26 + "sharp dashcam photo of"  # 27 more tokens: classes must go
    b = builder(templates=load_templates_from(data))
    frame = decode(crowded_frame())[0]
    text, counts, shortened = b.caption(frame)
    assert shortened and count_tokens(text) <= CLIP_WINDOW
    scene_text = b.scene_text(frame.scene, frame.timeofday, frame.weather)
    merged = {
        k: n for k, n in counts.items() if not k.startswith("traffic light") and k not in bdd.DET20_IGNORED
    }
    merged["traffic light"] = 14
    items = b.list_items(merged)
    assert items[:4] == [("car", 25), ("traffic sign", 15), ("traffic light", 14), ("pedestrian", 10)]
    assert count_tokens(b.render(scene_text, items, ())) > CLIP_WINDOW  # merging the lights was not enough
    kept = next(k for k in range(len(items), 0, -1) if b.render(scene_text, items[:k], ()) == text)
    assert 3 <= kept < len(items)  # the most frequent classes stay, the rarest went
    assert count_tokens(b.render(scene_text, items[: kept + 1], ())) > CLIP_WINDOW


def test_memoised_counts_equal_the_real_tokenizer_over_many_captions():
    rng = random.Random(0)
    categories = list(bdd.DET20_CATEGORIES)
    b = builder()
    fresh = TokenCounter()  # no disk cache: every word counted by the real tokenizer, then summed
    texts = set()
    for k in range(250):
        labels = []
        for _ in range(rng.choice([0, 1, 3, 12, 40, 95])):
            x, y = rng.uniform(0, 1200), rng.uniform(0, 650)
            color = rng.choice(["NA", "R", "G", "Y"])
            labels.append(
                det_label(
                    rng.choice(categories), (x, y, x + rng.uniform(2, 300), y + rng.uniform(2, 300)), color
                )
            )
        frame = decode(
            frame_dict(
                name=f"f{k}",
                labels=labels,
                weather=rng.choice(bdd.WEATHERS),
                scene=rng.choice(bdd.SCENES),
                timeofday=rng.choice(bdd.TIMES_OF_DAY),
            )
        )[0]
        text, counts, _ = b.caption(frame)
        texts.add(text)
        # also the unshortened long form, well past 77 tokens
        texts.add(
            b.render(
                b.scene_text(frame.scene, frame.timeofday, frame.weather),
                b.list_items(counts),
                b.place(frame.label_list()),
            )
        )
    assert len(texts) > 300
    over = 0
    for text in sorted(texts):
        real = count_tokens(text)
        assert fresh(text) == real, text
        over += real > CLIP_WINDOW
    assert over > 10  # the check covered texts past the window too


# ---------------------------------------------------------------------------------------------------------------
# Templates file
# ---------------------------------------------------------------------------------------------------------------


def test_templates_override_file(tmp_path):
    data = yaml.safe_load(DEFAULT_TEMPLATES.read_text(encoding="utf-8"))
    data["prefix"] = "Photo from a car driving through"
    data["weather"]["clear"] = "on a sunny day"
    data["with_objects"] = "{scene_text}; visible: {objects}."
    data["placement"]["max_objects"] = 0
    custom = tmp_path / "mine.yaml"
    custom.write_text(yaml.safe_dump(data), encoding="utf-8")
    labels = write_labels(tmp_path / "det.json", [frame_dict(labels=[det_label("car", small_box(0))])])
    assert run(labels, tmp_path / "out", "--templates", str(custom)) == 0
    assert (tmp_path / "out" / "b1c66a42-6f7d68ca.txt").read_text(encoding="utf-8") == (
        "Photo from a car driving through a city street in the daytime on a sunny day; visible: a car.\n"
    )


def test_bad_templates_file_gives_clear_errors(tmp_path, capsys):
    data = yaml.safe_load(DEFAULT_TEMPLATES.read_text(encoding="utf-8"))
    data["prefx"] = data.pop("prefix")
    del data["weather"]["foggy"]
    data["with_objects"] = "{scene_text} with {things}."
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(UserError) as err:
        load_templates(bad)
    msg = str(err.value)
    assert str(bad) in msg
    assert "prefx: unknown key (did you mean 'prefix'?)" in msg
    labels = write_labels(tmp_path / "det.json", [frame_dict(labels=[det_label("car", small_box(0))])])
    assert run(labels, tmp_path / "out", "--templates", str(bad)) == 2
    assert "prefix" in capsys.readouterr().err
    # one error at a time for the checks that run after the fields parse
    data["prefix"] = data.pop("prefx")
    bad.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(UserError, match=r"weather: missing entries for \['foggy'\]"):
        load_templates(bad)
    data["weather"]["foggy"] = "in fog"
    bad.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(
        UserError, match=r"with_objects: template .*\{things\}.*got \['scene_text', 'things'\]"
    ):
        load_templates(bad)
    data["with_objects"] = "{scene_text}, with {objects}."
    data["prefix"] = "word " * 80
    bad.write_text(yaml.safe_dump(data), encoding="utf-8")
    assert run(labels, tmp_path / "out", "--templates", str(bad)) == 2
    assert "CLIP tokens (> 77)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


# ---------------------------------------------------------------------------------------------------------------
# Files: determinism, workers, reruns, refusals, atomic writes
# ---------------------------------------------------------------------------------------------------------------


def many_frames(n=60, seed=1) -> list[dict]:
    rng = random.Random(seed)
    frames = []
    for k in range(n):
        labels = []
        for j in range(rng.randint(1, 25)):
            x, y = rng.uniform(0, 1200), rng.uniform(0, 650)
            cat = rng.choice(bdd.DET20_CATEGORIES)
            box = (x, y, x + rng.uniform(5, 300), y + rng.uniform(5, 200))
            labels.append(det_label(cat, box, rng.choice(["NA", "R", "G"]), lid=str(j)))
        frames.append(
            frame_dict(
                name=f"{k:08x}-{rng.getrandbits(32):08x}",
                labels=labels,
                weather=rng.choice(bdd.WEATHERS),
                scene=rng.choice(bdd.SCENES),
                timeofday=rng.choice(bdd.TIMES_OF_DAY),
            )
        )
    frames[3].pop("labels")
    frames[4]["labels"] = None
    frames[5]["labels"] = []
    return frames


def test_deterministic_and_forked_workers_give_identical_bytes(tmp_path, monkeypatch, caplog):
    labels = write_labels(tmp_path / "det_train.json", many_frames())
    assert run(labels, tmp_path / "a", "--workers", "1") == 0
    assert run(labels, tmp_path / "b", "--workers", "1") == 0
    monkeypatch.setattr(gen, "SMALL_INPUT_FRAMES", 0)  # fork even for 57 frames
    monkeypatch.setattr(gen, "CHUNK_FRAMES", 5)
    with caplog.at_level(logging.INFO, logger="bdd-sdxl.captions"):
        assert run(labels, tmp_path / "c", "--workers", "2") == 0
    assert "(2 processes)" in caplog.text
    a, b, c = read_all(tmp_path / "a"), read_all(tmp_path / "b"), read_all(tmp_path / "c")
    assert len(a) == 57 and a == b == c
    for data in a.values():
        text = data.decode("utf-8")
        assert text.endswith(".\n") and text.count("\n") == 1


def test_rerun_is_idempotent_and_leaves_foreign_files(tmp_path, caplog):
    labels = write_labels(tmp_path / "det_train.json", many_frames(20))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.md").write_text("mine", encoding="utf-8")
    (out / "zzzz-not-a-frame.txt").write_text("keep me", encoding="utf-8")
    assert run(labels, out) == 0
    first = read_all(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bdd-sdxl.captions"):
        assert run(labels, out) == 0
    assert "captions written: 0, unchanged: 17, replaced: 0" in caplog.text
    assert read_all(out) == first
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes  # nothing rewritten
    assert first["notes.md"] == b"mine" and first["zzzz-not-a-frame.txt"] == b"keep me"
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_differing_caption_is_refused_and_nothing_written_until_overwrite(tmp_path, capsys):
    labels = write_labels(tmp_path / "det_train.json", many_frames(20))
    out = tmp_path / "out"
    assert run(labels, out) == 0
    names = sorted(p.name for p in out.iterdir())
    edited, removed = out / names[0], out / names[1]
    edited.write_text("my own caption\n", encoding="utf-8")
    removed.unlink()
    assert run(labels, out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 existing captions" in err and names[0] in err and "--overwrite" in err
    assert edited.read_text(encoding="utf-8") == "my own caption\n"
    assert not removed.exists()  # a refusal writes nothing at all
    assert run(labels, out, "--overwrite") == 0
    assert edited.read_text(encoding="utf-8") != "my own caption\n" and removed.is_file()
    assert run(labels, out) == 0


def test_interrupted_write_leaves_no_partial_file(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gen.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        gen.write_small_file(str(tmp_path), "a.txt", b"caption\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("how", ["new", "replace"])
def test_caption_writer_interrupted_leaves_no_partial_or_empty_file(tmp_path, monkeypatch, how):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    with gen.CaptionWriter(tmp_path) as writer:
        writer.write("a.txt", b"first\n")
        writer.write("b.txt", b"old\n")
        if how == "new":  # direct create: interrupted after the name exists, before its bytes are in
            monkeypatch.setattr(gen.os, "write", boom)
            with pytest.raises(KeyboardInterrupt):
                writer.write("c.txt", b"third\n")
        else:  # replacement: interrupted before the rename
            monkeypatch.setattr(gen.os, "replace", boom)
            with pytest.raises(KeyboardInterrupt):
                writer.write("b.txt", b"new\n", replace=True)
    assert read_all(tmp_path) == {"a.txt": b"first\n", "b.txt": b"old\n"}  # no c.txt, no temporary name


def test_caption_writer_error_names_the_file_and_removes_it(tmp_path, monkeypatch):
    real_write = os.write
    with gen.CaptionWriter(tmp_path) as writer:
        monkeypatch.setattr(gen.os, "write", lambda fd, data: real_write(fd, data[:3]))  # as on a full disk
        with pytest.raises(OSError) as err:
            writer.write_many([("a.txt", b"caption\n", False)])
    assert err.value.filename == "a.txt" and "short write (3 of 8 bytes)" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_caption_writer_paths_agree_on_bytes_and_mode(tmp_path):
    plain = tmp_path / "plain.txt"
    with open(plain, "wb") as fh:  # what an ordinary write gives under this umask
        fh.write(b"x")
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "taken.txt").write_bytes(b"old\n")
    big = b"y" * (
        gen.ONE_WRITE_BYTES + 1
    )  # more than one write() can be trusted with: temporary file + rename
    with gen.CaptionWriter(folder) as writer:
        writer.write("new.txt", "Une rue à Paris.\n".encode())  # created directly
        writer.write("taken.txt", b"appeared meanwhile\n")  # a name that exists: replaced, as a rename does
        writer.write("replaced.txt", b"a\n")
        writer.write("replaced.txt", b"b\n", replace=True)
        writer.write("big.txt", big)
    assert read_all(folder) == {
        "big.txt": big,
        "new.txt": "Une rue à Paris.\n".encode(),
        "replaced.txt": b"b\n",
        "taken.txt": b"appeared meanwhile\n",
    }
    assert {p.stat().st_mode for p in folder.iterdir()} == {plain.stat().st_mode}


def test_killed_writer_leaves_only_whole_or_empty_files(tmp_path):
    """SIGKILL a process writing caption-sized files with CaptionWriter: every file present is whole or empty."""
    script = (
        "import sys; from pathlib import Path; from convert.generate_bdd_captions import CaptionWriter\n"
        "with CaptionWriter(Path(sys.argv[1])) as w:\n"
        "    for i in range(1000000):\n"
        "        w.write(f'{i:07d}.txt', bytes([65 + i % 26]) * (100 + i % 3996))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)])
    try:
        deadline = time.monotonic() + 60
        while len(os.listdir(tmp_path)) < 3000 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.01)
    finally:
        proc.kill()
        proc.wait()
    files = read_all(tmp_path)
    assert len(files) >= 3000 and proc.returncode == -9  # killed in the middle of writing
    whole = {name for name, data in files.items() if data}
    for name in whole:
        i = int(name[:7])
        assert files[name] == bytes([65 + i % 26]) * (100 + i % 3996)
    assert len(files) - len(whole) <= 1  # at most the one being written when the signal came


def test_rerun_completes_empty_captions_left_by_a_killed_run(tmp_path, caplog, capsys):
    labels = write_labels(tmp_path / "det_train.json", many_frames(20))
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="bdd-sdxl.captions"):
        assert run(labels, out) == 0
    objects = caplog.text.split("objects by class: ", 1)[1].split("\n", 1)[0]
    first = read_all(out)
    names = sorted(first)
    (out / names[0]).write_bytes(b"")  # as a run killed between creating and filling it leaves it
    (out / names[1]).unlink()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="bdd-sdxl.captions"):
        assert run(labels, out) == 0  # no --overwrite needed: an empty file is an unfinished caption
    assert "captions written: 2, unchanged: 15, replaced: 0" in caplog.text
    assert "empty captions left by an interrupted run, now written: 1" in caplog.text
    assert objects.startswith("car ") and f"objects by class: {objects}\n" in caplog.text  # each frame once
    assert read_all(out) == first
    # Only empty files are taken for unfinished ones: a shortened caption is someone's edit, refused as before.
    (out / names[2]).write_bytes(first[names[2]][:10])
    assert run(labels, out) == 2
    assert "1 existing captions" in capsys.readouterr().err
    assert (out / names[2]).read_bytes() == first[names[2]][:10]


# ---------------------------------------------------------------------------------------------------------------
# Bad input and the summary
# ---------------------------------------------------------------------------------------------------------------


def test_malformed_json_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "det_train.json"
    bad.write_text('[\n  {"name": "a.jpg",\n   "labels": [}\n]\n', encoding="utf-8")
    assert run(bad, tmp_path / "out") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(bad) in err and "line 3" in err and "\n" not in err
    assert not (tmp_path / "out").exists()  # nothing created for a run that could not start
    (tmp_path / "file").write_text("x", encoding="utf-8")
    assert run(bad, tmp_path / "file") == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_missing_input_folder_and_missing_label_file(tmp_path, capsys):
    argv = ["--bdd_data_dir", str(tmp_path / "nope"), "--caption_txt_output_folder", str(tmp_path / "out")]
    assert run_main(gen.main, argv) == 2
    assert "BDD100K folder not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    argv[1] = str(tmp_path / "empty")
    assert run_main(gen.main, [*argv, "--split", "val"]) == 2
    assert "labels/det_20/det_val.json" in capsys.readouterr().err


def test_unknown_values_counted_not_fatal_and_summary(tmp_path, caplog):
    frames = [
        frame_dict(name="aaaa0001-00000001", weather="sunny", labels=[det_label("hoverboard", small_box(0))]),
        frame_dict(
            name="aaaa0002-00000002", labels=[det_label("car", small_box(0)), det_label("car", small_box(1))]
        ),
        frame_dict(name="aaaa0003-00000003", labels=[det_label("traffic light", small_box(0), "BLUE")]),
        frame_dict(name="aaaa0004-00000004"),  # no labels key
        frame_dict(name="aaaa0002-00000002", labels=[det_label("bus", small_box(0))]),  # duplicate name
    ]
    frames[3]["attributes"]["scene"] = "lava field"
    labels = write_labels(tmp_path / "det_train.json", frames)
    with caplog.at_level(logging.INFO, logger="bdd-sdxl.captions"):
        assert run(labels, tmp_path / "out") == 0
    text = caplog.text
    assert "frames read: 5; captions written: 3, unchanged: 0, replaced: 0" in text
    assert "frames skipped: 2 (no 'labels' key: 1, duplicate frame name (first kept): 1)" in text
    assert "unknown categories: 'hoverboard' x1" in text
    assert "'weather=sunny' x1" in text and "'scene=lava field' x1" in text
    assert "unknown trafficLightColor values: 'BLUE' x1" in text
    assert "objects by class: car 2, traffic light 1" in text
    assert "done in" in text
    out = tmp_path / "out"
    assert (out / "aaaa0001-00000001.txt").read_text(encoding="utf-8") == (
        "A dashcam photo of a city street in the daytime.\n"
    )
    assert "two cars" in (out / "aaaa0002-00000002.txt").read_text(encoding="utf-8")
    assert "another" not in (out / "aaaa0003-00000003.txt").read_text(encoding="utf-8")


def test_include_unlabeled_captions_from_attributes(tmp_path):
    frames = [frame_dict(name="n0", labels=None), frame_dict(name="n1", scene="tunnel", labels=[])]
    frames.append(frame_dict(name="n2", timeofday="night"))
    labels = write_labels(tmp_path / "det_train.json", frames)
    assert run(labels, tmp_path / "out") == 0
    assert list((tmp_path / "out").iterdir()) == []
    assert run(labels, tmp_path / "out", "--include_unlabeled") == 0
    got = {p.name: p.read_text(encoding="utf-8") for p in (tmp_path / "out").iterdir()}
    assert got == {
        "n0.txt": "A dashcam photo of a city street in the daytime in clear weather.\n",
        "n1.txt": "A dashcam photo of a tunnel in the daytime in clear weather.\n",
        "n2.txt": "A dashcam photo of a city street at night in clear weather.\n",
    }


def test_mini_bdd_through_the_cli(mini_bdd, tmp_path):
    out = tmp_path / "captions"
    script = Path(gen.__file__)
    cmd = [
        sys.executable,
        str(script),
        "--bdd_data_dir",
        str(mini_bdd),
        "--caption_txt_output_folder",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), timeout=120)
    assert proc.returncode == 0, proc.stderr
    frames = bdd.load_frames(mini_bdd / "labels" / "det_20" / "det_train.json")
    labelled = {bdd.stem(f.name) for f in frames if f.labels_state == "ok"}
    assert {p.stem for p in out.glob("*.txt")} == labelled
    assert "frames skipped: 3 (no 'labels' key: 1, 'labels': []: 1, 'labels': null: 1)" in proc.stderr
    assert proc.stderr.rstrip().endswith("(1 processes)")  # the fast exit flushed the whole summary
    bad = subprocess.run([*cmd, "--labels_file", str(mini_bdd / "nope.json")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr == f"error: labels file not found: {mini_bdd / 'nope.json'}\n"
    for path in out.glob("*.txt"):
        text = path.read_text(encoding="utf-8")
        assert text.startswith("A dashcam photo of ") and count_tokens(text.strip()) <= CLIP_WINDOW
    # The legacy file of the same frames, named explicitly, gives captions too (format detected).
    legacy = mini_bdd / "labels" / "bdd100k_labels_images_train.json"
    assert run(legacy, tmp_path / "legacy") == 0
    assert {p.stem for p in (tmp_path / "legacy").glob("*.txt")} >= labelled
