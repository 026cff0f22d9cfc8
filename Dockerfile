# The README's two commands in an image: `make install` at build time, `make demo` when it runs, then
# the local stack stays up for its UIs.
#
#   docker build -t transpeft .
#   docker run --rm -p 4200:4200 -p 5000:5000 --env-file secrets.env transpeft   # Prefect UI :4200, MLflow UI :5000
#   docker run --rm transpeft make test                         # the test suite, as CI runs it
#
# The servers listen on 0.0.0.0 here, so they start only locked (transpeft/auth.py): secrets.env, kept
# out of the image and the repository, holds MLFLOW_TRACKING_PASSWORD=... (12 characters at least) and
# PREFECT_API_AUTH_STRING=admin:...; or mount them as files and pass MLFLOW_TRACKING_PASSWORD_FILE and
# PREFECT_API_AUTH_STRING_FILE. The UIs ask for them; the webhook receiver stays on loopback, so MLflow
# must be let send webhooks to private addresses (TRANSPEFT_LOCAL_WEBHOOKS): whoever holds the
# MLflow password could aim a webhook at an address the container reaches.
#
# GPU variant: a CUDA build of the same torch, from PyTorch's index, on an image with the CUDA runtime:
#   docker build -t transpeft:gpu --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#   docker run --rm --gpus all -p 4200:4200 -p 5000:5000 transpeft:gpu
# (training then uses bf16 autocast on the GPU by itself).
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

# make and git run the README's steps (DVC versions the data in the repository's git); python3-venv
# for a Debian or Ubuntu base without Python's image (the GPU one, or bench/image.py's debootstrapped
# one); ca-certificates for PyPI. Not pinned: the base image decides which versions exist, and these
# are plain tools.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends make git python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /transpeft
COPY . .

# Certificate authorities the build host adds to Debian's own (/usr/local/share/ca-certificates: a
# TLS-inspecting proxy's, for one): bench/bench_image.py copies them into .image-certs/, which git
# ignores. pip and uv then trust Debian's bundle, with them, instead of the bundles they carry.
RUN if [ -d .image-certs ]; then cp .image-certs/*.crt /usr/local/share/ca-certificates/ && update-ca-certificates; fi

ARG TORCH_INDEX_URL=""
# Where pip finds wheels besides its index, as PIP_FIND_LINKS: bench/image.py serves the machine's CPU
# torch wheel to the build on loopback, where pip would otherwise pull the CUDA build from PyPI.
ARG PIP_FIND_LINKS
ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    HF_HUB_OFFLINE=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    MLFLOW_DISABLE_TELEMETRY=true \
    DVC_NO_ANALYTICS=1 \
    TRANSPEFT_BIND_HOST=0.0.0.0 \
    MLFLOW_HOST=0.0.0.0 \
    TRANSPEFT_LOCAL_WEBHOOKS=1
RUN make install TORCH_INDEX_URL="${TORCH_INDEX_URL}"

# `make test` also needs PostgreSQL (the at-scale stack) and Chromium (the MLflow UI checked in a
# browser): --build-arg TEST_TOOLS=1 adds them, on top of the same layers as the image that serves.
ARG TEST_TOOLS=""
# hadolint ignore=DL3008
RUN if [ -n "${TEST_TOOLS}" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends postgresql chromium \
        && rm -rf /var/lib/apt/lists/*; \
    fi

EXPOSE 4200 5000
CMD ["make", "demo-and-serve"]
