"""Val leaks: training images that are val frames, or were generated from them, are refused before any training.

Three ways a val frame reaches a training arm, each caught here:

* **file identity**: a real-train or synthetic image that is a val image under another path (a hard link, a
  symlink, the same path): same device and inode (what ``os.path.samefile`` compares);
* **content**: a byte-for-byte copy: the same sha256. Only images whose byte size equals some val image's are
  hashed (and each val image of such a size once), so at 70k train frames this costs one ``stat`` per image plus
  the hashing of the few size collisions (typically well under a second; the count is printed);
* **source frame** (synthetic only): the real frame a generation was made from, read from stage 4's records
  beside the synthetic data.yaml (``manifest.csv``'s ``source_frame`` column when it has one, ``manifest.jsonl``'s
  ``source_frame`` / ``layout.source_frame``) and from the generation records (``metadata.jsonl`` beside each
  generated image: ``source_frame`` of a mask generation, ``plan_source_frame`` of a planned scene), matched by
  frame stem against the val frames. A generation from a val frame carries that frame's layout and labels: trained
  on, it inflates the gain measured on the same frames.

Pure file reading; no ultralytics.
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from annotation.gain.data import DataYaml, Item
from core.cli import UserError
from core.io import read_jsonl, sha256_file
from vocab import bdd

MANIFEST_JSONL, MANIFEST_CSV, METADATA_FILE = "manifest.jsonl", "manifest.csv", "metadata.jsonl"
#: how many offending images a message names
SHOWN = 3


@dataclass
class LeakCheck:
    """What the check looked at, for the run's printed line."""

    images: int = 0
    hashed: int = 0
    seconds: float = 0.0
    with_source: int = 0  # synthetic images whose source frame is known
    without_source: list[str] = field(default_factory=list)  # keys of those whose source frame is unknown


class ValIndex:
    """The val images by inode and by byte size; their sha256 computed on demand, once each."""

    def __init__(self, val: Sequence[Item]):
        self.inodes: dict[tuple[int, int], Item] = {}
        self.by_size: dict[int, list[Item]] = {}
        self._digests: dict[Path, str] = {}
        self.hashed = 0
        for item in val:
            st = item.image.stat()
            self.inodes[(st.st_dev, st.st_ino)] = item
            self.by_size.setdefault(st.st_size, []).append(item)

    def digest(self, path: Path) -> str:
        if path not in self._digests:
            self._digests[path] = sha256_file(path)
            self.hashed += 1
        return self._digests[path]

    def match(self, image: Path) -> tuple[str, Item] | None:
        """('same file', val item) or ('same content', val item) when ``image`` is a val image, else None."""
        st = image.stat()
        same = self.inodes.get((st.st_dev, st.st_ino))
        if same is not None:
            return "same file", same
        candidates = self.by_size.get(st.st_size)
        if not candidates:
            return None
        digest = self.digest(image)
        for item in candidates:
            if self.digest(item.image) == digest:
                return "same content", item
        return None


def identical_to_val(items: Iterable[Item], index: ValIndex) -> list[tuple[Item, str, Item]]:
    """(item, 'same file' | 'same content', the val item) for every item that is a val image."""
    found = []
    for item in items:
        hit = index.match(item.image)
        if hit is not None:
            found.append((item, *hit))
    return found


# ---------------------------------------------------------------------------------------------------------------
# Source frames of the synthetic images
# ---------------------------------------------------------------------------------------------------------------


def metadata_sources(folder: Path, cache: dict[Path, dict[str, set[str]]]) -> dict[str, set[str]]:
    """file name -> source frame names in ``folder``'s metadata.jsonl (``source_frame``, ``plan_source_frame``)."""
    if folder not in cache:
        found: dict[str, set[str]] = {}
        path = folder / METADATA_FILE
        if path.is_file():
            # stage 4 reports broken records; here a line without a frame adds nothing
            for _, rec in read_jsonl(path, tolerant=True):
                if isinstance(rec, dict) and isinstance(rec.get("file"), str):
                    frames = {rec.get(k) for k in ("source_frame", "plan_source_frame")}
                    found[os.path.basename(rec["file"])] = {f for f in frames if isinstance(f, str) and f}
        cache[folder] = found
    return cache[folder]


def manifest_sources(root: Path) -> dict[str, tuple[set[str], Path | None]]:
    """Stage 4's records beside the synthetic data.yaml: output image stem (``<split>/<out_stem>``) -> (source
    frames it names, the generated image it was made from)."""
    out: dict[str, tuple[set[str], Path | None]] = {}
    path = root / MANIFEST_JSONL
    if path.is_file():
        for _, rec in read_jsonl(path, tolerant=True):
            if not isinstance(rec, dict) or not rec.get("out_stem"):
                continue
            frames = {rec.get("source_frame"), (rec.get("layout") or {}).get("source_frame")}
            source = Path(rec["source"]) if isinstance(rec.get("source"), str) else None
            key = f"{rec.get('split') or ''}/{rec['out_stem']}"
            out[key] = ({f for f in frames if isinstance(f, str) and f}, source)
    path = root / MANIFEST_CSV
    if path.is_file():
        with path.open(encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            if "source_frame" in (reader.fieldnames or []):
                for row in reader:
                    key = f"{row.get('split') or ''}/{row.get('out_stem') or ''}"
                    frames, source = out.get(key, (set(), None))
                    if row["source_frame"]:
                        frames = frames | {row["source_frame"]}
                    if source is None and row.get("source"):
                        source = Path(row["source"])
                    out[key] = (frames, source)
    return out


def source_frames(syn_yaml: DataYaml, items: Sequence[Item]) -> dict[str, set[str] | None]:
    """item key -> the stems of the frames it was generated from (None: no record names one)."""
    manifest = manifest_sources(syn_yaml.path.parent)
    if syn_yaml.root != syn_yaml.path.parent.resolve():
        manifest = {**manifest_sources(syn_yaml.root), **manifest}
    cache: dict[Path, dict[str, set[str]]] = {}
    out: dict[str, set[str] | None] = {}
    for item in items:
        split = item.image.parent.name
        frames, source = manifest.get(f"{split}/{item.image.stem}", (set(), None))
        frames = set(frames)
        for image in (source, item.image):  # the generation's own record, then one beside the listed image
            if image is not None:
                frames |= metadata_sources(image.parent, cache).get(image.name, set())
        out[item.key] = {bdd.stem(f) for f in frames} if frames else None
    return out


# ---------------------------------------------------------------------------------------------------------------
# All checks, one error per kind of leak
# ---------------------------------------------------------------------------------------------------------------


def check_no_val_leaks(
    real: Sequence[Item], synthetic: Sequence[Item], val: Sequence[Item], syn_yaml: DataYaml
) -> LeakCheck:
    """Refuse real-train or synthetic images that are val images (file identity or content), and synthetic images
    generated from a val frame. Returns what was checked (counts, hashing cost)."""
    t0 = time.perf_counter()
    index = ValIndex(val)
    for flag, items, what in (("--real", real, "real train"), ("--synthetic", synthetic, "synthetic")):
        found = identical_to_val(items, index)
        if found:
            kinds = sorted({kind for _, kind, _ in found})
            shown = "; ".join(f"{i.image} = {v.image} ({kind})" for i, kind, v in found[:SHOWN])
            raise UserError(
                f"{flag} and --val: {len(found)} {what} image(s) are val images ({' or '.join(kinds)}: a hard "
                f"link, a symlink or a copy; first: {shown}): a model trained on them has seen the frames it is "
                f"scored on. Remove them from {flag}'s set (or point --val at other frames)"
            )
    check = LeakCheck(images=len(real) + len(synthetic) + len(val))
    val_stems = {bdd.stem(i.image.name) for i in val}
    sources = source_frames(syn_yaml, synthetic)
    leaked = sorted(
        (key, sorted(frames & val_stems)) for key, frames in sources.items() if frames and frames & val_stems
    )
    if leaked:
        shown = "; ".join(f"{k} from {', '.join(f)}" for k, f in leaked[:SHOWN])
        raise UserError(
            f"--synthetic: {len(leaked)} of {len(synthetic)} synthetic image(s) were generated from val frames "
            f"(their source_frame in stage 4's manifest or the generation's metadata.jsonl is a --val frame; first: "
            f"{shown}): they carry those frames' layouts and labels, which inflates the gain measured on them. "
            "Generate the synthetic set from train frames only (plans from the train split, masks of the train "
            "split) or drop these images from the synthetic set"
        )
    check.with_source = sum(v is not None for v in sources.values())
    check.without_source = sorted(k for k, v in sources.items() if v is None)
    check.hashed, check.seconds = index.hashed, time.perf_counter() - t0
    return check
