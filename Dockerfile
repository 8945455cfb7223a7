# GPU image for the whole pipeline: CUDA runtime, Python 3.11, pinned requirements plus xformers.
#   docker build -t bdd-sdxl .
#   docker run --gpus all --rm -it --env-file .env -v $HF_HOME:/data/hf_home -v /data:/data bdd-sdxl \
#       bash ai/lora/run_lora_train.sh config/lora_train.yaml
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/data/hf_home \
    YOLO_CONFIG_DIR=/data/yolo_config

RUN apt-get update && apt-get install -y --no-install-recommends software-properties-common \
    && add-apt-repository -y ppa:deadsnakes/ppa && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev \
       git libgl1 libglib2.0-0 fonts-dejavu-core \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 app && mkdir -p /data/hf_home /data/yolo_config /app \
    && chown -R app:app /data /app
WORKDIR /app
USER app

RUN python3.11 -m venv /app/.venv
ENV PATH=/app/.venv/bin:$PATH

# Dependencies first (cached layer), then the code; requirements.txt ends with `-e .`. DeepSpeed (pinned there) runs
# config/accelerate_config_deepspeed.yaml (ZeRO-2 with the torch optimizer) without compiled ops, so the runtime
# image (no nvcc) suffices.
COPY --chown=app:app requirements.txt pyproject.toml README.md ./
RUN grep -v '^-e \.' requirements.txt > /tmp/req.txt && pip install --upgrade pip \
    && pip install -r /tmp/req.txt && pip install xformers==0.0.35 --no-deps
COPY --chown=app:app . .
RUN pip install --no-deps -e .

VOLUME ["/data/hf_home"]
CMD ["bash"]
