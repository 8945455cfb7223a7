"""The Docker image's recipe and self-check, as far as a machine without Docker or a GPU can test them.

The Dockerfile's version pins must be requirements.txt's (the image is what the tests here ran against), every
package it installs must be pinned, and docker/check.sh must run here: print the versions it found, say "no GPU"
and exit with its documented status 3, and (with --train-on-cpu) really train one step with the project's trainer.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
NO_GPU_STATUS = 3


def requirement_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.txt").read_text(encoding="utf-8").splitlines():
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line.split("#")[0].strip())
        if match:
            pins[match.group(1).lower()] = match.group(2)
    return pins


def run_instructions() -> list[str]:
    """The Dockerfile's RUN instructions, continuation lines joined as Docker joins them."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    return [line[4:] for line in text.splitlines() if line.startswith("RUN ")]


def pip_packages() -> list[str]:
    """Every package argument of a `pip install` in the Dockerfile (flags and their values skipped)."""
    packages = []
    for run in run_instructions():
        run = re.sub(
            r"\$\([^)]*\)", "SUBST", run
        )  # a command substitution is one word (the index URL's line)
        for command in re.split(r"&&|;", run):
            words = command.split()
            if words[:2] != ["pip", "install"]:
                continue
            skip_next = False
            for word in words[2:]:
                if skip_next:
                    skip_next = False
                elif word in ("--index-url", "-r", "--requirement", "-c"):
                    skip_next = True
                elif not word.startswith("-"):
                    packages.append(word)
    return packages


def test_dockerfile_pins_equal_requirements():
    pins = requirement_pins()
    packages = pip_packages()
    assert packages, "no `pip install` found in the Dockerfile"
    unpinned = [p for p in packages if "==" not in p and p != "."]
    assert not unpinned, f"unpinned pip installs in the Dockerfile: {unpinned}"
    in_docker = dict(p.lower().split("==", 1) for p in packages if "==" in p)
    # torch and torchvision come from PyTorch's index for the CUDA line: their pins are written in the Dockerfile
    for name in ("torch", "torchvision"):
        assert name in in_docker, f"the Dockerfile does not install {name} for its CUDA line"
    differ = {n: (v, pins[n]) for n, v in in_docker.items() if n in pins and v != pins[n]}
    assert not differ, f"Dockerfile pin != requirements.txt pin (Dockerfile, requirements): {differ}"
    # the rest comes from requirements.txt itself, so it cannot drift
    assert any("-r /tmp/requirements.txt" in run and "grep -v '^-e" in run for run in run_instructions())


def test_dockerfile_has_one_cuda_line_and_pins_apt():
    text = DOCKERFILE.read_text(encoding="utf-8")
    base = re.findall(r"^FROM (\S+)", text, flags=re.M)
    assert len(base) == 1 and "nvidia/cuda" not in base[0], "a CUDA base image would be a second CUDA stack"
    assert re.search(r"^ARG CUDA=\d+\.\d+$", text, flags=re.M), "the CUDA line is a build argument"
    assert 'NVIDIA_REQUIRE_CUDA="cuda>=${CUDA}"' in text  # the toolkit refuses a too-old driver at start
    assert "download.pytorch.org/whl/cu$(" in text  # torch from the index of that same line
    for run in run_instructions():
        for command in run.split("&&"):
            words = command.split()
            if words[:2] == ["apt-get", "install"]:
                packages = [w for w in words[2:] if not w.startswith("-")]
                assert packages and all("=" in p for p in packages), f"unpinned apt packages: {packages}"
                assert "--no-install-recommends" in words


# requirements.txt installs hadolint into the venv, whose bin/ need not be on PATH
HADOLINT = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed (pip install -r requirements.txt)")
def test_dockerfile_passes_hadolint():
    out = subprocess.run([HADOLINT, str(DOCKERFILE)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def run_check(*args: str, **env: str) -> subprocess.CompletedProcess:
    environ = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHON=sys.executable, **env)
    return subprocess.run(
        ["bash", str(REPO / "docker" / "check.sh"), *args],
        capture_output=True,
        text=True,
        env=environ,
        timeout=600,
    )


def test_check_says_no_gpu_and_reports_versions():
    import torch

    out = run_check()
    assert out.returncode == NO_GPU_STATUS, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    # the Python part really imported torch: it prints this interpreter's torch and its CUDA line
    assert any(line.split()[:2] == ["torch", torch.__version__] for line in lines), out.stdout
    assert any(line.split()[:1] == ["driver"] for line in lines)
    assert any(line.split()[:2] == ["GPU", "no"] for line in lines)
    assert any(line.split()[:1] == ["bitsandbytes"] and "installed" in line for line in lines), out.stdout
    assert any(line.split()[:1] == ["xformers"] for line in lines)
    assert lines[-1].startswith("no GPU:") and f"exit status {NO_GPU_STATUS}" in lines[-1]
    assert "train step" not in out.stdout  # nothing trains without a GPU unless asked


@pytest.mark.slow
def test_check_trains_one_step_on_cpu_when_asked(tmp_path):
    out = run_check("--train-on-cpu", "--keep", str(tmp_path))
    assert out.returncode == NO_GPU_STATUS, out.stdout + out.stderr
    step = [line for line in out.stdout.splitlines() if line.split()[:2] == ["train", "step"]]
    assert step and "trained and exported" in step[0], out.stdout
    exported = tmp_path / "runs" / "check" / "pytorch_lora_weights.safetensors"
    assert exported.is_file() and exported.stat().st_size > 0


@pytest.mark.slow
def test_check_fails_with_status_1_when_the_step_fails(tmp_path):
    (tmp_path / "runs").write_text("a file where the run folder goes")  # the trainer cannot write its run
    out = run_check("--train-on-cpu", "--keep", str(tmp_path))
    assert out.returncode == 1, out.stdout + out.stderr
    step = [line for line in out.stdout.splitlines() if line.split()[:2] == ["train", "step"]]
    assert step and step[0].split()[2:4] == ["failed", "(CPU,"], out.stdout
