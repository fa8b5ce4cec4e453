# syntax=docker/dockerfile:1
#
# Two images from one file, picked with --target:
#   host     x86-64 CUDA PyTorch image: train, distil and export bundles (`kt-edge`)
#   runtime  Jetson L4T image: the torch-free device runtime only (`kt-edge-runtime`,
#            ONNX Runtime and the TensorRT that ships with JetPack)
#
#   docker build --target host -t kt-edge .
#   docker build --target runtime --platform linux/arm64 -t kt-edge-runtime .
#
# Base images are build arguments: --build-arg BASE_IMAGE=... (host) and
# --build-arg RUNTIME_BASE_IMAGE=... with JETPACK=5 or 6 to match the device's JetPack release:
#   JetPack 6 (default): RUNTIME_BASE_IMAGE=nvcr.io/nvidia/l4t-jetpack:r36.4.0, Python 3.10, CUDA 12
#   JetPack 5:           RUNTIME_BASE_IMAGE=nvcr.io/nvidia/l4t-jetpack:r35.4.1 JETPACK=5, Python 3.8, CUDA 11.4

ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:24.08-py3
ARG RUNTIME_BASE_IMAGE=nvcr.io/nvidia/l4t-jetpack:r36.4.0

FROM ${RUNTIME_BASE_IMAGE} AS runtime
ARG JETPACK=6
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3-pip python3-libnvinfer \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/kt-edge
COPY export/ export/
# TensorRT comes from JetPack (python3-libnvinfer); the extra adds the cuda-python that matches its CUDA.
# Ubuntu 20.04's pip (JetPack 5) predates some wheel tags: upgrade it first.
RUN python3 -m pip install --upgrade pip \
    && python3 -m pip install "./export[jetpack${JETPACK}]"
ENTRYPOINT ["kt-edge-runtime"]

FROM ${BASE_IMAGE} AS host
ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
WORKDIR /opt/kt-edge
COPY export/ export/
COPY pyproject.toml README.md ./
COPY kt_edge/ kt_edge/
COPY recipes/ recipes/
RUN python -m pip install ./export .
ENTRYPOINT ["kt-edge"]
