"""SDXL LoRA training end to end on the tiny model (CPU): launcher, checkpoints, resume, DDP, exports, bad inputs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from sdxl_fixtures import make_image_csv, run_launcher, watch_text_encoder_release

from core.cli import UserError

REPO = Path(__file__).resolve().parents[1]


def write_config(path: Path, model: Path, csv: Path, runs: Path, name: str, **sections) -> Path:
    cfg = {
        "model": {"pretrained_model": str(model)},
        "data": {"train_csv": str(csv), "resolution": 128, "bucket_step": 16, "num_workers": 0},
        "cache": {"dir": str(runs / "cache"), "dtype": "float32"},
        "lora": {"rank": 4, "alpha": 4},
        "optim": {"learning_rate": 1.0e-3, "lr_warmup_steps": 0},
        "train": {"max_train_steps": 4, "batch_size": 1, "mixed_precision": "no"},
        "checkpoint": {"every_n_steps": 2, "total_limit": None},
        "validation": {"every_n_steps": 0},
        "log": {"report_to": "none"},
        "output": {"runs_dir": str(runs), "name": name},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def launch(
    config: Path, accelerate_config: str, *overrides: str, timeout: int = 300, env: dict | None = None
) -> subprocess.CompletedProcess:
    """ai/lora/run_lora_train.sh with ``accelerate_config`` and extra environment variables (``env``)."""
    return run_launcher(
        "ai/lora/run_lora_train.sh", config, *overrides, accelerate_config=accelerate_config, timeout=timeout,
        **(env or {}),
    )  # fmt: skip


def run_inprocess(config: Path, *overrides: str) -> int:
    from ai.lora.train_lora_sdxl import main

    return main(["--config", str(config), *overrides])


def lora_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path)


@pytest.mark.slow
def test_launcher_trains_learns_checkpoints_and_exports(tiny_sdxl, tmp_path):
    import numpy as np
    import torch
    from diffusers import StableDiffusionXLPipeline

    csv = make_image_csv(tmp_path / "data", n=4)
    cfg = write_config(
        tmp_path / "train.yaml", tiny_sdxl, csv, tmp_path / "runs", "e2e",
        lora={"rank": 8, "alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out",
                                                       "ff.net.0.proj", "ff.net.2"]},
        loss={"snr_gamma": None, "timestep_min": 500},
        train={"max_train_steps": 12, "batch_size": 2},
        checkpoint={"every_n_steps": 4, "total_limit": 2},
        validation={"every_n_steps": 12, "loss_csv": str(csv), "prompts": ["a street"], "seeds": [3],
                    "num_inference_steps": 2, "width": 128, "height": 128},
        log={"report_to": "tensorboard"},
    )  # fmt: skip
    proc = launch(cfg, "config/accelerate_config_cpu.yaml", "optim.learning_rate=1e-2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "e2e"
    assert "config OK" in proc.stdout and "effective batch" in proc.stderr
    # checkpoints: total_limit keeps the newest two, no temporary folders left
    assert sorted(p.name for p in run.iterdir() if "checkpoint" in p.name) == [
        "checkpoint-12",
        "checkpoint-8",
    ]
    state = json.loads((run / "checkpoint-8" / "train_state.json").read_text())
    assert state == {"epoch": 2, "batch": 2, "step": 8, "world_size": 1}  # 2 buckets x 1 batch of 2 per epoch
    assert (
        yaml.safe_load((run / "checkpoint-8" / "config.resolved.yaml").read_text())["optim"]["learning_rate"]
        == 0.01
    )
    for name in (
        "pytorch_lora_weights.safetensors",
        "pytorch_lora_weights_kohya.safetensors",
        "loss_curve.png",
    ):
        assert (run / name).stat().st_size > 0
    assert (run / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert (run / "validation" / "step-000012" / "prompt00_seed3.png").is_file()
    assert list((run / "logs").rglob("events.out.tfevents*"))
    # learning: the deterministic loss (fixed noise and timesteps) on the training images drops clearly
    val = [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_loss" in m]
    assert [m["step"] for m in val] == [0, 12]
    assert val[1]["val_loss"] < 0.95 * val[0]["val_loss"], val
    # the LoRA changes the images, and the kohya copy gives the same image as the diffusers file
    kohya = lora_tensors(run / "pytorch_lora_weights_kohya.safetensors")
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in kohya)
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {8.0}

    def image(weight_name):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
        if weight_name:
            pipe.load_lora_weights(run, weight_name=weight_name)
        gen = torch.Generator().manual_seed(0)
        return pipe(
            "a street", num_inference_steps=2, width=64, height=64, generator=gen, output_type="np"
        ).images[0]

    base, diffusers_img, kohya_img = (
        image(None),
        image("pytorch_lora_weights.safetensors"),
        image("pytorch_lora_weights_kohya.safetensors"),
    )
    assert np.abs(diffusers_img - base).max() > 1e-3
    np.testing.assert_allclose(kohya_img, diffusers_img, atol=1e-5)


@pytest.mark.slow
def test_resume_mid_epoch_gives_the_same_weights(tiny_sdxl, tmp_path):
    import torch

    csv = make_image_csv(tmp_path / "data", n=6)  # 6 rows, batch 1: an epoch is 6 steps
    runs = tmp_path / "runs"
    cfg = write_config(tmp_path / "a.yaml", tiny_sdxl, csv, runs, "full", train={"max_train_steps": 8},
                       checkpoint={"every_n_steps": 3})  # fmt: skip
    assert run_inprocess(cfg) == 0
    state = json.loads((runs / "full" / "checkpoint-3" / "train_state.json").read_text())
    assert (state["epoch"], state["batch"]) == (0, 3)  # mid-epoch
    assert (
        run_inprocess(cfg, "output.name=resumed", f"checkpoint.resume_from={runs / 'full' / 'checkpoint-3'}")
        == 0
    )
    full = lora_tensors(runs / "full" / "pytorch_lora_weights.safetensors")
    resumed = lora_tensors(runs / "resumed" / "pytorch_lora_weights.safetensors")
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    ckpt3 = lora_tensors(runs / "full" / "checkpoint-3" / "pytorch_lora_weights.safetensors")
    assert not all(torch.equal(full[k], ckpt3[k]) for k in full)  # training moved on after step 3
    # a changed learning rate is refused, naming the key
    with pytest.raises(UserError, match=r"optim\.learning_rate \(0\.001 -> 0\.002\)"):
        run_inprocess(cfg, "checkpoint.resume_from=latest", "optim.learning_rate=2e-3", "--check")


@pytest.mark.slow
def test_two_processes_on_one_node_and_on_two_nodes_train_the_same_weights(tiny_sdxl, tmp_path):
    import socket

    import torch

    csv = make_image_csv(tmp_path / "data", n=6)
    cfg = write_config(tmp_path / "ddp.yaml", tiny_sdxl, csv, tmp_path / "runs", "ddp",
                       train={"max_train_steps": 2}, checkpoint={"every_n_steps": 2})  # fmt: skip
    proc = launch(cfg, "config/accelerate_config_cpu_2proc.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = tmp_path / "runs" / "ddp" / "checkpoint-2"
    assert json.loads((ckpt / "train_state.json").read_text())["world_size"] == 2
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
    assert "x2 processes" in proc.stderr
    # both processes built cache entries (6 rows: 3 encoder batches, dealt 2 + 1), none waited for the other
    assert re.search(r"latents 0 reused, 6 built \(by 2 processes: [1-9]\d* \+ [1-9]\d*\)", proc.stderr), (
        proc.stderr
    )
    one_node = lora_tensors(tmp_path / "runs" / "ddp" / "pytorch_lora_weights.safetensors")

    # The shipped multi-node config as two 1-process "nodes" on localhost, each started like on its own host:
    # the same launcher with ACCELERATE_ARGS. They share the run and a fresh cache folder (a shared file system),
    # so both nodes' local main processes build the same cache entries at once.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    nodes = []
    for rank in (0, 1):
        env = dict(
            os.environ,
            PYTHON=sys.executable,
            ACCELERATE_CONFIG=str(REPO / "config/accelerate_config_multi_node.yaml"),
            ACCELERATE_ARGS=f"--num_processes 2 --mixed_precision no --main_process_ip 127.0.0.1 "
            f"--main_process_port {port} --machine_rank {rank}",
        )
        log = (tmp_path / f"node{rank}.log").open("w")
        command = ["bash", str(REPO / "ai/lora/run_lora_train.sh"), str(cfg), "output.name=nodes",
                   f"cache.dir={tmp_path / 'shared_cache'}"]  # fmt: skip
        nodes.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    for rank, node in enumerate(nodes):
        assert node.wait(timeout=300) == 0, (tmp_path / f"node{rank}.log").read_text()[-3000:]
    two_nodes = lora_tensors(tmp_path / "runs" / "nodes" / "pytorch_lora_weights.safetensors")
    assert one_node.keys() == two_nodes.keys()
    assert all(torch.equal(one_node[k], two_nodes[k]) for k in one_node)
    nodes_ckpt = tmp_path / "runs" / "nodes" / "checkpoint-2"
    assert json.loads((nodes_ckpt / "train_state.json").read_text())["world_size"] == 2
    assert (nodes_ckpt / "random_states_0.pkl").is_file() and (nodes_ckpt / "random_states_1.pkl").is_file()

    # each one-process node built every entry itself: the cache the two processes of one node split between them
    # holds exactly the same entries and bytes
    def entries(root):
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*.safetensors"))}

    split, whole = entries(tmp_path / "runs" / "cache"), entries(tmp_path / "shared_cache")
    assert len(split) == 6 + 3 and split == whole  # a latent per image, a text entry per caption


@pytest.mark.slow
def test_deepspeed_zero2_config_resumes_exactly_and_matches_plain_training(tiny_sdxl, tmp_path):
    """The shipped DeepSpeed config (ZeRO-2), one process on CPU.

    fp32: DeepSpeed engine checkpoints, an exact resume, and the same weights as training without DeepSpeed (batch,
    accumulation and clipping come from the training config). bf16 (the config's own precision: DeepSpeed trains a
    bf16 copy and keeps fp32 master weights in its optimizer): validation images, an exact resume, and the export
    holds the fp32 masters. One process only: accelerate counts a multi-process DeepSpeed run on CPU as one process.
    """
    import torch

    csv = make_image_csv(tmp_path / "data", n=6)
    runs = tmp_path / "runs"
    cfg = write_config(tmp_path / "ds.yaml", tiny_sdxl, csv, runs, "ds", train={"max_train_steps": 4},
                       checkpoint={"every_n_steps": 2})  # fmt: skip
    fp32 = {"ACCELERATE_ARGS": "--num_processes 1 --mixed_precision no"}
    bf16 = {"ACCELERATE_ARGS": "--num_processes 1"}
    bf16_cfg = ("train.mixed_precision=bf16", "validation.every_n_steps=4", "validation.prompts=[a street]",
                "validation.num_inference_steps=1", "validation.width=64", "validation.height=64")  # fmt: skip
    for env, overrides in (
        (fp32, ()),
        (fp32, ("output.name=resumed", f"checkpoint.resume_from={runs / 'ds' / 'checkpoint-2'}")),
        (bf16, ("output.name=bf16", *bf16_cfg)),
        (bf16, ("output.name=bf16_resumed", f"checkpoint.resume_from={runs / 'bf16' / 'checkpoint-2'}", *bf16_cfg)),
    ):  # fmt: skip
        proc = launch(cfg, "config/accelerate_config_deepspeed.yaml", *overrides, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        runs / "ds" / "checkpoint-2" / "pytorch_model" / "mp_rank_00_model_states.pt"
    ).is_file()  # engine state
    assert run_inprocess(cfg, "output.name=plain") == 0
    names = ("ds", "resumed", "plain", "bf16", "bf16_resumed")
    weights = {n: lora_tensors(runs / n / "pytorch_lora_weights.safetensors") for n in names}
    for first, second in (("ds", "resumed"), ("ds", "plain"), ("bf16", "bf16_resumed")):
        assert all(torch.equal(weights[first][k], weights[second][k]) for k in weights[first]), second
    assert (runs / "bf16" / "validation" / "step-000004" / "prompt00_seed0.png").is_file()
    exported = weights["bf16"].values()
    assert {v.dtype for v in exported} == {torch.float32}
    assert any((v.to(torch.bfloat16).float() != v).any() for v in exported)  # fp32 masters, not the bf16 copy


@pytest.mark.slow
def test_loader_workers_kept_across_epochs_train_the_same_weights(tiny_sdxl, tmp_path):
    """Persistent DataLoader workers must not keep per-epoch state: random crops and flips differ every epoch, and
    2 workers over 3 epochs give exactly the weights of loading in the training process."""
    import torch

    csv = make_image_csv(tmp_path / "data", n=4)  # 3 buckets, batch 2 -> 3 batches an epoch
    runs = tmp_path / "runs"
    cfg = write_config(tmp_path / "w.yaml", tiny_sdxl, csv, runs, "inline",
                       data={"crop": "random", "random_flip": True},
                       cache={"latents": False, "text_embeddings": False},
                       train={"max_train_steps": 8, "batch_size": 2}, checkpoint={"every_n_steps": 8})  # fmt: skip
    assert run_inprocess(cfg) == 0
    assert run_inprocess(cfg, "output.name=workers", "data.num_workers=2") == 0
    state = json.loads((runs / "workers" / "checkpoint-8" / "train_state.json").read_text())
    assert state["epoch"] >= 2, state
    inline = lora_tensors(runs / "inline" / "pytorch_lora_weights.safetensors")
    workers = lora_tensors(runs / "workers" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(inline[k], workers[k]) for k in inline)


def test_killed_or_half_checkpoint_is_never_latest(tmp_path):
    from accelerate import Accelerator

    from ai.common.checkpoints import list_checkpoints, resolve_resume, save_checkpoint

    accelerator = Accelerator(cpu=True)
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(accelerator, run, 2, {"epoch": 0, "batch": 2}, "a: 1\n")

    def killed(folder):
        raise KeyboardInterrupt  # the run dies while writing checkpoint-4

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, run, 4, {"epoch": 0, "batch": 4}, "a: 1\n", write_extra=killed)
    (run / "checkpoint-6").mkdir()  # a half folder (e.g. copied without its train_state.json)
    (run / ".tmp-checkpoint-8-123").mkdir()
    assert not (run / "checkpoint-4").exists()
    assert [s for s, _ in list_checkpoints(run)] == [2]
    assert resolve_resume(run, "latest") == run / "checkpoint-2"
    with pytest.raises(UserError, match="not a complete checkpoint"):
        resolve_resume(run, str(run / "checkpoint-6"))


@pytest.fixture
def check_config(tiny_sdxl, tmp_path):
    csv = make_image_csv(tmp_path / "data", n=2)
    return write_config(tmp_path / "c.yaml", tiny_sdxl, csv, tmp_path / "runs", "bad")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.pretrained_model=/nonexistent/sdxl"], "model folder not found: /nonexistent/sdxl"),
        (["optim.lerning_rate=1e-4"], "optim.lerning_rate: unknown key (did you mean 'learning_rate'?)"),
        (["train.max_train_steps=many"], "train.max_train_steps: Input should be a valid integer"),
        (["data.crop=random"], "set cache.latents=false or data.crop=center"),
        (["lora.train_text_encoder=true"], "set cache.text_embeddings=false"),
        (["checkpoint.resume_from=/nonexistent"], "is not a folder"),
    ],
)
def test_bad_config_is_refused_with_a_clear_message(check_config, overrides, message):
    with pytest.raises(UserError) as err:
        run_inprocess(check_config, "--check", *overrides)
    assert message in str(err.value)


def test_csv_without_named_columns_is_refused(check_config, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("file,caption\nx.jpg,a road\n")
    with pytest.raises(UserError, match=r"missing column\(s\) image, text; the header has file, caption"):
        run_inprocess(check_config, f"data.train_csv={bad}", "train.max_train_steps=1")


def test_resume_with_other_lora_rank_is_refused(check_config, tmp_path):
    from ai.lora.train_lora_sdxl import Config
    from core.config import config_to_yaml, load_config

    ckpt = tmp_path / "runs" / "bad" / "checkpoint-10"
    ckpt.mkdir(parents=True)
    (ckpt / "config.resolved.yaml").write_text(config_to_yaml(load_config(Config, check_config)))
    (ckpt / "train_state.json").write_text('{"step": 10, "epoch": 0, "batch": 10, "world_size": 1}')
    with pytest.raises(UserError, match=r"differs in lora\.rank \(4 -> 8\)"):
        run_inprocess(check_config, "--check", "checkpoint.resume_from=latest", "lora.rank=8")
    assert (
        run_inprocess(check_config, "--check", "checkpoint.resume_from=latest", "train.max_train_steps=20")
        == 0
    )


def test_process_group_timeout_reaches_accelerate_and_may_change_on_resume(
    check_config, monkeypatch, tmp_path
):
    """train.process_group_timeout_minutes is the process group's timeout (torch's NCCL default, 10 min, is shorter
    than a first cache build or a long validation the other processes wait for), and a resume may change it."""
    from datetime import timedelta

    import accelerate

    from ai.common import trainer
    from ai.lora.train_lora_sdxl import Config
    from core.config import config_to_yaml, load_config

    cfg = load_config(Config, check_config, ["train.process_group_timeout_minutes=45"])
    assert load_config(Config, check_config).train.process_group_timeout_minutes == 120  # the default
    seen = {}

    class Stop(Exception):
        pass

    def accelerator(**kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(accelerate, "Accelerator", accelerator)
    with pytest.raises(Stop):
        trainer.start_run(cfg)
    (handler,) = seen["kwargs_handlers"]
    assert handler.timeout == timedelta(minutes=45)

    ckpt = tmp_path / "runs" / "bad" / "checkpoint-10"
    ckpt.mkdir(parents=True)
    (ckpt / "config.resolved.yaml").write_text(config_to_yaml(cfg))
    (ckpt / "train_state.json").write_text('{"step": 10, "epoch": 0, "batch": 10, "world_size": 1}')
    assert run_inprocess(check_config, "--check", "checkpoint.resume_from=latest") == 0  # 45 -> 120 minutes


@pytest.mark.slow
def test_8bit_adamw_trains_checkpoints_and_resumes_exactly(tiny_sdxl, tmp_path):
    """bitsandbytes' AdamW8bit (it runs on CPU too): 8-bit moments in the checkpoint, exact mid-run resume."""
    import torch

    csv = make_image_csv(tmp_path / "data", n=4)
    runs = tmp_path / "runs"
    # rank 64 on the tiny UNet's 64-wide attention: 64x64 = 4096 values, the smallest tensor bnb keeps in 8 bits
    cfg = write_config(tmp_path / "a.yaml", tiny_sdxl, csv, runs, "full", lora={"rank": 64, "alpha": 64},
                       optim={"optimizer": "adamw8bit"}, train={"max_train_steps": 4},
                       checkpoint={"every_n_steps": 2})  # fmt: skip
    assert run_inprocess(cfg) == 0
    optimizer_state = torch.load(runs / "full" / "checkpoint-2" / "optimizer.bin", weights_only=False)[
        "state"
    ]
    # bnb keeps its quantised moments under one key in the state dict
    moment_dtypes = {
        str(s.get("__bnb_optimizer_quant_state__", s)["state1"].dtype) for s in optimizer_state.values()
    }
    assert moment_dtypes == {"torch.uint8"}, moment_dtypes
    assert (
        run_inprocess(cfg, "output.name=resumed", f"checkpoint.resume_from={runs / 'full' / 'checkpoint-2'}")
        == 0
    )
    full = lora_tensors(runs / "full" / "pytorch_lora_weights.safetensors")
    resumed = lora_tensors(runs / "resumed" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in full.items())  # B starts at zero


def test_fp16_on_cpu_is_a_clear_error(check_config):
    with pytest.raises(UserError, match="fp16 needs a GPU; on CPU use bf16 or no"):
        run_inprocess(check_config, "train.mixed_precision=fp16")


def test_launcher_reports_config_errors_in_one_line(check_config):
    proc = launch(check_config, "config/accelerate_config_cpu.yaml", "lora.rnak=4", timeout=60)
    assert proc.returncode == 2
    assert "lora.rnak: unknown key (did you mean 'rank'?)" in proc.stderr
    assert "Traceback" not in proc.stderr and "accelerate" not in proc.stderr


def test_exported_lora_bytes_do_not_depend_on_the_hash_seed(tiny_sdxl, tmp_path):
    """PEFT keeps target_modules as a set and the safetensors writer its header in a hash map; uncanonicalised, the
    file (and the lora_sha256 inference records) changes between two exports of the same weights, and a rerun of
    training + inference would refuse its own earlier images."""
    script = (
        "import sys, torch; from peft import LoraConfig; from ai.common.models import load_components; "
        "from ai.common import lora_export; torch.manual_seed(0); c = load_components(sys.argv[1]); "
        "c.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=['to_q', 'to_k', 'to_v', 'to_out.0'])); "
        "lora_export.save_lora(sys.argv[2], c.unet, kohya=False)"
    )
    files = []
    for seed in ("1", "2", "3"):
        out = tmp_path / seed
        env = dict(os.environ, PYTHONHASHSEED=seed)
        subprocess.run(
            [sys.executable, "-c", script, str(tiny_sdxl), str(out)], check=True, env=env, timeout=120
        )
        files.append((out / "pytorch_lora_weights.safetensors").read_bytes())
    assert files[0] == files[1] == files[2]
    from safetensors.torch import load_file

    assert load_file(tmp_path / "1" / "pytorch_lora_weights.safetensors")  # still a valid safetensors file


@pytest.mark.slow
def test_wandb_offline_run_logs_loss_and_validation(tiny_sdxl, tmp_path):
    """log.report_to=wandb through accelerate's tracker, in wandb's offline mode (no key, no network)."""
    csv = make_image_csv(tmp_path / "data", n=4)
    cfg = write_config(
        tmp_path / "wandb.yaml", tiny_sdxl, csv, tmp_path / "runs", "wandb",
        train={"max_train_steps": 2}, checkpoint={"every_n_steps": 2},
        validation={"every_n_steps": 2, "loss_rows": 1, "prompts": ["a street"], "num_inference_steps": 1,
                    "width": 64, "height": 64},
        log={"report_to": "wandb", "wandb_project": "bdd-test", "every_n_steps": 1},
    )  # fmt: skip
    env = dict(os.environ, WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wb"), WANDB_API_KEY="")
    env.pop("WANDB_API_KEY")
    proc = subprocess.run(
        [sys.executable, "-m", "ai.lora.train_lora_sdxl", "--config", str(cfg)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = list((tmp_path / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((tmp_path / "wb").rglob("*"))[:20]
    # offline runs keep history and config in the binary run-<id>.wandb log (synced later with `wandb sync`)
    log = next(runs[0].glob("run-*.wandb")).read_bytes()
    for key in (b"val_loss", b"data_wait_share", b"lora.rank", b"optim.learning_rate"):
        assert key in log, key
    images = sorted(p.name for p in (runs[0] / "files" / "media" / "images").glob("validation_*.png"))
    assert [name.split("_")[1] for name in images] == ["0", "2"]  # validation images at steps 0 and 2


@pytest.mark.slow
def test_bf16_mixed_precision_trains_and_validates(tiny_sdxl, tmp_path):
    """bf16 frozen base, fp32 LoRA, fp32 VAE, CPU autocast: loop, validation loss and images, fp32 export."""
    csv = make_image_csv(tmp_path / "data", n=4)
    cfg = write_config(
        tmp_path / "bf16.yaml", tiny_sdxl, csv, tmp_path / "runs", "bf16",
        train={"max_train_steps": 2, "mixed_precision": "bf16"}, checkpoint={"every_n_steps": 2},
        validation={"every_n_steps": 2, "loss_rows": 1, "prompts": ["a street"], "num_inference_steps": 1,
                    "width": 64, "height": 64},
    )  # fmt: skip
    # a fresh process: accelerate's state is a per-process singleton, fixed by the first in-process run
    proc = subprocess.run(
        [sys.executable, "-m", "ai.lora.train_lora_sdxl", "--config", str(cfg)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "bf16"
    assert (run / "validation" / "step-000002" / "prompt00_seed0.png").is_file()
    weights = lora_tensors(run / "pytorch_lora_weights.safetensors")
    assert {str(v.dtype) for v in weights.values()} == {"torch.float32"}


@pytest.mark.slow
def test_text_encoders_are_released_after_caching_and_validation_is_unchanged(
    tiny_sdxl,
    tmp_path,
    monkeypatch,
):
    """With the text cache full the frozen text encoders are dropped before the loop (nothing references them, so
    their host and device memory goes back; nothing could run them afterwards: validation gets the prompts and
    held-out captions encoded before), and the validation image at step 0 is still exactly the pipeline's own image
    for that prompt and seed (the LoRA starts as a no-op)."""

    import numpy as np
    import torch
    from diffusers import StableDiffusionXLPipeline
    from PIL import Image

    alive_at_loop = watch_text_encoder_release(monkeypatch)
    csv = make_image_csv(tmp_path / "data", n=4)
    cfg = write_config(
        tmp_path / "te.yaml", tiny_sdxl, csv, tmp_path / "runs", "te",
        data={"caption_dropout": 0.5}, train={"max_train_steps": 2}, checkpoint={"every_n_steps": 2},
        validation={"every_n_steps": 2, "loss_rows": 1, "prompts": ["a street"], "seeds": [4],
                    "num_inference_steps": 2, "width": 64, "height": 48},
    )  # fmt: skip
    assert run_inprocess(cfg) == 0
    assert alive_at_loop == [False, False]  # both encoders were freed before the first step
    run = tmp_path / "runs" / "te"
    val = [m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_loss" in m]
    assert [m["step"] for m in val] == [0, 2]
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe("a street", num_inference_steps=2, width=64, height=48,
                    generator=torch.Generator().manual_seed(4)).images[0]  # fmt: skip
    with Image.open(run / "validation" / "step-000000" / "prompt00_seed4.png") as got:
        np.testing.assert_array_equal(np.asarray(got.convert("RGB")), np.asarray(expected))


@pytest.mark.slow
def test_text_encoder_lora_two_processes_train_what_one_process_with_accumulation_trains(tiny_sdxl, tmp_path):
    """lora.train_text_encoder with 2 DDP processes (gloo): the text encoders' LoRA gradients are averaged like the
    UNet's, so the saved weights (UNet and both text encoders) equal one process with the same global batch
    (1 process x 2 accumulation steps == 2 processes x 1), across an epoch boundary and with caption dropout. That
    needs the same data (the sampler deals global batch k * 2 + r to rank r) with the same noise for it."""
    import socket

    import torch

    csv = make_image_csv(tmp_path / "data", n=2)  # 2 batches of 1 an epoch: an optimizer step
    runs = tmp_path / "runs"
    cfg = write_config(
        tmp_path / "te.yaml", tiny_sdxl, csv, runs, "one",
        data={"caption_dropout": 0.3}, cache={"text_embeddings": False},
        lora={"train_text_encoder": True, "text_encoder_learning_rate": 1.0e-3},
        train={"max_train_steps": 2, "gradient_accumulation_steps": 2}, checkpoint={"every_n_steps": 2},
    )  # fmt: skip
    with socket.socket() as sock:  # a free port: other launches may be running
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # one thread per process in both runs (torchrun's default): other thread counts sum convolutions in another
    # order, and Adam turns those last-bit differences of tiny gradients into visible ones
    env = {"OMP_NUM_THREADS": "1"}
    proc = launch(cfg, "config/accelerate_config_cpu.yaml", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    env["ACCELERATE_ARGS"] = f"--main_process_port {port}"
    proc = launch(cfg, "config/accelerate_config_cpu_2proc.yaml", "output.name=two",
                  "train.gradient_accumulation_steps=1", env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"effective batch\s*= 2 \(x1 accumulation x2 processes\)", proc.stderr), proc.stderr[
        -3000:
    ]
    one = lora_tensors(runs / "one" / "pytorch_lora_weights.safetensors")
    two = lora_tensors(runs / "two" / "pytorch_lora_weights.safetensors")
    assert one.keys() == two.keys()
    for prefix in ("unet.", "text_encoder.", "text_encoder_2."):
        b = [v for k, v in one.items() if k.startswith(prefix) and "lora_B" in k]
        assert b and any(v.abs().max() > 0 for v in b), prefix  # trained (B starts at zero)
    # Equal up to float rounding: 1 and 2 processes sum the same gradients, yet not bit for bit, and Adam divides
    # each update by its gradient's size, which turns last-bit differences of near-zero gradients into up to ~1e-3
    # of the learning rate. Gradients that are not averaged (or other noise) move weights by ~the learning rate.
    lr = 1.0e-3
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=0, atol=0.02 * lr, msg=k)
