# Two set-up commands: `make demo` and `make test`. Both create .venv and install on first use.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# the BDD100K toolkit (pydantic 1) in an environment of its own: the tests compare the project's mAP with it
TOOLKIT_VENV := .venv-bdd100k
TOOLKIT_STAMP := $(TOOLKIT_VENV)/.installed
DEMO_DIR ?= outputs/demo
export HF_HUB_OFFLINE := 1
export YOLO_OFFLINE := true
export YOLO_AUTOINSTALL := false
# CPU only: deepspeed, which accelerate imports when installed, would otherwise warn that it found no GPU
export DS_ACCELERATOR ?= cpu

.PHONY: install test test-sdxl-base demo lint bench clean-demo

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $(STAMP)

$(TOOLKIT_STAMP): requirements-bdd100k.txt
	@test -x $(TOOLKIT_VENV)/bin/python || $(PYTHON) -m venv $(TOOLKIT_VENV)
	$(TOOLKIT_VENV)/bin/python -m pip install --upgrade --quiet pip
	$(TOOLKIT_VENV)/bin/python -m pip install --quiet -r requirements-bdd100k.txt
	@touch $(TOOLKIT_STAMP)

test: $(STAMP) $(TOOLKIT_STAMP)
	BDD100K_TOOLKIT_PYTHON=$(CURDIR)/$(TOOLKIT_VENV)/bin/python $(PY) -m pytest -q tests

# The full SDXL architecture (random weights) through the launchers on CPU, bf16: slow (10-30 min, ~20 GB RAM),
# not part of `make test`. SDXL_BASE_DIR keeps the built model folder between runs.
test-sdxl-base: $(STAMP)
	SDXL_BASE_CHECK=1 $(PY) -m pytest -q -p no:cacheprovider tests/test_sdxl_base.py

lint: $(STAMP)
	$(PY) -m ruff check core vocab mini_bdd convert ai annotation tests bench docker
	$(PY) -m ruff format --check core vocab mini_bdd convert ai annotation tests bench docker

# The demo configs name outputs/demo; these key=value overrides put every path under $(DEMO_DIR) instead.
D := $(DEMO_DIR)
TRAIN_PATHS = model.pretrained_model=$(D)/models/tiny-sdxl cache.dir=$(D)/cache output.runs_dir=$(D)
LORA_TRAIN_PATHS = $(TRAIN_PATHS) data.train_csv=$(D)/csv/bdd_hf_dataset_lora_train.csv
CONTROLNET_TRAIN_PATHS = $(TRAIN_PATHS) data.train_csv=$(D)/csv/bdd_hf_dataset_controlnet_train.csv
LORA_INFER_PATHS = model.pretrained_model=$(D)/models/tiny-sdxl paths.lora_weights_path=$(D)/lora_train \
    paths.infer_path=$(D)/lora_infer
BOXES_TRAIN_PATHS = $(TRAIN_PATHS) data.train_csv=$(D)/csv/bdd_hf_dataset_controlnet_boxes_train.csv \
    controlnet.layout=boxes output.name=controlnet_boxes_train \
    reward.model=$(D)/detector/detector.pt reward.start_step=27 reward.max_timestep=999 \
    loss.object_weight=2 loss.small_object_boost=0.05
BOXES_INFER_PATHS = model.pretrained_model=$(D)/models/tiny-sdxl \
    paths.controlnet_path=$(D)/controlnet_boxes_train/controlnet paths.masks_path=$(D)/csv/box_layouts/val \
    paths.captions_path=$(D)/captions/val paths.source_labels=$(D)/bdd100k/labels/det_20/det_val.json \
    paths.infer_path=$(D)/controlnet_boxes_infer
PLAN_INFER_PATHS = model.pretrained_model=$(D)/models/tiny-sdxl \
    paths.controlnet_path=$(D)/controlnet_boxes_train/controlnet paths.plan=$(D)/plan/plan.jsonl \
    paths.infer_path=$(D)/plan_infer
CONTROLNET_INFER_PATHS = model.pretrained_model=$(D)/models/tiny-sdxl \
    paths.controlnet_path=$(D)/controlnet_train/controlnet paths.masks_path=$(D)/bdd100k/labels/sem_seg/masks/val \
    paths.captions_path=$(D)/captions/val paths.source_labels=$(D)/bdd100k/labels/det_20/det_val.json \
    paths.infer_path=$(D)/controlnet_infer

LOOP_PATHS = out=$(D)/loop detector=$(D)/detector/detector.pt data.bdd_data_dir=$(D)/bdd100k \
    data.real=$(D)/real_eval/data.yaml data.val=$(D)/real_eval/data.yaml generate.model.pretrained_model=$(D)/models/tiny-sdxl \
    generate.paths.controlnet_path=$(D)/controlnet_boxes_train/controlnet gain.train.model=$(D)/detector/detector.pt

# The whole pipeline on the embedded default: a generated mini-BDD100K and tiny models, on CPU.
demo: $(STAMP)
	@echo "== stage 1: mini-BDD100K -> captions -> CSVs ($(DEMO_DIR)) =="
	$(PY) -m convert.make_mini_bdd --out $(DEMO_DIR)/bdd100k --frames 24 --seed 0
	$(PY) -m convert.generate_bdd_captions --bdd_data_dir $(DEMO_DIR)/bdd100k \
	    --caption_txt_output_folder $(DEMO_DIR)/captions/train --split train
	$(PY) -m convert.generate_bdd_captions --bdd_data_dir $(DEMO_DIR)/bdd100k \
	    --caption_txt_output_folder $(DEMO_DIR)/captions/val --split val
	$(PY) -m convert.lora_bdd_to_huggingface_csv --images_path $(DEMO_DIR)/bdd100k/images/100k/train \
	    --captions_path $(DEMO_DIR)/captions/train --output_folder $(DEMO_DIR)/csv --split train
	$(PY) -m convert.controlnet_bdd_to_huggingface_csv --images_path $(DEMO_DIR)/bdd100k/images/10k/train \
	    --captions_path $(DEMO_DIR)/captions/train --conditions_path $(DEMO_DIR)/bdd100k/labels/sem_seg/masks/train \
	    --output_folder $(DEMO_DIR)/csv --split train
	for split in train val; do $(PY) -m convert.controlnet_bdd_to_huggingface_csv --layout boxes \
	    --images_path $(DEMO_DIR)/bdd100k/images/100k/$$split --captions_path $(DEMO_DIR)/captions/$$split \
	    --labels_file $(DEMO_DIR)/bdd100k/labels/det_20/det_$$split.json --output_folder $(DEMO_DIR)/csv --split $$split \
	    || exit 1; done
	for split in train val; do $(PY) -m convert.bdd_to_yolo --bdd_data_dir $(DEMO_DIR)/bdd100k --split $$split \
	    --out $(DEMO_DIR)/real || exit 1; done
	@echo "-- a second mini-BDD100K (another seed, 96 frames) for the loop's measurements: its val frames score the"
	@echo "   detectors, its train frames are the gain run's real data (8 per seed, the positive control's 56 more) --"
	$(PY) -m convert.make_mini_bdd --out $(DEMO_DIR)/bdd100k_eval --frames 96 --seed 1
	for split in train val; do $(PY) -m convert.bdd_to_yolo --bdd_data_dir $(DEMO_DIR)/bdd100k_eval --split $$split \
	    --out $(DEMO_DIR)/real_eval || exit 1; done
	@echo "== model: tiny SDXL-architecture model built locally ($(DEMO_DIR)/models/tiny-sdxl) =="
	$(PY) -m ai.common.build_model --preset tiny --out $(DEMO_DIR)/models/tiny-sdxl
	@echo "== stage 2A/3A: LoRA training and generation on CPU =="
	ACCELERATE_CONFIG=config/accelerate_config_cpu.yaml bash ai/lora/run_lora_train.sh config/demo/lora_train.yaml $(LORA_TRAIN_PATHS)
	ACCELERATE_CONFIG=config/accelerate_config_cpu.yaml bash ai/lora/run_lora_infer.sh config/demo/lora_infer.yaml $(LORA_INFER_PATHS)
	@echo "== stage 2B/3B: ControlNet on the segmentation masks, training and generation on CPU =="
	ACCELERATE_CONFIG=config/accelerate_config_cpu.yaml bash ai/controlnet/run_controlnet_train.sh config/demo/controlnet_train.yaml \
	    $(CONTROLNET_TRAIN_PATHS)
	ACCELERATE_CONFIG=config/accelerate_config_cpu.yaml bash ai/controlnet/run_controlnet_infer.sh config/demo/controlnet_infer.yaml \
	    $(CONTROLNET_INFER_PATHS)
	@echo "== stage 2C/3C: ControlNet on box layouts (every labeled frame; object-weighted loss, its last 3 steps with the"
	@echo "   consistency reward of the demo detector that stage 4 uses), a generation plan for the rarest conditions =="
	$(PY) -m annotation.train_demo_detector --bdd_data_dir $(DEMO_DIR)/bdd100k --out $(DEMO_DIR)/detector/detector.pt
	ACCELERATE_CONFIG=config/accelerate_config_cpu.yaml bash ai/controlnet/run_controlnet_train.sh config/demo/controlnet_train.yaml \
	    $(BOXES_TRAIN_PATHS)
	ACCELERATE_CONFIG=config/accelerate_config_cpu.yaml bash ai/controlnet/run_controlnet_infer.sh config/demo/controlnet_infer.yaml \
	    $(BOXES_INFER_PATHS)
	$(PY) -m convert.plan_generation --bdd_data_dir $(DEMO_DIR)/bdd100k --split train \
	    --targets config/demo/plan_targets.yaml --out $(DEMO_DIR)/plan
	ACCELERATE_CONFIG=config/accelerate_config_cpu.yaml bash ai/controlnet/run_controlnet_infer.sh config/demo/controlnet_infer.yaml \
	    $(PLAN_INFER_PATHS)
	@echo "== stage 4: YOLO auto-annotation with the demo detector trained on the mini-BDD100K (CPU, stage 2C) =="
	$(PY) -m annotation.yolo_annotate_folders --config config/demo/annotation.yaml --model $(DEMO_DIR)/detector/detector.pt \
	    --input_folder $(DEMO_DIR)/lora_infer/generations --output_folder $(DEMO_DIR)/annotated/lora
	$(PY) -m annotation.yolo_annotate_folders --config config/demo/annotation.yaml --model $(DEMO_DIR)/detector/detector.pt \
	    --input_folder $(DEMO_DIR)/controlnet_infer/generations --output_folder $(DEMO_DIR)/annotated/controlnet
	$(PY) -m annotation.yolo_annotate_folders --config config/demo/annotation.yaml --model $(DEMO_DIR)/detector/detector.pt \
	    --input_folder $(DEMO_DIR)/plan_infer/generations --output_folder $(DEMO_DIR)/annotated/plan
	@echo "-- control: the same detector on the mini-BDD val frames (real scenes it was not trained on) --"
	$(PY) -m annotation.yolo_annotate_folders --config config/demo/annotation.yaml --model $(DEMO_DIR)/detector/detector.pt \
	    --input_folder $(DEMO_DIR)/bdd100k/images/100k/val --output_folder $(DEMO_DIR)/annotated/bdd_val
	@echo "-- the box-layout generations labelled by their layouts (val layouts: never a gain run's training data) --"
	$(PY) -m annotation.yolo_annotate_folders --config config/demo/annotation.yaml --model $(DEMO_DIR)/detector/detector.pt \
	    --input_folder $(DEMO_DIR)/controlnet_boxes_infer/generations --output_folder $(DEMO_DIR)/annotated/boxes_layout \
	    --labels_source layout
	@echo "== stage 5: what the synthetic data is worth: layout fidelity and detector gain =="
	$(PY) -m annotation.evaluate_fidelity --generations $(DEMO_DIR)/controlnet_infer/generations \
	    --detector $(DEMO_DIR)/detector/detector.pt --bdd_data_dir $(DEMO_DIR)/bdd100k --classes car --imgsz 256 \
	    --device cpu --out $(DEMO_DIR)/fidelity
	@echo "== the loop: the detector's weakest cells -> plan (train frames) -> generate -> annotate -> gain with controls =="
	bash annotation/run_loop.sh config/demo/loop.yaml $(LOOP_PATHS)
	@echo "NOTE: the demo's SDXL is a tiny random model that paints noise: a generation fidelity ratio near 0 and no gain"
	@echo "      from its images are what it should get; the positive control (56 more real frames) shows that the"
	@echo "      measurement can see a gain where one exists. The run shows the method end to end, not a result."
	@echo "demo outputs under $(DEMO_DIR)/:"
	@echo "  stage 1   bdd100k/ (mini-BDD100K), captions/, csv/"
	@echo "  LoRA      lora_train/ (checkpoints, pytorch_lora_weights.safetensors, loss_curve.png)"
	@echo "  generate  lora_infer/generations/ (*.png + metadata.jsonl)"
	@echo "  ControlNet controlnet_train/ (controlnet/, loss_curve.png with the control gap, validation/ sheets)"
	@echo "  generate  controlnet_infer/generations/ and side_by_side/ (mask | image)"
	@echo "  boxes     controlnet_boxes_train/ (box-layout ControlNet), controlnet_boxes_infer/generations/"
	@echo "  plan      plan/ (plan.jsonl, report.md, distribution.png), plan_infer/generations/ (labels in metadata.jsonl)"
	@echo "  annotate  detector/detector.pt (+ detector.json: val recall/precision)"
	@echo "            annotated/{lora,controlnet,plan,bdd_val,boxes_layout}/: data.yaml, labels/, previews/, contact_sheet.jpg,"
	@echo "            manifest.csv (label provenance), summary.json, agreement.png"
	@echo "  evaluate  real/ (mini-BDD as YOLO + frames.csv, ignore/ regions), real_eval/ (the second one), fidelity/fidelity.md"
	@echo "  loop      loop/: diagnose/ (weak cells, targets.yaml), plan/, generate/, annotated/,"
	@echo "            gain/ (gain.md + gain.png + gain.csv: real, synthetic, positive control), report/report.md"

bench: $(STAMP)
	$(PY) bench/bench_captions.py

clean-demo:
	rm -rf $(DEMO_DIR)
