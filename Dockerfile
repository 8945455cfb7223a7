# GPU image for the whole pipeline (README: "GPU hosts: the Docker image").
#
#   docker build -t bdd-sdxl .                                 # CUDA 12.8 (default): host driver >= 570
#   docker build --build-arg CUDA=12.6 -t bdd-sdxl:cu126 .     # the previous CUDA line: host driver >= 560
#   docker run --gpus all --rm bdd-sdxl bash docker/check.sh   # self-check: versions, driver, GPU, kernels, 1 step
#   docker run --gpus all --rm -it --env-file .env -v /data:/data bdd-sdxl bash ai/lora/run_lora_train.sh
#
# One CUDA stack: the CUDA libraries (runtime, cuBLAS, cuDNN, NCCL) are the pip packages that torch's wheel for ONE
# CUDA line pulls in; xformers' PyPI wheel is built for CUDA 12.8 (it links CUDA 12's runtime) and bitsandbytes loads
# its kernels for torch's CUDA line, so all three agree. The base image carries no CUDA of its own: an nvidia/cuda
# runtime image would be a second copy (GBs) that torch never loads. The host driver comes in through the NVIDIA
# container toolkit (`--gpus all`); NVIDIA_REQUIRE_CUDA makes it refuse a driver too old for the line at start.
# Python and Debian are those of the machines the tests run on (3.11.7, bookworm). DeepSpeed (pinned in
# requirements.txt) runs config/accelerate_config_deepspeed.yaml (ZeRO-2, torch optimizer) without compiled ops, so
# no CUDA compiler is needed either.
FROM python:3.11.7-slim-bookworm

# The CUDA line of torch's wheels: 12.8, or 12.6 for hosts whose driver is older than 570. A CUDA 13 line would also
# need an xformers build for CUDA 13 (the PyPI wheel links libcudart.so.12); the build below checks that they agree.
ARG CUDA=12.8

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/data/hf_home \
    YOLO_CONFIG_DIR=/data/yolo_config \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    NVIDIA_REQUIRE_CUDA="cuda>=${CUDA}"

# git: W&B records the commit; libgl1 + libglib2.0-0: OpenCV (ultralytics); fonts: the contact sheets' labels
RUN apt-get update && apt-get install -y --no-install-recommends \
       git=1:2.39.5-0+deb12u3 libgl1=1.6.0-1 libglib2.0-0=2.74.6-2+deb12u9 fonts-dejavu-core=2.37-6 \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 app && mkdir -p /data/hf_home /data/yolo_config /app \
    && chown -R app:app /data /app
WORKDIR /app
USER 1000:1000

# The launchers and docker/check.sh find /app/.venv themselves.
RUN python -m venv /app/.venv
ENV PATH=/app/.venv/bin:$PATH

# torch and torchvision from PyTorch's index for the CUDA line (the same pins as requirements.txt, which
# tests/test_docker.py keeps equal); then the rest of requirements.txt from PyPI, where torch==2.14.1 is already
# satisfied by the +cuXYZ build; xformers without dependencies, so it cannot replace that torch.
COPY --chown=1000:1000 requirements.txt pyproject.toml README.md ./
RUN pip install --no-cache-dir pip==26.3 \
    && pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/cu$(echo "${CUDA}" | tr -d .)" \
       torch==2.14.1 torchvision==0.29.1 \
    && grep -v '^-e \.' requirements.txt > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && pip install --no-cache-dir --no-deps xformers==0.0.35 \
    && rm /tmp/requirements.txt
# Fail the build, not the first run, when the wheels disagree: torch must be the CUDA line asked for, and xformers'
# C++/CUDA extension must load against it (loading needs no GPU; docker/check.sh runs the kernels on one).
RUN python -c "import sys, torch, xformers; cuda = torch.version.cuda; \
ok = cuda == '${CUDA}' and xformers._has_cpp_library; \
print('torch', torch.__version__, 'CUDA', cuda, '| xformers extension loads:', xformers._has_cpp_library); \
sys.exit(0 if ok else 'wheels disagree: wanted CUDA ${CUDA}')"

COPY --chown=1000:1000 . .
RUN pip install --no-cache-dir --no-deps -e .

VOLUME ["/data/hf_home"]
CMD ["bash"]
