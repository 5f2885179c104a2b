# syntax=docker/dockerfile:1
# The serving image: upstream vLLM's OpenAI server image, plus Quantrol's torch-free worker (artifact fetch and
# verify, the serving launcher, the router). Nothing in vLLM is rebuilt, so the engine is exactly upstream's.
#
# The base is pinned by digest, and the build fails without one (an empty VLLM_DIGEST is an invalid reference):
#   VLLM_DIGEST=$(docker buildx imagetools inspect vllm/vllm-openai:v0.32.0 --format '{{json .Manifest.Digest}}' | tr -d '"')
#   docker build -f worker/serve.Dockerfile --build-arg VLLM_DIGEST="$VLLM_DIGEST" \
#     -t ghcr.io/quantrol/serve:0.1.0 .

ARG VLLM_IMAGE=vllm/vllm-openai:v0.32.0
ARG VLLM_DIGEST

FROM ${VLLM_IMAGE}@${VLLM_DIGEST}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /opt/quantrol-src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY worker/ worker/
# oras (artifact pulls by digest) and GuideLLM (the qualification Job's load generator) at the versions the serve
# lock pins; then Quantrol with --no-deps, because pydantic, PyYAML, aiohttp and prometheus-client come with vLLM and
# must stay at its versions (GuideLLM's torch and transformers are vLLM's already).
RUN python3 -m pip install "oras==0.2.43" "guidellm==0.8.1" \
 && python3 -m pip install --no-deps . \
 && python3 -c "import quantrol_worker.cli, quantrol_worker.router.main, quantrol_worker.qualify.run, oras, vllm" \
 && python3 -c "import guidellm.benchmark.entrypoints" \
 && rm -rf /opt/quantrol-src \
 && (getent group 65532 || groupadd --gid 65532 quantrol) \
 && (getent passwd 65532 || useradd --uid 65532 --gid 65532 --no-create-home --home-dir /tmp \
      --shell /usr/sbin/nologin quantrol)
WORKDIR /tmp
# vLLM and Hugging Face write caches under $HOME by default; /tmp is the pod's writable emptyDir.
ENV HOME=/tmp HF_HOME=/tmp/hf VLLM_CACHE_ROOT=/tmp/vllm PYTHONUNBUFFERED=1
USER 65532:65532
# The operator sets the command of each container (fetch, engine, router); the default is Quantrol's CLI.
ENTRYPOINT ["quantrol-worker"]
CMD ["--help"]
