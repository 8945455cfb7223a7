"""The real CLIP BPE tokenizer, built offline from the vocabulary file the open-clip-torch wheel ships.

``bpe_simple_vocab_16e6.txt.gz`` is OpenAI CLIP's merge list. From it we write the same ``vocab.json`` and
``merges.txt`` that ``openai/clip-vit-large-patch14`` (SDXL's ``tokenizer/``) carries: 256 byte symbols,
their ``</w>`` forms, 48,894 merges, then ``<|startoftext|>`` and ``<|endoftext|>`` (49,408 entries).
SDXL's ``tokenizer_2`` is the same vocabulary with ``!`` as its pad token.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from functools import lru_cache
from pathlib import Path

from core.io import atomic_write_text

CONTEXT_LENGTH = 77  # CLIP's window, start and end tokens included
NUM_MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bpe_vocab_path() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "open-clip-torch is not installed; it ships CLIP's BPE vocabulary (pip install -r requirements.txt)"
        )
    path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise RuntimeError(f"CLIP vocabulary not found at {path}")
    return path


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode table."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def write_clip_vocab(out_dir: str | os.PathLike) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` into ``out_dir`` (idempotent); returns the folder."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / "vocab.json").is_file() and (out_dir / "merges.txt").is_file():
        return out_dir
    with gzip.open(_bpe_vocab_path(), "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges] + [BOS, EOS]
    atomic_write_text(out_dir / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    atomic_write_text(
        out_dir / "vocab.json", json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False)
    )
    return out_dir


def default_vocab_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bdd-sdxl" / "clip-tokenizer"


def build_clip_tokenizer(out_dir: str | os.PathLike | None = None, pad_token: str = EOS):
    """A ``transformers.CLIPTokenizer`` equal to SDXL's (``pad_token='!'`` for ``tokenizer_2``)."""
    from transformers import CLIPTokenizer

    folder = write_clip_vocab(out_dir or default_vocab_dir())
    # Loaded the way a model folder's tokenizer/ is: from its vocab.json and merges.txt.
    return CLIPTokenizer.from_pretrained(
        str(folder),
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=pad_token,
        model_max_length=CONTEXT_LENGTH,
    )


@lru_cache(maxsize=1)
def shared_tokenizer():
    """One process-wide tokenizer for counting tokens."""
    return build_clip_tokenizer()


def count_tokens(text: str) -> int:
    """Tokens ``text`` takes in CLIP's window, start and end tokens included."""
    return len(shared_tokenizer()(text, add_special_tokens=True)["input_ids"])
