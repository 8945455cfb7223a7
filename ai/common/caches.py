"""Disk caches of VAE latents and text-encoder outputs, keyed by content (safetensors, one file per entry).

Keys say exactly what an entry depends on, so a cache folder can be shared by many runs:

* latents: sha256 of the image bytes + the crop plan (bucket, resize, crop offset, flip) + the VAE's identity
  (a hash of its weights) + the encode dtype. Change one image and only that entry is rebuilt; change the
  learning rate and everything is reused. Random crops draw a new crop every epoch, so they cannot be cached:
  the trainers refuse ``crop: random`` with latent caching instead of pairing stale latents with new crops.
  With ``random_flip`` both the plain and the mirrored latent are cached.
* text: sha256 of the caption + both text encoders' identity; stored once per unique caption (BDD captions
  repeat a lot). Caption dropout needs no entry: dropped rows get zero embeddings, as the SDXL pipelines'
  unconditional.

Entries store the VAE posterior's mean and std (a fresh latent is sampled every step, as without the cache).
Files are written atomically, so concurrent writers and killed runs never leave a half entry.

Encoder batches are fixed by the dataset, not by which entries happen to be missing: a batched conv or matmul gives
slightly different bits for a different batch, so batching only the missing entries made an entry's bytes depend on
what a killed run or another node had already written. A batch with any missing entry is encoded whole, so a
resumed or concurrent build (several nodes sharing one cache folder) writes exactly the bytes of a clean one.

Several processes split a build by :class:`Shard`: each encodes every n-th of those fixed batches (round robin over
all of them, so a resumed build's missing batches spread evenly too), and who encodes a batch never changes its
bytes. Images are decoded and cropped in DataLoader workers while the VAE encodes. Hashing the images (every byte of
every image is read) is split the same way, over rows, and the digests gathered (:func:`hash_images`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load, save

from ai.common.data import CropPlan, Geometry, Row, apply_plan, open_image, to_tensor
from core.io import atomic_write_bytes, sha256_bytes

logger = logging.getLogger(__name__)

T = TypeVar("T")
HASH_THREADS = 8  # image reads overlap (hashlib and file reads release the GIL): network file systems need it


class FeatureCache:
    """A folder of ``<kind>/<key[:2]>/<key>.safetensors`` entries."""

    def __init__(self, root: str | Path, kind: str):
        self.root = Path(root) / kind

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str) -> dict[str, torch.Tensor]:
        # entries are small (~0.1-0.3 MB on SDXL): one read beats load_file's mmap set-up by ~3x
        return load(self.path(key).read_bytes())

    def save(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}))

    def keys(self) -> set[str]:
        return {p.stem for p in self.root.glob("*/*.safetensors")}


def module_fingerprint(*modules: torch.nn.Module) -> str:
    """sha256 over the modules' parameters and buffers (names, dtypes, shapes, bytes): the model's identity."""
    h = hashlib.sha256()
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            t = tensor.detach().contiguous().cpu()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def latent_key(image_sha: str, plan: CropPlan, vae_id: str, encode_dtype: str) -> str:
    spec = {"image": image_sha, **plan.key(), "vae": vae_id, "dtype": encode_dtype, "resample": "bicubic"}
    return sha256_bytes(json.dumps(spec, sort_keys=True).encode())


def text_key(caption: str, text_encoder_id: str) -> str:
    return sha256_bytes(json.dumps({"text": caption, "te": text_encoder_id}).encode())


@dataclass(frozen=True)
class Shard:
    """One process's share of a cache build: every ``count``-th item from ``index`` on (round robin)."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index} of {self.count} does not exist")

    def take(self, items: Sequence[T]) -> list[T]:
        return list(items[self.index :: self.count])


def hash_share(rows: Sequence[Row], shard: Shard = Shard(), progress: bool = True) -> list[tuple[int, str]]:
    """(row position, sha256 of its image bytes) for this shard's rows."""
    from tqdm import tqdm

    positions = shard.take(range(len(rows)))
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        digests = pool.map(lambda pos: sha256_bytes(rows[pos].image_bytes()), positions)
        bar = tqdm(digests, total=len(positions), desc="hash images", disable=not progress, leave=False)
        return list(zip(positions, bar, strict=True))


def hash_images(
    rows: Sequence[Row],
    shard: Shard = Shard(),
    gather: Callable[[list], list] | None = None,
    progress: bool = True,
) -> list[str]:
    """sha256 of every row's image bytes (the latent keys). Each process hashes its shard of the rows and
    ``gather`` (accelerate's ``gather_object``: every process's list, concatenated) collects the others'.
    The shards must together cover the rows (one shard per process of the whole run)."""
    pairs = hash_share(rows, shard, progress)
    found = dict(gather(pairs) if gather is not None else pairs)
    if len(found) != len(rows):
        raise RuntimeError(f"hashed {len(found)} of {len(rows)} images: the shards do not cover the rows")
    return [found[pos] for pos in range(len(rows))]


@dataclass
class CacheStats:
    hits: int = 0
    built: int = 0

    def __str__(self) -> str:
        return f"{self.hits} reused, {self.built} built"


class LatentLookup:
    """Dataset hook: (row position, plan) -> cached ``latent_mean``/``latent_std`` (picklable for workers)."""

    def __init__(self, cache: FeatureCache, image_hashes: Sequence[str], vae_id: str, encode_dtype: str):
        self.cache, self.image_hashes, self.vae_id, self.encode_dtype = (
            cache,
            list(image_hashes),
            vae_id,
            encode_dtype,
        )

    def __call__(self, pos: int, plan: CropPlan) -> dict[str, torch.Tensor]:
        key = latent_key(self.image_hashes[pos], plan, self.vae_id, self.encode_dtype)
        entry = self.cache.load(key)
        return {"latent_mean": entry["mean"].float(), "latent_std": entry["std"].float()}


class TextLookup:
    """Dataset hook: caption -> cached ``prompt_embeds``/``pooled_prompt_embeds``."""

    def __init__(self, cache: FeatureCache, text_encoder_id: str):
        self.cache, self.text_encoder_id = cache, text_encoder_id

    def __call__(self, caption: str) -> dict[str, torch.Tensor]:
        entry = self.cache.load(text_key(caption, self.text_encoder_id))
        return {
            "prompt_embeds": entry["prompt_embeds"].float(),
            "pooled_prompt_embeds": entry["pooled"].float(),
        }


class _BatchPixels:
    """Map-style dataset: encoder batch i -> its images decoded, cropped and stacked (runs in DataLoader workers)."""

    def __init__(self, rows: Sequence[Row], batches: list[list[tuple[str, int, CropPlan]]]):
        self.rows, self.batches = rows, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> torch.Tensor:
        pixels = []
        for _, pos, plan in self.batches[i]:
            row = self.rows[pos]
            try:
                pixels.append(to_tensor(apply_plan(open_image(row.image), plan)))
            except OSError as exc:
                raise RuntimeError(f"cannot decode image {row.name or row.index}: {exc}") from exc
        return torch.stack(pixels)


@torch.no_grad()
def build_latent_cache(
    rows: Sequence[Row],
    geometry: Geometry,
    cache: FeatureCache,
    vae,
    vae_id: str,
    batch_size: int = 4,
    store_dtype: torch.dtype = torch.float16,
    progress: bool = True,
    *,
    image_hashes: Sequence[str] | None = None,
    shard: Shard = Shard(),
    num_workers: int = 0,
) -> tuple[list[str], CacheStats]:
    """Encode every (row, possible crop plan) of this ``shard``'s encoder batches whose entry is missing.

    Args:
        image_hashes: the rows' :func:`hash_images` (computed here when not given).
        shard: this process's share of the dataset's fixed encoder batches.
        num_workers: DataLoader workers that decode and crop the images while the VAE encodes.

    Returns:
        The sha256 of every row's image bytes (the dataset's lookup keys) and this shard's hit/build counts.
    """
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    encode_dtype = str(vae.dtype).replace("torch.", "")
    hashes = list(image_hashes) if image_hashes is not None else hash_images(rows, progress=progress)
    by_bucket: dict[tuple, list[tuple[str, int, CropPlan]]] = defaultdict(list)
    for pos, (row, digest) in enumerate(zip(rows, hashes, strict=True)):
        for plan in geometry.possible_plans(row):
            by_bucket[plan.bucket].append((latent_key(digest, plan, vae_id, encode_dtype), pos, plan))
    chunks = [
        items[i : i + batch_size] for items in by_bucket.values() for i in range(0, len(items), batch_size)
    ]
    todo, missing, stats = _missing_chunks(shard.take(chunks), cache, key=lambda item: item[0])
    if not todo:
        return hashes, stats
    loader = DataLoader(
        _BatchPixels(rows, todo),
        batch_size=None,
        num_workers=num_workers,
        pin_memory=vae.device.type == "cuda",
    )
    batches = zip(todo, loader, strict=True)
    for chunk, pixels in tqdm(batches, total=len(todo), desc="cache latents", disable=not progress):
        dist = vae.encode(pixels.to(vae.device, vae.dtype, non_blocking=True)).latent_dist
        for (key, _, _), mean, std in zip(chunk, dist.mean, dist.std, strict=True):
            if key in missing:
                cache.save(key, {"mean": mean.to(store_dtype), "std": std.to(store_dtype)})
                stats.built += 1
    return hashes, stats


def _missing_chunks(
    chunks: list[list], cache: FeatureCache, key: Callable
) -> tuple[list[list], set[str], CacheStats]:
    """The encoder batches with a missing entry (encoded whole, see the module docstring), the missing keys, the hits."""
    stats, todo, missing = CacheStats(), [], set()
    for chunk in chunks:
        absent = {k for k in map(key, chunk) if not cache.has(k)}
        stats.hits += len(chunk) - len(absent)
        if absent:
            todo.append(chunk)
            missing |= absent
    return todo, missing, stats


@torch.no_grad()
def build_text_cache(
    captions: Sequence[str],
    cache: FeatureCache,
    encode: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]],
    text_encoder_id: str,
    batch_size: int = 16,
    store_dtype: torch.dtype = torch.float16,
    progress: bool = True,
    *,
    shard: Shard = Shard(),
) -> CacheStats:
    """Encode each unique caption of this ``shard``'s batches whose entry is missing."""
    from tqdm import tqdm

    unique = sorted(set(captions))
    chunks = [unique[i : i + batch_size] for i in range(0, len(unique), batch_size)]
    todo, missing, stats = _missing_chunks(
        shard.take(chunks), cache, key=lambda caption: text_key(caption, text_encoder_id)
    )
    for batch in tqdm(todo, desc="cache text", disable=not progress or not todo):
        embeds, pooled = encode(batch)
        for caption, e, p in zip(batch, embeds, pooled, strict=True):
            key = text_key(caption, text_encoder_id)
            if key in missing:
                cache.save(key, {"prompt_embeds": e.to(store_dtype), "pooled": p.to(store_dtype)})
                stats.built += 1
    return stats
