# dataprune in a container. The base image is a build argument so the same file serves CPU-only
# and CUDA clusters, e.g.:
#   docker build -t dataprune .                                          # CUDA PyTorch base (default)
#   docker build --build-arg BASE=python:3.11-slim -t dataprune:cpu .    # CPU only
#   docker run --gpus all -v /data:/data dataprune score /data/imagenet --metric el2n
ARG BASE=pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
FROM ${BASE}

ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
WORKDIR /opt/dataprune
COPY pyproject.toml README.md ./
COPY dataprune ./dataprune
# torch comes from the base image when it has one; pip installs it otherwise.
RUN python -m pip install ".[fast,remote,faiss]"

WORKDIR /work
ENTRYPOINT ["dataprune"]
CMD ["--help"]
