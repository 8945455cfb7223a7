"""core/io.py's streamed safetensors export: canonical bytes, diffusers-loadable folders, and host memory of about
one tensor (not one model) while a model is written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from core import io
from core.cli import UserError

REPO = Path(__file__).resolve().parents[1]


def small_controlnet(**overrides):
    from diffusers import ControlNetModel

    config = dict(
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), layers_per_block=1,
        cross_attention_dim=32, attention_head_dim=4, transformer_layers_per_block=(1, 1), norm_num_groups=8,
        conditioning_embedding_out_channels=(8, 16),
    )  # fmt: skip
    torch.manual_seed(0)
    return ControlNetModel(**{**config, **overrides})


def test_streamed_file_has_the_bytes_of_save_file_then_canonicalize(tmp_path):
    """The streamed writer's bytes equal the previous export's (safetensors' writer, then a sorted header), so the
    fingerprints inference recorded for earlier exports stay valid; mixed dtypes and odd names included."""
    model = small_controlnet()
    for dtype in (torch.float16, torch.float32):
        state = {k: v.to(dtype) for k, v in model.state_dict().items()}
        save_file(state, tmp_path / "reference.safetensors", metadata={"format": "pt"})
        io.canonicalize_safetensors(tmp_path / "reference.safetensors")
        io.save_safetensors(tmp_path / "streamed.safetensors", model.state_dict(), dtype, {"format": "pt"})
        streamed = (tmp_path / "streamed.safetensors").read_bytes()
        assert streamed == (tmp_path / "reference.safetensors").read_bytes(), dtype
    odd = {"Z": torch.arange(6).reshape(2, 3), "a.weight": torch.randn(3, 2).t(), "scalar": torch.tensor(1.5),
           "flag": torch.tensor([True, False]), "empty": torch.zeros(0, 4)}  # fmt: skip
    io.save_safetensors(tmp_path / "odd.safetensors", odd, torch.bfloat16)
    back = load_file(tmp_path / "odd.safetensors")
    assert back.keys() == odd.keys()
    for name, tensor in odd.items():
        want = (
            tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
        )  # ints and bools keep theirs
        assert back[name].dtype == want.dtype and torch.equal(back[name], want), name


def test_saved_model_folder_loads_in_diffusers_and_back_into_the_model(tmp_path):
    from diffusers import ControlNetModel

    model = small_controlnet()
    io.save_model(model, tmp_path / "fp16", torch.float16)
    loaded = ControlNetModel.from_pretrained(tmp_path / "fp16")
    assert loaded.config.block_out_channels == [32, 64] or loaded.config.block_out_channels == (32, 64)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name].to(torch.float16), tensor.to(torch.float16)), name
    io.save_model(model, tmp_path / "again", torch.float16)
    name = "diffusion_pytorch_model.safetensors"
    assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "fp16" / name).read_bytes()

    io.save_model(model, tmp_path / "fp32")  # a checkpoint: the weights as they are
    other = small_controlnet()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    io.load_safetensors_into(other, tmp_path / "fp32" / name)
    assert all(
        torch.equal(a, b)
        for a, b in zip(model.state_dict().values(), other.state_dict().values(), strict=True)
    )
    wider = small_controlnet(cross_attention_dim=64)
    with pytest.raises(UserError, match="has shape"):
        io.load_safetensors_into(wider, tmp_path / "fp32" / name)


# Runs in a fresh process: builds a ~170 MB (fp32) ControlNet, resets the peak resident set size (Linux VmHWM) and
# reports how far above the resident size before the export the peak went while exporting. This counts every
# allocation (torch's CPU allocator, numpy, bytes), which tracemalloc would not.
MEASURE = """
import json, sys, tempfile, torch
from diffusers import ControlNetModel
from core import io

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

model = ControlNetModel(
    block_out_channels=(128, 256, 512), layers_per_block=2, cross_attention_dim=512, attention_head_dim=8,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    transformer_layers_per_block=(1, 1, 1),
)
size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
largest = max(t.numel() * t.element_size() for t in model.state_dict().values())
added = {}
with tempfile.TemporaryDirectory() as out:
    for dtype in ("float16", "float32"):  # the final export, a checkpoint's
        open("/proc/self/clear_refs", "w").write("5")  # the peak restarts from the current resident size
        before = status("VmRSS")
        io.save_model(model, f"{out}/{dtype}", getattr(torch, dtype))
        added[dtype] = status("VmHWM") - before
print(json.dumps({"model": size, "largest": largest, "added": added}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's peak-RSS reset")
def test_exporting_a_model_adds_about_one_tensor_of_host_memory():
    """The export at SDXL size (a 5 GB ControlNet) must not hold copies of the model: a deepcopy, safetensors'
    serialised payload and a whole-file canonicalisation together peaked past 23 GB and killed a finished run."""
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE], cwd=REPO, capture_output=True, text=True, timeout=300, check=True
    )
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["model"] > 150 * 2**20 and got["largest"] < 0.06 * got["model"]  # many tensors, none dominant
    for dtype, added in got["added"].items():
        assert added < 4 * got["largest"], (dtype, got)  # a cast tensor or two, not a model (> 17 x largest)
