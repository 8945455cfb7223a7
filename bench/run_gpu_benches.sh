#!/usr/bin/env bash
# The GPU figures and checks bench/RESULTS.md still lacks, as ONE prepared run that fits a lent GPU's budget.
#
# Usage (from anywhere; paths are relative to the repo root):
#   bash bench/run_gpu_benches.sh                  # the default run: model precision lora_train inference (< 8 min)
#   OUT_DIR=$OUT LOG_DIR=/tmp/bench-logs bash bench/run_gpu_benches.sh          # on the lent GPU machine
#   PRESET=tiny DEVICE=cpu bash bench/run_gpu_benches.sh     # smoke test of this script on a CPU (tiny model)
#   bash bench/run_gpu_benches.sh controlnet_train controlnet_infer annotation  # more figures, when time is left
#   bash bench/run_gpu_benches.sh gain            # the gain evaluation's GPU path: --devices, controls, curve
#   bash bench/run_gpu_benches.sh wheels_gain     # its packages (with polars) -> bench/_data/wheels_gain; on the
#                                                 # GPU: WHEELS=bench/_data/wheels_gain bash bench/run_gpu_benches.sh gain
#   bash bench/run_gpu_benches.sh wheels          # on the dev machine (PyPI reachable): fetch the packages the GPU
#                                                 # image lacks into bench/_data/wheels (carry that folder along)
#
# Default steps, in order (sdxl-base architecture, random weights):
#   model       build the sdxl-base folder in bf16, its random weights drawn on the GPU (seconds, not minutes)
#   precision   one LoRA step at fp16 and at bf16 with validation at 1344x768: finite losses, images not black,
#               no VAE call under autocast (bench/bench_validation_precision.py)
#   lora_train  LoRA step time and peak memory at 1024x1024, batch 1 and 4, bf16, gradient checkpointing, caches
#   inference   s/image and peak memory at 1024x1024, 30 steps, bf16
# BUDGET_S (default 420) guards the whole run: a step that would start after it is skipped and says so, so one
# call of the device tool (15 minutes in all, machine start included) never runs out mid-step.
#
# Each step writes its stdout (Markdown tables and JSON lines for RESULTS.md) to $OUT_DIR/<step>.md (default
# bench/_gpu_out/) and its stderr (logs, progress bars) to $LOG_DIR/<step>.log (default $OUT_DIR/logs); the
# environment (nvidia-smi, versions) goes to $OUT_DIR/env.md. A failed step prints its log's tail and the others
# still run; the exit status is that of the last failed step.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$PWD
PRESET=${PRESET:-sdxl-base}
DEVICE=${DEVICE:-cuda}
OUT_DIR=${OUT_DIR:-bench/_gpu_out}
LOG_DIR=${LOG_DIR:-$OUT_DIR/logs}
MODEL_DIR=${MODEL_DIR:-bench/_data/models/$PRESET}
WHEELS=${WHEELS:-bench/_data/wheels}
WORK=${WORK:-bench/_data/gpu_work}
if [[ -z ${PYTHON:-} ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export HF_HUB_OFFLINE=1 YOLO_OFFLINE=true PYTHONUNBUFFERED=1
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

if [[ $PRESET == sdxl-base ]]; then
    RES=1024 TRAIN_STEPS=5 WARMUP=2 WORKERS=4 VAL_STEPS=10 PRECISIONS=(fp16 bf16) TRAIN_PRECISION=bf16 DTYPE=bf16
    INFER_STEPS=30 INFER_IMAGES=2 ANNOTATE_FRAMES=64 SPEED=(--channels-last --compile)
    SQUARE=(--width 1024 --height 1024) WIDE=(--width 1344 --height 768) THREADS=()
else  # smoke test: the same commands, tiny sizes and step counts (fp16 needs a GPU: bf16 only on a CPU)
    RES=128 TRAIN_STEPS=2 WARMUP=1 WORKERS=0 VAL_STEPS=2 PRECISIONS=(bf16) TRAIN_PRECISION=no DTYPE=fp32
    INFER_STEPS=2 INFER_IMAGES=1 ANNOTATE_FRAMES=6 SPEED=(--channels-last)
    SQUARE=(--width 128 --height 128) WIDE=(--width 160 --height 96) THREADS=(--threads 1)
fi
BUDGET_S=${BUDGET_S:-420}
if [[ $DEVICE == cpu ]]; then YOLO_DEVICE=cpu; else YOLO_DEVICE=0; fi

# Packages the GPU image lacks, or has in another version than requirements.txt pins, as Python 3.12 wheels (the
# image has torch, accelerate, safetensors, huggingface-hub 1.x, tokenizers, pandas, opencv, matplotlib, pytest).
# Found by tracing the modules a smoke run imports; bitsandbytes (8-bit AdamW only) and wandb are not needed.
DEVICE_WHEELS=(
    diffusers==0.42.1 transformers==5.23.0 peft==0.21.2 importlib-metadata==10.2.0
    pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
    typing-extensions==4.16.0 msgspec==0.22.0 orjson==3.13.0 open-clip-torch==3.3.0 python-dotenv==1.2.4
    datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 ultralytics==8.4.190 ultralytics-thop==2.2.3
    pycocotools==2.0.11
)

# The gain step trains ultralytics models, which save checkpoints through polars (55 MB of wheels): with the wheels
# above that is more than one device call carries (64 MiB), so the gain step has its own, smaller set.
GAIN_WHEELS=(
    ultralytics==8.4.190 ultralytics-thop==2.2.3 polars==2.1.0 polars-runtime-32==2.1.0 pycocotools==2.0.11
    pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
    typing-extensions==4.16.0 msgspec==0.22.0 python-dotenv==1.2.4
)

step_wheels() {  # run where PyPI is reachable, not on the GPU machine
    mkdir -p "$WHEELS"
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" "$@"
    du -sh "$WHEELS"
}

install_wheels() {  # on the GPU machine, if the image lacks what the benches import: carried wheels go first
    local site=/tmp/bench-site
    "$PYTHON" -c "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in sys.argv[1:]))" \
        diffusers pydantic msgspec open_clip ultralytics datasets dotenv pycocotools && return 0
    if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
        echo "missing packages and no wheels in $WHEELS: run 'bash bench/run_gpu_benches.sh wheels' where PyPI" \
            "is reachable and carry $WHEELS along" >&2
        return 1
    fi
    if [[ ! -f $site/.installed ]]; then
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
            "$WHEELS"/*.whl
        touch "$site/.installed"
    fi
    export PYTHONPATH=$site:$PYTHONPATH
}

print_env() {
    date -u '+%Y-%m-%d %H:%M UTC'
    echo
    echo '```'
    if command -v nvidia-smi >/dev/null; then nvidia-smi; else echo "nvidia-smi: not found"; fi
    "$PYTHON" - <<'EOF'
import os, platform
from importlib.metadata import PackageNotFoundError, version
import torch
print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
for name in ("diffusers", "transformers", "accelerate", "peft", "huggingface-hub", "pydantic", "ultralytics",
             "bitsandbytes", "xformers"):
    try:
        print(f"{name} {version(name)}")
    except PackageNotFoundError:
        print(f"{name}: not installed")
EOF
    echo '```'
}

step_model() {
    "$PYTHON" -m ai.common.build_model --preset "$PRESET" --out "$MODEL_DIR" --dtype bfloat16 --device "$DEVICE"
}

step_precision() {
    step_model >&2
    echo "| run | validation losses | min image mean / std (0-255) | VAE calls under autocast | checks |"
    echo "|---|---|---|---|---|"
    local precision status=0
    for precision in "${PRECISIONS[@]}"; do  # one process each: accelerate fixes a process's mixed precision
        "$PYTHON" bench/bench_validation_precision.py --preset "$PRESET" --model "$MODEL_DIR" --resolution "$RES" \
            --precision "$precision" --inference-steps "$VAL_STEPS" || status=$?
    done
    return "$status"
}

step_lora_train() {
    step_model >&2
    lora() {
        "$PYTHON" bench/bench_lora_train.py --preset "$PRESET" --model "$MODEL_DIR" --resolution "$RES" \
            --precision "$TRAIN_PRECISION" --gradient-checkpointing --rank 16 --steps "$TRAIN_STEPS" \
            --warmup-steps "$WARMUP" --workers "$WORKERS" --caches on --square "$@"
    }
    lora --batch 1  # 1024x1024
    lora --batch 4
}

infer() {
    "$PYTHON" bench/bench_inference.py --preset "$PRESET" --device "$DEVICE" --dtype "$DTYPE" \
        --steps "$INFER_STEPS" ${THREADS[@]+"${THREADS[@]}"} "$@"
}

infer_header() {
    echo "| device | preset | size | steps | dtype | batch | LoRA | switches | s/image | ms/step | peak GiB |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|"
}

step_inference() {
    infer_header
    infer "${SQUARE[@]}" --images "$INFER_IMAGES"
    infer "${SQUARE[@]}" --images "$INFER_IMAGES" --lora-rank 16
}

step_inference_batched() {  # not in the default run: compiling takes minutes
    infer_header
    infer "${SQUARE[@]}" --images $((2 * INFER_IMAGES)) --batch-size "$INFER_IMAGES" "${SPEED[@]}"
}

step_controlnet_train() {
    step_model >&2
    controlnet() {
        "$PYTHON" bench/bench_controlnet_train.py --preset "$PRESET" --model "$MODEL_DIR" --resolution "$RES" \
            --precision "$TRAIN_PRECISION" --gradient-checkpointing --steps "$TRAIN_STEPS" --warmup-steps "$WARMUP" \
            --workers "$WORKERS" "$@"
    }
    controlnet --batch 1 --kinds palette one_hot  # 1344x768
    controlnet --batch 4 --kinds palette --square  # 1024x1024
}

step_controlnet_infer() {  # plain SDXL at 1024x1024 is in the inference step
    infer_header
    infer "${SQUARE[@]}" --images "$INFER_IMAGES" --controlnet palette
    infer "${WIDE[@]}" --images "$INFER_IMAGES"
    infer "${WIDE[@]}" --images "$INFER_IMAGES" --controlnet palette
}

step_annotation() {
    "$PYTHON" bench/bench_annotation.py --frames "$ANNOTATE_FRAMES" --batch 16 --device "$YOLO_DEVICE" \
        --work "$WORK/annotation"
}

# The gain evaluation on a GPU host: concurrent trainings through --devices (four on one GPU), both controls and a
# real-data curve, on a mini-BDD100K whose second seed stands in for a perfect generator (real frames as
# "synthetic"): the synthetic arm should read like the positive control, the shuffled-label control below both.
GAIN_FRAMES=${GAIN_FRAMES:-72} GAIN_REAL=${GAIN_REAL:-8} GAIN_SHARE=${GAIN_SHARE:-700} GAIN_SEEDS=${GAIN_SEEDS:-0,1,2,3}
GAIN_ITERATIONS=${GAIN_ITERATIONS:-600} GAIN_IMGSZ=${GAIN_IMGSZ:-160} GAIN_DEVICES=${GAIN_DEVICES:-0,0,0,0}
GAIN_ARGS=${GAIN_ARGS:-optimizer=AdamW,lr0=0.002,warmup_epochs=0,nbs=8}
step_gain() {
    local w=$WORK/gain split
    "$PYTHON" -m convert.make_mini_bdd --out "$w/bdd" --frames "$GAIN_FRAMES" --seed 0 >&2
    "$PYTHON" -m convert.make_mini_bdd --out "$w/bdd_other" --frames "$GAIN_FRAMES" --seed 1 >&2
    for split in train val; do
        "$PYTHON" -m convert.bdd_to_yolo --bdd_data_dir "$w/bdd" --split "$split" --out "$w/real" >&2
    done
    "$PYTHON" -m convert.bdd_to_yolo --bdd_data_dir "$w/bdd_other" --split train --out "$w/other" >&2
    local curve=$((GAIN_REAL / 2)),$GAIN_REAL,$((GAIN_REAL * 2)),$((GAIN_REAL * 4))
    local t0=$SECONDS
    "$PYTHON" -m annotation.evaluate_gain --real "$w/real/data.yaml" \
        --val "$w/real/data.yaml" --synthetic "$w/other/data.yaml" --synthetic_splits train --out "$w/out" \
        --shares "0,$GAIN_SHARE" --seeds "$GAIN_SEEDS" --max_real "$GAIN_REAL" --positive_control \
        --negative_control shuffled_labels --real_curve "$curve" --iterations "$GAIN_ITERATIONS" \
        --imgsz "$GAIN_IMGSZ" --batch 8 --devices "$GAIN_DEVICES" --workers 2 --model yolov8n.yaml \
        --train_args "$GAIN_ARGS" >&2
    echo "gain: $((SECONDS - t0)) s for the sweep on devices $GAIN_DEVICES"
    cat "$w/out/gain.md"
}

DEFAULT=(model precision lora_train inference)
ALL=("${DEFAULT[@]}" inference_batched controlnet_train controlnet_infer annotation gain)
STEPS=("$@")
[[ ${#STEPS[@]} -gt 0 ]] || STEPS=("${DEFAULT[@]}")
for step in "${STEPS[@]}"; do
    if [[ $step == wheels_gain ]]; then continue; fi
    if ! declare -F "step_$step" >/dev/null; then
        echo "unknown step '$step'; choose from: ${ALL[*]} wheels" >&2
        exit 2
    fi
done
if [[ ${STEPS[*]} == wheels ]]; then
    step_wheels "${DEVICE_WHEELS[@]}"
    exit
fi
if [[ ${STEPS[*]} == wheels_gain ]]; then  # carry bench/_data/wheels_gain as WHEELS for the gain step
    WHEELS=${WHEELS_GAIN:-bench/_data/wheels_gain} step_wheels "${GAIN_WHEELS[@]}"
    exit
fi

mkdir -p "$OUT_DIR" "$LOG_DIR" "$WORK"
install_wheels
print_env | tee "$OUT_DIR/env.md"
failed=0
for step in "${STEPS[@]}"; do
    start=$SECONDS
    if ((SECONDS > BUDGET_S)); then
        echo "== $step SKIPPED: ${SECONDS} s used of BUDGET_S=$BUDGET_S (run it in the next call)"
        continue
    fi
    echo "== $step: stdout -> $OUT_DIR/$step.md, stderr -> $LOG_DIR/$step.log"
    set +e
    (set -e; "step_$step") 2>"$LOG_DIR/$step.log" | tee "$OUT_DIR/$step.md"
    status=${PIPESTATUS[0]}
    set -e
    if [[ $status -ne 0 ]]; then
        failed=$status
        echo "== $step FAILED (exit $status) after $((SECONDS - start)) s; end of $LOG_DIR/$step.log:" >&2
        tail -n 30 "$LOG_DIR/$step.log" >&2
    else
        echo "== $step done in $((SECONDS - start)) s"
    fi
done
exit "$failed"
