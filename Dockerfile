# GeoPak: the Dagster code location, its CLI and the training entry point in one image (issue 14.4).
#
# CPU (default):
#   docker build -t geopak:cpu .
# CUDA (a CUDA runtime base and PyTorch's CUDA wheels):
#   docker build -t geopak:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# Optional extras (for example the Kubernetes executor, deploy/k8s/): --build-arg EXTRAS=k8s
#
# Entry point: `dagster`. The default command serves the code location over gRPC (what a Dagster deployment's
# user-code server runs); `docker run geopak:cpu job execute -m pipeline.definitions -j run_pipeline_job` runs
# the main job in the container. The data root is /data (mount the shared volume there: every worker must see
# it at the same path); DAGSTER_HOME is /opt/dagster/home (mount an instance config, Postgres for a cluster).
#
# Not built in CI here: the build needs the base image and the wheel indexes, which these machines cannot reach.

ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG EXTRAS=""
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    DAGSTER_HOME=/opt/dagster/home \
    GEOPAK_DATA_ROOT=/data \
    HF_HUB_OFFLINE=1 \
    MPLBACKEND=Agg

# A CUDA base image has no Python: install the distribution's (>= 3.11 on ubuntu 24.04). A compiler for the
# few dependencies that may build from source (hdbscan) is removed again after the install.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates build-essential \
    $(command -v python3 >/dev/null || echo python3 python3-venv python3-dev) \
 && python3 -m venv "$VIRTUAL_ENV" \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# dependencies first (a layer that survives code edits): torch from the chosen index, then the rest from PyPI
COPY pyproject.toml README.md ./
RUN python -m pip install --upgrade pip \
 && python -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
open('/tmp/torch.txt', 'w').write('\n'.join(x for x in d if x.split('=')[0] in ('torch', 'torchvision')))" \
 && python -m pip install --index-url "$TORCH_INDEX_URL" -r /tmp/torch.txt

COPY . .
RUN python -m pip install ".${EXTRAS:+[$EXTRAS]}" \
 && apt-get purge -y build-essential && apt-get autoremove -y \
 && mkdir -p "$DAGSTER_HOME" /data \
 && cp dagster_home/dagster.yaml "$DAGSTER_HOME/dagster.yaml" \
 && python -c "import pipeline.definitions, pipeline.train_entry"

EXPOSE 4000
ENTRYPOINT ["dagster"]
CMD ["api", "grpc", "--host", "0.0.0.0", "--port", "4000", "--module-name", "pipeline.definitions", \
     "--working-directory", "/app"]
