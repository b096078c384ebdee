# syntax=docker/dockerfile:1
# wsss in a container: `docker build --build-arg VARIANT=cpu|cuda -t wsss:<variant> .`
#
#   base-<variant>  Python 3.11 in a virtual environment at /opt/venv
#   builder         compiles pydensecrf2 (sdist only; needs gcc, g++ and the Python headers) into a wheel
#   runtime         torch + torchvision from the variant's index, then wsss with requirements/constraints.txt
#
# cpu:  python:3.11-slim, CPU-only torch wheels from https://download.pytorch.org/whl/cpu (about 1 GB smaller).
# cuda: CUDA_IMAGE (an nvidia/cuda runtime image on Ubuntu 22.04) + Python 3.11 (deadsnakes) + the default
#       torch wheels from PyPI, which bundle their own CUDA libraries; keep CUDA_IMAGE's CUDA major equal to
#       `torch.version.cuda` (the tested stack is torch 2.14.1 with CUDA 13.0). The host needs a matching
#       NVIDIA driver and the NVIDIA container toolkit (`docker run --gpus all ...`).

ARG VARIANT=cpu
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu22.04

# ---------------------------------------------------------------------------------------------- bases
FROM python:3.11-slim AS base-cpu
# The official image already ships the Python headers, so the builder only adds the compilers.
ENV WSSS_BUILD_PACKAGES="gcc g++"
RUN python -m venv /opt/venv

FROM ${CUDA_IMAGE} AS base-cuda
ENV DEBIAN_FRONTEND=noninteractive \
    WSSS_BUILD_PACKAGES="gcc g++ python3.11-dev"
# Ubuntu 22.04 has no stable Python 3.11 (numpy 2.4 and pandas 3 need >= 3.11): take it from deadsnakes.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
 && apt-get purge -y --auto-remove software-properties-common \
 && rm -rf /var/lib/apt/lists/* \
 && python3.11 -m venv /opt/venv

# ---------------------------------------------------------------------------------------------- builder
# hadolint ignore=DL3006
FROM base-${VARIANT} AS builder
# hadolint ignore=DL3008,SC2086
RUN apt-get update \
 && apt-get install -y --no-install-recommends ${WSSS_BUILD_PACKAGES} \
 && rm -rf /var/lib/apt/lists/*
COPY requirements/constraints.txt /tmp/constraints.txt
# pydensecrf2 imports as `pydensecrf`; its sdist builds against numpy 2 in an isolated build env.
# hadolint ignore=DL3013
RUN /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check -U pip \
 && /opt/venv/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels \
      "$(grep -E '^pydensecrf2==' /tmp/constraints.txt)"

# ---------------------------------------------------------------------------------------------- runtime
# hadolint ignore=DL3006
FROM base-${VARIANT} AS runtime
ARG VARIANT
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MLFLOW_DISABLE_TELEMETRY=true \
    DVC_NO_ANALYTICS=1 \
    GX_ANALYTICS_ENABLED=false \
    TORCH_HOME=/work/data/torch

COPY requirements/constraints.txt /tmp/constraints.txt
# 1) torch and torchvision at the pinned versions, from the variant's index. The CPU index names them
#    2.14.1+cpu; PEP 440 lets `==2.14.1` match that local version, but step 2 uses the constraints minus the
#    torch lines anyway, so it can never swap the torch build for another one.
# hadolint ignore=DL3013,SC2046
RUN set -eu; \
    if [ "$VARIANT" = cpu ]; then index="--index-url https://download.pytorch.org/whl/cpu"; else index=""; fi; \
    pip install -U pip; \
    pip install $index $(grep -E '^(torch|torchvision)==' /tmp/constraints.txt); \
    grep -vE '^(torch|torchvision)==' /tmp/constraints.txt > /tmp/constraints-rest.txt

# 2) wsss itself, editable from /work/wsss: the code that runs is the code dvc.yaml's deps hash.
RUN useradd --create-home --uid 1000 wsss
WORKDIR /work
COPY --from=builder /wheels /tmp/wheels
COPY pyproject.toml README.md params.yaml dvc.yaml ./
COPY wsss ./wsss
RUN pip install -c /tmp/constraints-rest.txt /tmp/wheels/*.whl -e . \
 && rm -rf /tmp/wheels /tmp/constraints*.txt \
 && mkdir -p data mlruns \
 && chown -R wsss:wsss /work

# Numeric, so `runAsNonRoot` checks (Kubernetes) can verify it.
USER 1000:1000
# A DVC project without git, so `docker run --entrypoint dvc IMAGE repro` runs the main pipeline here.
RUN dvc init --no-scm -q && wsss --help > /dev/null

VOLUME ["/work/data", "/work/mlruns"]
ENTRYPOINT ["wsss"]
CMD ["--help"]
