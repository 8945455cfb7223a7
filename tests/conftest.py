"""Test setup: offline by construction, shared fixtures built once per session.

Every test runs with HF_HUB_OFFLINE=1 and YOLO_OFFLINE=true (set before any library import), and with
caches inside the session's temp folder, so nothing reaches for the network or the user's home.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_TMP_HOME = Path(tempfile.mkdtemp(prefix="bdd-sdxl-tests-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["YOLO_OFFLINE"] = "true"
os.environ["YOLO_AUTOINSTALL"] = "false"
os.environ["YOLO_VERBOSE"] = "false"
os.environ["WANDB_MODE"] = "disabled"
os.environ.setdefault(
    "DS_ACCELERATOR", "cpu"
)  # deepspeed (imported by accelerate) would warn it found no GPU
os.environ.setdefault("HF_HOME", str(_TMP_HOME / "hf_home"))
os.environ.setdefault("HF_DATASETS_CACHE", str(_TMP_HOME / "hf_datasets"))
os.environ.setdefault("YOLO_CONFIG_DIR", str(_TMP_HOME / "yolo_config"))
os.environ.setdefault("XDG_CACHE_HOME", str(_TMP_HOME / "xdg_cache"))
os.environ.setdefault("MPLBACKEND", "Agg")
# the user's .env and exported stage variables must not leak into the shipped-config tests
os.environ["BDD_SDXL_ENV_FILE"] = ""
for _name in ("MODEL_DIR", "VAE_DIR", "BDD_DATA_DIR", "YOLO_MODEL"):
    os.environ.pop(_name, None)

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def mini_bdd(tmp_path_factory) -> Path:
    """A small BDD100K in the real layout (train and val, 100k and 10k images, det_20, legacy, sem_seg).

    Small frames (320x180) keep it fast; labels and masks are in that frame's pixels.
    """
    from mini_bdd.make import make_mini_bdd

    out = tmp_path_factory.mktemp("mini_bdd") / "bdd100k"
    make_mini_bdd(out, frames=12, size=(320, 180), seed=0)
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """One CPU thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``): on a
    shared 2-core machine OpenMP threads that wait on each other cost 10x in the inference tests."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """The tiny SDXL folder (ai.common.models preset 'tiny'); a complete folder is reused, not rebuilt."""
    from ai.common.build_model import build_model_folder

    return build_model_folder("tiny", tmp_path_factory.getbasetemp() / "tiny-sdxl")


@pytest.fixture(scope="session")
def model(tiny_sdxl) -> Path:
    """The tiny SDXL folder, under the name the inference tests give their base model."""
    return tiny_sdxl
