# syntax=docker/dockerfile:1
#
# modelserve serving image: FastAPI + onnxruntime, no torch, no compiler, non-root, read-only friendly.
#
#   docker build -t modelserve .                          CPU image (the default, last stage: `runtime`)
#   docker build --target gpu -t modelserve:gpu .         CUDA image with onnxruntime-gpu (docs/DEPLOY.md)
#   podman build --format docker -t modelserve .          podman: `--format docker` keeps the HEALTHCHECK
#
#   docker run --rm -p 8000:8000 --read-only --tmpfs /tmp --cap-drop ALL modelserve
#
# BASE_IMAGE needs python3 >= 3.11 with the venv module. python:3.12-slim has it; so does Debian bookworm
# with python3-venv, which `make container-test` builds locally where no registry is reachable
# (tests/container/container_harness.py). Only `python3` is called here: such a base has no `python`.

ARG BASE_IMAGE=python:3.12-slim
# onnxruntime-gpu on PyPI is built for one CUDA major (1.31: CUDA 13 + cuDNN 9); keep the pair matched.
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
ARG ONNXRUNTIME_GPU_VERSION=1.31.1

# --------------------------------------------------------------------------------------------------------
# builder: /opt/venv with the serving dependencies, from wheels only (no compiler anywhere).
FROM ${BASE_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
RUN python3 -m venv /opt/venv
# Dependencies first, read from pyproject.toml, so that a code change does not download them again.
# (README.md* because pyproject names it as the readme; the wildcard lets a checkout without it build.)
COPY pyproject.toml README.md* ./
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && /opt/venv/bin/pip install --only-binary=:all: -r /tmp/requirements.txt
# The serving install is `pip install .` (base dependencies only: never the `train` extra, never torch).
COPY app ./app
# Then drop what serving never runs: the trainer's entry point, and pip/setuptools themselves (~22 MB).
RUN /opt/venv/bin/pip install --no-deps . \
    && rm -f /opt/venv/bin/modeltrain \
    && /opt/venv/bin/python -m pip uninstall -y -q pip setuptools \
    && /opt/venv/bin/python -c "import app, onnxruntime, fastapi, uvicorn" \
    && ! /opt/venv/bin/python -c "import torch" 2>/dev/null

# --------------------------------------------------------------------------------------------------------
# gpu-builder / gpu: the same venv with onnxruntime-gpu instead of onnxruntime, on a CUDA + cuDNN runtime.
# Not built by default (Docker BuildKit and podman skip stages the target does not need).
FROM ${CUDA_IMAGE} AS gpu-builder
ARG ONNXRUNTIME_GPU_VERSION
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore \
    DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN python3 -m venv /opt/venv
COPY pyproject.toml README.md* ./
# onnxruntime and onnxruntime-gpu ship the same `onnxruntime` module: install only the GPU one.
RUN python3 -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        | grep -v '^onnxruntime' > /tmp/requirements.txt \
    && /opt/venv/bin/pip install --only-binary=:all: -r /tmp/requirements.txt \
        "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}"
COPY app ./app
RUN /opt/venv/bin/pip install --no-deps . \
    && rm -f /opt/venv/bin/modeltrain \
    && /opt/venv/bin/python -m pip uninstall -y -q pip setuptools \
    && /opt/venv/bin/python -c "import app, onnxruntime; assert 'CUDAExecutionProvider' in onnxruntime.get_available_providers()"

FROM ${CUDA_IMAGE} AS gpu
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 modelserve \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin modelserve
COPY --from=gpu-builder /opt/venv /opt/venv
COPY models /opt/modelserve/models
COPY deploy/container/healthcheck.py /opt/modelserve/healthcheck.py
# NVIDIA_* tell the NVIDIA container toolkit to mount the driver. This base has CUDA and cuDNN but not
# TensorRT: CUDA is asked for first (on a TensorRT base, put TensorrtExecutionProvider in front).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    MODELSERVE_PROVIDERS=CUDAExecutionProvider,CPUExecutionProvider \
    ORT_DISABLE_TELEMETRY=1 \
    MODELSERVE_HOST=0.0.0.0 \
    MODELSERVE_PORT=8000 \
    MODELSERVE_MODEL_REPOSITORY=/opt/modelserve/models
WORKDIR /opt/modelserve
USER 10001:10001
EXPOSE 8000
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "/opt/modelserve/healthcheck.py"]
ENTRYPOINT ["modelserve"]
CMD ["serve"]

# --------------------------------------------------------------------------------------------------------
# runtime (default): the CPU serving image.
FROM ${BASE_IMAGE} AS runtime
# A fixed numeric uid, so that Kubernetes `runAsNonRoot` can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 modelserve \
    && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home \
        --shell /usr/sbin/nologin modelserve
COPY --from=builder /opt/venv /opt/venv
# Files stay root-owned and read-only to the server: it writes nothing but /tmp.
COPY models /opt/modelserve/models
COPY deploy/container/healthcheck.py /opt/modelserve/healthcheck.py
# Inside a container the server must listen on every interface (the default outside is 127.0.0.1).
# ORT_DISABLE_TELEMETRY: a server sends nothing home (and onnxruntime cannot persist its id on a read-only
# root anyway, which it would log as a non-JSON warning line).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ORT_DISABLE_TELEMETRY=1 \
    MODELSERVE_HOST=0.0.0.0 \
    MODELSERVE_PORT=8000 \
    MODELSERVE_MODEL_REPOSITORY=/opt/modelserve/models
WORKDIR /opt/modelserve
USER 10001:10001
EXPOSE 8000
# uvicorn drains on SIGTERM: stops accepting, finishes in-flight requests, runs the lifespan shutdown.
# The exec-form ENTRYPOINT makes the server PID 1, so the signal reaches it directly.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "/opt/modelserve/healthcheck.py"]
LABEL org.opencontainers.image.title="modelserve" \
      org.opencontainers.image.description="ONNX model server (FastAPI + onnxruntime, KServe V2 protocol)" \
      org.opencontainers.image.licenses="Apache-2.0"
ENTRYPOINT ["modelserve"]
CMD ["serve"]
