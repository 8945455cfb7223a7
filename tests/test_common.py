"""ai/common plumbing without torch: config loading and errors, atomic writes, the CLIP tokenizer, the CLI."""

from __future__ import annotations

import os
from typing import Literal

import pytest
from pydantic import Field

from core import io
from core.cli import UserError, run_main
from core.config import Section, apply_overrides, config_diff, load_config, parse_override


class Optim(Section):
    learning_rate: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)


class Train(Section):
    mixed_precision: Literal["no", "fp16", "bf16"] = "bf16"
    max_steps: int = Field(100, gt=0)


class Cfg(Section):
    optim: Optim = Optim()
    train: Train = Train()


def test_all_errors_at_once_with_paths_and_did_you_mean(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  learnin_rate: 1e-4\ntrain:\n  mixed_precision: fp32\n  max_steps: 0\nfoo: 1\n")
    with pytest.raises(UserError) as err:
        load_config(Cfg, path)
    lines = str(err.value).splitlines()
    assert lines[0] == f"{path}: invalid config"
    assert "  optim.learnin_rate: unknown key (did you mean 'learning_rate'?)" in lines
    assert "  train.mixed_precision: Input should be 'no', 'fp16' or 'bf16' (got 'fp32')" in lines
    assert "  train.max_steps: Input should be greater than 0 (got 0)" in lines
    assert "  foo: unknown key (valid keys here: optim, train)" in lines


def test_overrides_are_dotted_and_typed():
    cfg = load_config(Cfg, None, ["optim.learning_rate=1e-5", "train.max_steps=5", "optim.betas=[0.8, 0.9]"])
    assert cfg.optim.learning_rate == 1e-5 and cfg.train.max_steps == 5 and cfg.optim.betas == (0.8, 0.9)
    assert parse_override("a.b=1e-4") == (["a", "b"], 1e-4)
    assert apply_overrides({"a": {"x": 1}}, ["a.y=2"]) == {"a": {"x": 1, "y": 2}}
    with pytest.raises(UserError, match="not key=value.*did you mean train.max_steps=5"):
        parse_override("--train.max_steps 5")
    with pytest.raises(UserError, match="a is a value, not a section"):
        apply_overrides({"a": 1}, ["a.b=2"])
    with pytest.raises(UserError, match=r"override 'train.args=\{epochs:': the value is not valid YAML"):
        parse_override("train.args={epochs:")  # what the shell leaves of an unquoted {epochs: 3}


def test_bad_yaml_and_missing_config(tmp_path):
    with pytest.raises(UserError, match="config not found"):
        load_config(Cfg, tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(UserError, match="bad.yaml: not valid YAML"):
        load_config(Cfg, bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(UserError, match="top level must be a mapping"):
        load_config(Cfg, listy)


def test_config_diff_names_changed_dotted_keys():
    assert config_diff({"a": {"x": 1, "y": 2}, "b": 3}, {"a": {"x": 1, "y": 5}, "c": 3}) == ["a.y", "b", "c"]


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "out.txt"
    io.atomic_write_text(target, "hello")
    assert target.read_text() == "hello"

    class Boom(Exception):
        pass

    with pytest.raises(Boom), io.atomic_open(target) as fh:
        fh.write("half")
        raise Boom
    assert target.read_text() == "hello"
    assert sorted(os.listdir(tmp_path)) == ["out.txt"]


def test_atomic_dir_replaces_only_when_complete(tmp_path):
    final = tmp_path / "checkpoint-10"
    with io.atomic_dir(final) as tmp:
        (tmp / "a.bin").write_bytes(b"1")
    assert (final / "a.bin").read_bytes() == b"1"
    with pytest.raises(RuntimeError), io.atomic_dir(final) as tmp:
        (tmp / "a.bin").write_bytes(b"2")
        raise RuntimeError("killed mid-save")
    assert (final / "a.bin").read_bytes() == b"1"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-10"]
    assert io.sha256_file(final / "a.bin") == io.sha256_bytes(b"1")


def test_run_main_maps_user_error_to_exit_2(capsys):
    def main(argv):
        raise UserError("labels file not found: x.json")

    assert run_main(main, []) == 2
    assert capsys.readouterr().err == "error: labels file not found: x.json\n"
    assert run_main(lambda argv: None, []) == 0


def test_clip_tokenizer_is_openai_clip(tmp_path):
    from vocab.clip_tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer(tmp_path / "tok")
    # ids of openai/clip-vit-large-patch14 for this sentence
    assert tok("a photo of a cat")["input_ids"] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tok) == 49408
    tok2 = build_clip_tokenizer(tmp_path / "tok", pad_token="!")
    assert tok2("a cat", padding="max_length", max_length=6)["input_ids"] == [49406, 320, 2368, 49407, 0, 0]
    long = tok("car " * 100, truncation=True, max_length=77)["input_ids"]
    assert len(long) == 77 and long[-1] == 49407


def test_stage_scripts_import_without_torch():
    """The launchers run each script's --check before accelerate: it must not pay torch's import (seconds)."""
    import subprocess
    import sys

    modules = ("ai.lora.train_lora_sdxl", "ai.lora.infer_lora_sdxl", "ai.controlnet.train_controlnet_sdxl",
               "ai.controlnet.infer_controlnet_sdxl")  # fmt: skip
    code = f"import sys; import {', '.join(modules)}; print(sorted(m for m in ('torch', 'diffusers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_streamed_canonicalisation_gives_the_bytes_of_the_whole_file_rewrite(tmp_path):
    """canonicalize_safetensors copies the data section in chunks now; the bytes are those of rewriting the whole
    file in memory (the previous implementation, inlined here), and a canonical file is left as it is."""
    import json
    import shutil
    import struct

    import numpy as np
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(0)
    tensors = {f"block{i}.{kind}": rng.standard_normal((i + 1, 7)).astype(np.float32)
               for i in range(40) for kind in ("weight", "bias")}  # fmt: skip
    tensors["Upper"] = np.arange(5, dtype=np.int64)
    raw = tmp_path / "raw.safetensors"
    save_file(tensors, raw, metadata={"format": "pt"})

    def whole_file(path):
        data = path.read_bytes()
        n = struct.unpack("<Q", data[:8])[0]
        header = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        path.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + n :])

    want, got = tmp_path / "want.safetensors", tmp_path / "got.safetensors"
    shutil.copy(raw, want)
    shutil.copy(raw, got)
    whole_file(want)
    assert want.read_bytes() != raw.read_bytes()  # the writer's header order is not the sorted one
    io.canonicalize_safetensors(got, chunk=1000)  # many chunks, none aligned to a tensor
    assert got.read_bytes() == want.read_bytes()
    back = load_file(got)
    assert back.keys() == tensors.keys() and all(np.array_equal(back[k], v) for k, v in tensors.items())
    before = got.stat().st_mtime_ns
    io.canonicalize_safetensors(got)
    assert got.stat().st_mtime_ns == before and got.read_bytes() == want.read_bytes()


def test_resume_accepts_a_key_added_after_the_checkpoint_only_at_its_default(tmp_path):
    """A checkpoint written before a key existed (here controlnet.layout) resumes when the run leaves that key at
    its default (the behaviour the checkpoint trained with), and is refused when the run sets it otherwise."""
    import json

    import yaml

    from ai.common import checkpoints
    from ai.common.train_config import RESUME_FREE_KEYS
    from ai.controlnet.train_controlnet_sdxl import Config

    base = {"data": {"train_csv": "train.csv"}, "validation": {"loss_rows": 2}}
    cfg = Config.model_validate(base)
    old = cfg.model_dump(mode="json")
    del old["controlnet"]["layout"]  # as written before the key existed
    ckpt = tmp_path / "checkpoint-10"
    ckpt.mkdir()
    (ckpt / checkpoints.CONFIG_FILE).write_text(yaml.safe_dump(old))
    (ckpt / checkpoints.STATE_FILE).write_text(
        json.dumps({"step": 10, "epoch": 0, "batch": 10, "world_size": 1})
    )

    checkpoints.check_resume_compatible(ckpt, cfg.model_dump(mode="json"), RESUME_FREE_KEYS, 1, schema=Config)
    boxes = Config.model_validate({**base, "controlnet": {"layout": "boxes"}})
    with pytest.raises(UserError, match=r"controlnet.layout \(None -> 'boxes'\)"):
        checkpoints.check_resume_compatible(
            ckpt, boxes.model_dump(mode="json"), RESUME_FREE_KEYS, 1, schema=Config
        )
    with pytest.raises(UserError, match="controlnet.layout"):  # without the schema: every difference counts
        checkpoints.check_resume_compatible(ckpt, cfg.model_dump(mode="json"), RESUME_FREE_KEYS, 1)


def test_read_jsonl_numbers_lines_skips_blanks_and_is_strict_or_tolerant(tmp_path):
    from core.io import read_jsonl

    path = tmp_path / "m.jsonl"
    path.write_text('{"a": 1}\n\n[2]\n{"torn": \n')
    assert list(read_jsonl(path, tolerant=True)) == [(1, {"a": 1}), (3, [2])]
    with pytest.raises(UserError, match=r"m\.jsonl:4: not valid JSON .*each line must be a scene"):
        list(read_jsonl(path, what="a scene"))
