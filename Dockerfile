# syntax=docker/dockerfile:1
# ckpt-auditor daemon image.
#   docker build -t ckpt-auditor .
#   docker build --build-arg TORCH_INDEX_URL=https://mirror.example/whl/cpu -t ckpt-auditor .
# No secrets at build time: storage credentials and AUDITOR_ADMIN_TOKEN come at run time.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- build: a venv in /opt/venv
FROM ${PYTHON_IMAGE} AS build

# CPU-only torch; the index is a build argument (point it at a mirror of the CPU index).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_VERSION=2.13.0

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first and alone, pinned, from the CPU index: the [probe] extra below then finds
# it satisfied and never pulls the CUDA build from PyPI.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY auditor ./auditor
# "./[...]": the local project, whose dependency ranges live in pyproject.toml. [postgres]: state
# on PostgreSQL by URL (psycopg 3). [dask]: the same image runs `dask scheduler` and `dask worker`
# (deploy/components/dask). [hf]: transformers and accelerate, which the probe's `--model hf-auto`
# factory (a checkpoint's own config.json) needs. [sign]: verify signatures against the config's
# trust: (model-signing).
# Then fail the build if a CUDA torch slipped in, if hf-auto cannot import, or if a console script is broken.
RUN pip install --no-cache-dir "./[s3,gcs,probe,hf,dask,postgres,sign]" \
 && python -c "import sys, torch; sys.exit('torch is not a CPU build' if torch.version.cuda else 0)" \
 && python -c "import transformers, accelerate" \
 && auditor --help > /dev/null \
 && dask scheduler --version > /dev/null \
 && dask worker --version > /dev/null

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE}

# tini as PID 1: forwards SIGTERM to the daemon and reaps children.
# Pinned to the Debian bookworm version (the base image is bookworm).
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
 && rm -rf /var/lib/apt/lists/*

# Non-root numeric user; /var/lib/auditor holds the SQLite state (a volume in Kubernetes).
RUN groupadd --system --gid 10001 auditor \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/auditor --create-home \
        --shell /usr/sbin/nologin auditor \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/auditor /home/auditor/.cache

COPY --from=build /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/auditor \
    XDG_CACHE_HOME=/home/auditor/.cache

USER 10001:10001
WORKDIR /home/auditor
EXPOSE 9180

ENTRYPOINT ["tini", "--", "auditor"]
CMD ["run"]
