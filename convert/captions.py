"""Caption text for BDD100K frames: templates schema, CLIP token counting, and the caption builder.

Used by convert/generate_bdd_captions.py (see its docstring for the rules a caption follows). The phrases come
from config/caption_templates.yaml, validated by :class:`CaptionTemplates`.

Token counts: CLIP's pre-tokenizer never joins text across whitespace, so a caption's count is 2 (start and
end) plus the sum of its whitespace-separated words' counts. :class:`TokenCounter` memoises those with the
real tokenizer (vocab.clip_tokenizer) and keeps them on disk next to its vocabulary, so that a run builds the
tokenizer (about 2 s with the transformers import) only when it meets a word it has not counted before.
"""

from __future__ import annotations

import json
import logging
import os
import string
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import model_validator

from core.cli import UserError
from core.config import Section, load_config
from core.io import atomic_write_text
from vocab import bdd

DEFAULT_TEMPLATES = Path(__file__).resolve().parents[1] / "config" / "caption_templates.yaml"
CLIP_WINDOW = 77  # tokens, start and end included (vocab.clip_tokenizer.CONTEXT_LENGTH)
log = logging.getLogger("bdd-sdxl.captions")

# ---------------------------------------------------------------------------------------------------------------
# Templates: schema of config/caption_templates.yaml
# ---------------------------------------------------------------------------------------------------------------

_DEFINED = {key: tuple(v for v in values if v != "undefined") for key, values in bdd.FRAME_ATTRIBUTES.items()}
SceneValue = Literal[_DEFINED["scene"]]
WeatherValue = Literal[_DEFINED["weather"]]
TimeValue = Literal[_DEFINED["timeofday"]]
CategoryName = Literal[bdd.DET20_CATEGORIES]
DetClassName = Literal[bdd.DET_CLASSES]
LightName = Literal["red", "green", "yellow", "other"]
NounForms = tuple[str, str]  # (one, with its article; many)


def _check_fields(template: str, allowed: set[str], required: set[str], what: str) -> None:
    try:
        names = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise ValueError(f"{what}: bad template {template!r}: {exc}") from None
    if names - allowed or required - names:
        raise ValueError(
            f"{what}: template {template!r} must use {sorted(required)} and may use only {sorted(allowed)} "
            f"(got {sorted(names)})"
        )


def _check_complete(mapping: dict, expected: Sequence[str], what: str) -> None:
    missing = [k for k in expected if k not in mapping]
    if missing:
        raise ValueError(f"{what}: missing entries for {missing}")


class PlacementTemplates(Section):
    max_objects: int = 3
    classes: list[DetClassName] = list(bdd.DET_CLASSES[:8])  # road users; not lights and signs
    near_min_height: float = 0.15
    sentence: str = "{items}."
    item: str = "{object} {distance} {side}"
    sides: dict[Literal["left", "ahead", "right"], str]
    distances: dict[Literal["near", "far"], str]

    @model_validator(mode="after")
    def _check(self) -> PlacementTemplates:
        if self.max_objects < 0 or not 0 < self.near_min_height <= 1:
            raise ValueError("max_objects must be >= 0 and near_min_height in (0, 1]")
        _check_fields(self.sentence, {"items"}, {"items"}, "placement.sentence")
        _check_fields(self.item, {"object", "distance", "side"}, {"object"}, "placement.item")
        _check_complete(self.sides, ("left", "ahead", "right"), "placement.sides")
        _check_complete(self.distances, ("near", "far"), "placement.distances")
        return self


class CaptionTemplates(Section):
    """Phrases of a caption (see config/caption_templates.yaml for the meaning of each key)."""

    prefix: str
    scene: dict[SceneValue, str]
    scene_unknown: str
    timeofday: dict[TimeValue, str]
    weather: dict[WeatherValue, str]
    with_objects: str = "{scene_text}, with {objects}."
    without_objects: str = "{scene_text}."
    list_separator: str = ", "
    list_last_separator: str = " and "
    numbers: list[str]
    nouns: dict[CategoryName, NounForms]
    light_nouns: dict[LightName, NounForms]
    ignored: Literal["describe", "merge", "drop"] = "describe"
    placement: PlacementTemplates

    @model_validator(mode="after")
    def _check(self) -> CaptionTemplates:
        _check_complete(self.scene, _DEFINED["scene"], "scene")
        _check_complete(self.timeofday, _DEFINED["timeofday"], "timeofday")
        _check_complete(self.weather, _DEFINED["weather"], "weather")
        needed_nouns = bdd.DET_CLASSES + (tuple(bdd.DET20_IGNORED) if self.ignored == "describe" else ())
        _check_complete(self.nouns, needed_nouns, "nouns")
        _check_complete(self.light_nouns, ("red", "green", "yellow", "other"), "light_nouns")
        _check_fields(self.with_objects, {"scene_text", "objects"}, {"scene_text", "objects"}, "with_objects")
        _check_fields(self.without_objects, {"scene_text"}, {"scene_text"}, "without_objects")
        if len(self.numbers) < 2:
            raise ValueError("numbers: list the number words from zero upwards (at least zero and one)")
        return self


def load_templates(path: str | os.PathLike | None = None) -> CaptionTemplates:
    """Read and validate a templates YAML (the default one when ``path`` is None)."""
    return load_config(CaptionTemplates, path or DEFAULT_TEMPLATES)


# ---------------------------------------------------------------------------------------------------------------
# Token counting: memoised per whitespace-separated word, checked against the real CLIP tokenizer
# ---------------------------------------------------------------------------------------------------------------


class TokenCounter:
    """Count a text's CLIP tokens (start/end included) as the sum of its words' memoised counts."""

    def __init__(self, counts: dict[str, int] | None = None):
        self.counts: dict[str, int] = dict(counts or {})
        self.new: dict[str, int] = {}  # words counted by the tokenizer in this process, to persist

    def __call__(self, text: str) -> int:
        words = text.split()
        try:
            return 2 + sum(map(self.counts.__getitem__, words))  # the common case: every word seen before
        except KeyError:
            return 2 + sum(self.counts[w] if w in self.counts else self._count_word(w) for w in words)

    def _count_word(self, word: str) -> int:
        from vocab.clip_tokenizer import shared_tokenizer

        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we fork after using it
        n = len(shared_tokenizer()(word, add_special_tokens=False)["input_ids"])
        self.counts[word] = self.new[word] = n
        return n


def _token_cache_path() -> tuple[Path, str]:
    """Where memoised word counts live (beside the vocabulary) and the vocabulary's fingerprint."""
    from vocab.clip_tokenizer import default_vocab_dir

    folder = default_vocab_dir()
    stats = [os.stat(folder / name) for name in ("vocab.json", "merges.txt") if (folder / name).is_file()]
    fingerprint = ";".join(f"{s.st_size}:{s.st_mtime_ns}" for s in stats) if len(stats) == 2 else ""
    return folder / "caption_word_token_counts.json", fingerprint


def load_token_counter() -> TokenCounter:
    path, fingerprint = _token_cache_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if fingerprint and data.get("vocab") == fingerprint:
            counts = data["counts"]
            if all(isinstance(v, int) and v >= 0 for v in counts.values()):
                return TokenCounter(counts)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no cache or a stale/corrupt one: counts are rebuilt with the tokenizer
    return TokenCounter()


def save_token_counter(counter: TokenCounter, learnt_elsewhere: dict[str, int] | None = None) -> None:
    """Persist the counts learnt in this process (and those ``learnt_elsewhere``, e.g. by workers)."""
    if learnt_elsewhere:
        counter.counts.update(learnt_elsewhere)
        counter.new.update(learnt_elsewhere)
    if not counter.new:
        return
    path, fingerprint = _token_cache_path()  # the tokenizer has written the vocabulary by now
    if not fingerprint:
        return
    try:
        atomic_write_text(path, json.dumps({"vocab": fingerprint, "counts": counter.counts}, sort_keys=True))
    except OSError as exc:  # a cache only: never fail a run for it
        log.warning("could not save token counts to %s: %s", path, exc)


# ---------------------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------------------

# List items of traffic lights with a known colour, and of the others when some colours are known.
_LIGHT_KEYS = {
    "red": "traffic light (red)",
    "green": "traffic light (green)",
    "yellow": "traffic light (yellow)",
}
_OTHER_LIGHTS = "traffic light (other)"
_LIGHT_CATEGORY = "traffic light"
_NOT_COUNTED = ""  # item key of categories left out of captions


class CaptionBuilder:
    """Turn a frame into its caption with a given set of templates, image size and token counter."""

    def __init__(
        self, templates: CaptionTemplates, counter: TokenCounter, image_size: tuple[int, int] = (1280, 720)
    ):
        self.t = templates
        self.count_tokens = counter
        self.width, self.height = image_size
        self.near_min_height = templates.placement.near_min_height * self.height
        # Item keys in their fixed list order: classes, lights split by colour, then det_20's ignored ones.
        order: list[str] = []
        for name in bdd.DET_CLASSES:
            order += [*_LIGHT_KEYS.values(), name, _OTHER_LIGHTS] if name == "traffic light" else [name]
        if templates.ignored == "describe":
            order += list(bdd.DET20_IGNORED)
        self.order = {key: i for i, key in enumerate(order)}
        self.forms: dict[str, NounForms] = {k: tuple(v) for k, v in templates.nouns.items()}
        self.forms.update(
            {_LIGHT_KEYS[c]: tuple(v) for c, v in templates.light_nouns.items() if c in _LIGHT_KEYS}
        )
        self.forms[_OTHER_LIGHTS] = tuple(templates.light_nouns["other"])
        self.ignored_keys = frozenset(bdd.DET20_IGNORED) if templates.ignored == "describe" else frozenset()
        self.placeable = frozenset(templates.placement.classes)
        self._key_of_category: dict[str, str] = {}
        self._placeable_categories: set[str] = set()  # category strings whose item is placed
        self._scene_text: dict[tuple[str, str, str], str] = {}
        self._phrases: dict[tuple[str, int], str] = {}

    # -- pieces ----------------------------------------------------------------------------------------------

    def item_key(self, category: str) -> str:
        """The list item a category counts towards ('' when it is not described)."""
        key = self._key_of_category.get(category)
        if key is None:
            cat = bdd.canonical_category(category)
            if cat.det_class is None:
                key = _NOT_COUNTED
            elif cat.ignored:
                mode = self.t.ignored
                key = category if mode == "describe" else cat.det_class if mode == "merge" else _NOT_COUNTED
            else:
                key = cat.det_class
            self._key_of_category[category] = key
            if key in self.placeable:
                self._placeable_categories.add(category)
        return key

    def scene_text(self, scene: str, timeofday: str, weather: str) -> str:
        key = (scene, timeofday, weather)
        text = self._scene_text.get(key)
        if text is None:
            t = self.t
            parts = [
                t.prefix,
                t.scene.get(scene, t.scene_unknown),
                t.timeofday.get(timeofday),
                t.weather.get(weather),
            ]
            text = self._scene_text[key] = " ".join(p for p in parts if p)
        return text

    def phrase(self, key: str, n: int) -> str:
        """'a car', 'three cars', '23 cars'."""
        text = self._phrases.get((key, n))
        if text is None:
            one, many = self.forms[key]
            numbers = self.t.numbers
            text = one if n == 1 else f"{numbers[n] if n < len(numbers) else n} {many}"
            self._phrases[(key, n)] = text
        return text

    def join(self, phrases: Sequence[str]) -> str:
        if len(phrases) <= 1:
            return "".join(phrases)
        return self.t.list_separator.join(phrases[:-1]) + self.t.list_last_separator + phrases[-1]

    def render(
        self, scene_text: str, items: Sequence[tuple[str, int]], placed: Sequence[tuple[str, str, str]]
    ) -> str:
        t = self.t
        if items:
            objects = self.join([self.phrase(k, n) for k, n in items])
            text = t.with_objects.format(scene_text=scene_text, objects=objects)
        else:
            text = t.without_objects.format(scene_text=scene_text)
        if placed:
            p = t.placement
            # identical (class, side, distance) read "two cars far ahead"; groups keep their first place
            groups = Counter(placed)
            parts = [
                p.item.format(object=self.phrase(k, n), distance=p.distances[d], side=p.sides[s])
                for (k, s, d), n in groups.items()
            ]
            sentence = p.sentence.format(items=self.join(parts))
            text = f"{text} {sentence[:1].upper()}{sentence[1:]}"
        return text

    # -- a frame -----------------------------------------------------------------------------------------------

    def analyse(self, frame: bdd.Frame) -> tuple[dict[str, int], list[tuple[str, str, str]]]:
        """Counts per list item and the placed objects (key, side, distance), most salient first."""
        labels = frame.label_list()
        # Count category strings first (C speed), then map the few distinct ones to list items.
        raw = Counter([label.category for label in labels])
        key_of = self._key_of_category
        counts: dict[str, int] = {}
        for category, n in raw.items():
            key = key_of.get(category)
            if key is None:
                key = self.item_key(category)
            if key:
                counts[key] = counts.get(key, 0) + n
        if _LIGHT_CATEGORY in raw:  # the one category string (both formats) that means a traffic light
            codes = Counter(  # .light: either key spelling, list values ([1, "G"]) read as their code
                [lab.attributes.light for lab in labels if lab.category == _LIGHT_CATEGORY and lab.attributes]
            )
            for code, n in codes.items():
                color = bdd.LIGHT_COLORS.get(code) if code is not None else None
                if color is not None:
                    counts[_LIGHT_CATEGORY] -= n
                    counts[_LIGHT_KEYS[color]] = counts.get(_LIGHT_KEYS[color], 0) + n
            if not counts[_LIGHT_CATEGORY]:
                del counts[_LIGHT_CATEGORY]
        return counts, self.place(labels) if self.t.placement.max_objects else []

    def place(self, labels: Sequence[bdd.Label]) -> list[tuple[str, str, str]]:
        """(key, side, distance) of the largest boxes of placeable classes (ties: first in the file first)."""
        placeable = self._placeable_categories
        candidates = [
            (-(b.x2 - b.x1 + 1) * (b.y2 - b.y1 + 1), i)
            for i, label in enumerate(labels)
            if label.category in placeable and (b := label.box2d) is not None
        ]
        candidates.sort()
        placed = []
        width, height = self.width, self.height
        for _, i in candidates[: self.t.placement.max_objects]:
            b = labels[i].box2d
            # bdd.clip_box, inlined (hot loop): inclusive pixels clipped to the image
            x1, x2 = min(max(b.x1, 0.0), width - 1.0), min(max(b.x2, 0.0), width - 1.0)
            y1, y2 = min(max(b.y1, 0.0), height - 1.0), min(max(b.y2, 0.0), height - 1.0)
            cx = (x1 + x2 + 1) / 2
            side = "left" if cx < width / 3 else "right" if cx > 2 * width / 3 else "ahead"
            distance = "near" if y2 - y1 + 1 >= self.near_min_height else "far"
            placed.append((self._key_of_category[labels[i].category], side, distance))
        return placed

    def list_items(self, counts: dict[str, int]) -> list[tuple[str, int]]:
        """Items in list order: by count, then fixed order; lights kept together (coloured ones first)."""
        order = self.order
        lights = [(k, n) for k, n in counts.items() if k.startswith("traffic light")]
        items = [(k, n) for k, n in counts.items() if not k.startswith("traffic light")]
        if len(lights) <= 1:
            return sorted(items + lights, key=lambda kv: (-kv[1], order[kv[0]]))
        lights.sort(key=lambda kv: (kv[0] == "traffic light", -kv[1], order[kv[0]]))
        lights = [(_OTHER_LIGHTS if k == "traffic light" else k, n) for k, n in lights]
        block = ("traffic light", sum(n for _, n in lights))  # the whole block takes this item's place
        items = sorted([*items, block], key=lambda kv: (-kv[1], order[kv[0]]))
        at = items.index(block)
        return items[:at] + lights + items[at + 1 :]

    def caption(self, frame: bdd.Frame) -> tuple[str, Counter, bool]:
        """(caption, object counts per item, whether parts were dropped to fit CLIP's window)."""
        counts, placed = self.analyse(frame)
        items = self.list_items(counts)
        scene_text = self.scene_text(frame.scene, frame.timeofday, frame.weather)
        text = self.render(scene_text, items, placed)
        if self.count_tokens(text) <= CLIP_WINDOW:
            return text, counts, False
        return self._shorten(scene_text, items, placed), counts, True

    def _shorten(
        self, scene_text: str, items: list[tuple[str, int]], placed: list[tuple[str, str, str]]
    ) -> str:
        """Drop the least important parts until the caption fits (see the module docstring for the order)."""
        placed = list(placed)
        while placed:
            placed.pop()
            text = self.render(scene_text, items, placed)
            if self.count_tokens(text) <= CLIP_WINDOW:
                return text
        if any(k in self.ignored_keys for k, _ in items):
            items = [(k, n) for k, n in items if k not in self.ignored_keys]
            text = self.render(scene_text, items, ())
            if self.count_tokens(text) <= CLIP_WINDOW:
                return text
        if sum(k.startswith("traffic light") for k, _ in items) > 1:
            merged = {k: n for k, n in items if not k.startswith("traffic light")}
            merged["traffic light"] = sum(n for k, n in items if k.startswith("traffic light"))
            items = self.list_items(merged)
            text = self.render(scene_text, items, ())
            if self.count_tokens(text) <= CLIP_WINDOW:
                return text
        while items:
            items = items[:-1]  # the rarest (ties: later in the fixed order) goes first
            text = self.render(scene_text, items, ())
            if self.count_tokens(text) <= CLIP_WINDOW:
                return text
        return text  # scene text alone: checked to fit when the templates are loaded

    def check_fits(self) -> None:
        """Refuse templates whose longest scene text (no objects) already overflows CLIP's window."""
        scenes = (*_DEFINED["scene"], "undefined")
        times = (*_DEFINED["timeofday"], "undefined")
        weathers = (*_DEFINED["weather"], "undefined")
        for s in scenes:
            for tod in times:
                for w in weathers:
                    text = self.render(self.scene_text(s, tod, w), (), ())
                    n = self.count_tokens(text)
                    if n > CLIP_WINDOW:
                        raise UserError(f"templates: {text!r} alone takes {n} CLIP tokens (> {CLIP_WINDOW})")
