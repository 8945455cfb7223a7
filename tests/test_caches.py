"""ai/common/caches.py: content-keyed latent and text caches: hits, misses, invalidation of exactly one entry."""

from __future__ import annotations

import pytest
import torch
from sdxl_fixtures import make_image_csv, write_image

from ai.common import caches, data, diffusion


@pytest.fixture(scope="module")
def components(tiny_sdxl):
    from ai.common.models import load_components

    return load_components(tiny_sdxl)


def _setup(comps, tmp_path, flip=False):
    rows = data.load_rows(make_image_csv(tmp_path / "imgs", n=4)).rows
    geo = data.Geometry(tuple(data.sdxl_buckets(128, 16)), "center", flip, seed=0)
    return comps, rows, geo


def test_latent_cache_hits_misses_and_rebuilds_only_the_changed_image(components, tmp_path):
    comps, rows, geo = _setup(components, tmp_path)
    cache = caches.FeatureCache(tmp_path / "cache", "latents")
    vae_id = caches.module_fingerprint(comps.vae)
    hashes, stats = caches.build_latent_cache(rows, geo, cache, comps.vae, vae_id, progress=False)
    assert (stats.hits, stats.built) == (0, 4) and len(cache.keys()) == 4
    before = cache.keys()
    _, stats = caches.build_latent_cache(rows, geo, cache, comps.vae, vae_id, progress=False)
    assert (stats.hits, stats.built) == (4, 0)  # a second run (any other settings) reuses everything
    write_image(tmp_path / "imgs" / "img02.jpg", (320, 180), seed=99)  # change one image
    rows = data.load_rows(tmp_path / "imgs" / "train.csv").rows
    new_hashes, stats = caches.build_latent_cache(rows, geo, cache, comps.vae, vae_id, progress=False)
    assert (stats.hits, stats.built) == (3, 1)
    assert len(cache.keys() - before) == 1
    assert [a == b for a, b in zip(hashes, new_hashes, strict=True)] == [True, True, False, True]
    # the dataset serves the cached posterior of exactly its own crop
    ds = data.SDXLDataset(rows, geo, latent_lookup=caches.LatentLookup(cache, new_hashes, vae_id, "float32"))
    item = ds[(2, 0)]
    plan = geo.plan(rows[2], 0)
    px = data.to_tensor(data.apply_plan(data.open_image(rows[2].image), plan))[None]
    with torch.no_grad():
        mean = comps.vae.encode(px).latent_dist.mean[0]
    torch.testing.assert_close(item["latent_mean"], mean, atol=2e-3, rtol=1e-3)  # stored as float16
    assert item["latent_mean"].shape == (4, 96 // 8, 160 // 8) and "pixel_values" not in item


def entry_bytes(cache: caches.FeatureCache) -> dict[str, bytes]:
    return {key: cache.path(key).read_bytes() for key in sorted(cache.keys())}


def test_a_resumed_build_writes_the_bytes_of_a_clean_build(components, tmp_path):
    # A batched conv gives other bits for another batch, so entries rebuilt after a killed run (or by another node
    # sharing the cache) must be encoded in the same batches as a clean build, not batched among the missing ones.
    comps, _, geo = _setup(components, tmp_path)
    one_bucket = make_image_csv(tmp_path / "one_bucket", n=5, sizes=((320, 180),))
    rows = data.load_rows(one_bucket).rows  # encoded in batches of 4 + 1
    vae_id = caches.module_fingerprint(comps.vae)
    clean = caches.FeatureCache(tmp_path / "clean", "latents")
    caches.build_latent_cache(rows, geo, clean, comps.vae, vae_id, store_dtype=torch.float32, progress=False)
    resumed = caches.FeatureCache(tmp_path / "resumed", "latents")
    caches.build_latent_cache(
        rows, geo, resumed, comps.vae, vae_id, store_dtype=torch.float32, progress=False
    )
    first_batch = [caches.latent_key(caches.sha256_bytes(r.image_bytes()), geo.plan(r, 0), vae_id, "float32")
                   for r in rows[:4]]  # fmt: skip
    resumed.path(first_batch[1]).unlink()  # the run was killed before writing this one
    _, stats = caches.build_latent_cache(
        rows, geo, resumed, comps.vae, vae_id, store_dtype=torch.float32, progress=False
    )
    assert (stats.hits, stats.built) == (4, 1)
    assert entry_bytes(resumed) == entry_bytes(clean)


def test_other_vae_or_flip_variants_get_their_own_entries(components, tmp_path):
    comps, rows, geo = _setup(components, tmp_path, flip=True)
    cache = caches.FeatureCache(tmp_path / "cache", "latents")
    _, stats = caches.build_latent_cache(rows, geo, cache, comps.vae, "vae-a", progress=False)
    assert stats.built == 8  # plain + mirrored per image
    _, stats = caches.build_latent_cache(rows, geo, cache, comps.vae, "vae-b", progress=False)
    assert (stats.hits, stats.built) == (0, 8)


def test_text_cache_stores_each_caption_once(components, tmp_path):
    comps, rows, _ = _setup(components, tmp_path)
    cache = caches.FeatureCache(tmp_path / "cache", "text")
    tes, toks = [comps.text_encoder, comps.text_encoder_2], [comps.tokenizer, comps.tokenizer_2]
    te_id = caches.module_fingerprint(*tes)

    def encode(prompts):
        return diffusion.encode_prompts(tes, toks, prompts)

    captions = [r.text for r in rows]  # 4 rows, 3 distinct captions: one entry each (none for dropout)
    stats = caches.build_text_cache(captions, cache, encode, te_id, progress=False)
    assert (stats.hits, stats.built) == (0, 3) and len(cache.keys()) == 3
    stats = caches.build_text_cache(captions + ["a new caption"], cache, encode, te_id, progress=False)
    assert (stats.hits, stats.built) == (3, 1)
    # a rebuilt entry is encoded in its clean build's batch, so its bytes match (see the latent test above)
    before = entry_bytes(cache)
    cache.path(caches.text_key(captions[0], te_id)).unlink()
    stats = caches.build_text_cache(captions + ["a new caption"], cache, encode, te_id, progress=False)
    assert (stats.hits, stats.built) == (3, 1)
    assert entry_bytes(cache) == before
    got = caches.TextLookup(cache, te_id)(captions[0])
    want_e, want_p = encode([captions[0]])
    torch.testing.assert_close(got["prompt_embeds"], want_e[0].detach(), atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(got["pooled_prompt_embeds"], want_p[0].detach(), atol=2e-3, rtol=1e-3)


def test_module_fingerprint_follows_the_weights(tiny_sdxl):
    from ai.common.models import load_components

    vae = load_components(tiny_sdxl).vae
    a = caches.module_fingerprint(vae)
    assert a == caches.module_fingerprint(vae)
    with torch.no_grad():
        next(vae.parameters()).add_(1e-3)
    assert caches.module_fingerprint(vae) != a


def test_processes_sharing_a_build_write_the_bytes_of_one_process(components, tmp_path):
    """Two processes (shards) split the hashing and the fixed encoder batches between them; together they write
    exactly the entries and bytes of one process's build, latents (decoded in DataLoader workers) and text alike."""
    comps, _, geo = _setup(components, tmp_path, flip=True)
    rows = data.load_rows(
        make_image_csv(tmp_path / "more", n=10)
    ).rows  # 3 buckets x (plain, mirrored): 6 batches
    vae_id = caches.module_fingerprint(comps.vae)
    kwargs = dict(store_dtype=torch.float32, progress=False)
    one = caches.FeatureCache(tmp_path / "one", "latents")
    want_hashes, _ = caches.build_latent_cache(rows, geo, one, comps.vae, vae_id, **kwargs)

    shards = [caches.Shard(i, 2) for i in range(2)]
    pairs = [caches.hash_share(rows, s, progress=False) for s in shards]
    assert sorted(p for share in pairs for p, _ in share) == list(range(len(rows)))  # each row hashed once
    assert all(share for share in pairs)
    hashes = caches.hash_images(rows, shards[1], gather=lambda mine: pairs[0] + mine, progress=False)
    assert hashes == want_hashes
    with pytest.raises(RuntimeError, match="hashed 5 of 10 images"):
        caches.hash_images(rows, shards[0], progress=False)  # a shard alone, nothing gathered

    two = caches.FeatureCache(tmp_path / "two", "latents")
    built = [
        caches.build_latent_cache(rows, geo, two, comps.vae, vae_id, image_hashes=hashes, shard=s,
                                  num_workers=workers, **kwargs)[1].built
        for s, workers in zip(shards, (0, 2), strict=True)
    ]  # fmt: skip
    assert all(built) and sum(built) == 2 * len(rows)  # both shards encoded, every entry once
    assert entry_bytes(two) == entry_bytes(one)

    tes, toks = [comps.text_encoder, comps.text_encoder_2], [comps.tokenizer, comps.tokenizer_2]
    te_id = caches.module_fingerprint(*tes)
    captions = [f"caption {i}" for i in range(8)]  # 4 batches of 2

    def encode(prompts):
        return diffusion.encode_prompts(tes, toks, prompts)

    one_text = caches.FeatureCache(tmp_path / "one", "text")
    caches.build_text_cache(captions, one_text, encode, te_id, batch_size=2, **kwargs)
    two_text = caches.FeatureCache(tmp_path / "two", "text")
    built = [caches.build_text_cache(captions, two_text, encode, te_id, batch_size=2, shard=s, **kwargs).built
             for s in shards]  # fmt: skip
    assert built == [4, 4]
    assert entry_bytes(two_text) == entry_bytes(one_text)


def test_shards_deal_batches_round_robin():
    items = list(range(7))
    shares = [caches.Shard(i, 3).take(items) for i in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert caches.Shard().take(items) == items
    with pytest.raises(ValueError, match="shard 2 of 2"):
        caches.Shard(2, 2)
