# Mandant server image. CUDA-capable base: torch uses the GPU when the container
# runs with one (docker run --gpus all …, or nvidia.com/gpu in Kubernetes), the CPU
# otherwise.
# Not built or run in this project's CI (no docker on its build machine); the
# Kubernetes manifests in deploy/k8s are tested by rendering and schema validation.
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 mandant

# Sources only (.dockerignore keeps out virtual environments, .git, caches, weights).
WORKDIR /src
COPY . .

# A CUDA build of torch (set TORCH_SPEC to pin another), then Mandant and its client,
# installed (not editable): the image runs from /opt/venv, not from /src.
ARG TORCH_SPEC="torch==2.13.0"
RUN python3.11 -m venv /opt/venv \
 && /opt/venv/bin/pip install "${TORCH_SPEC}" \
 && /opt/venv/bin/pip install ./clients/python . \
 && rm -rf /src

# Writable places for a read-only root filesystem: mount volumes here (Kubernetes:
# emptyDir at /tmp and /var/lib/mandant/models, see deploy/k8s).
RUN mkdir -p /etc/mandant /var/lib/mandant/models \
 && chown mandant:mandant /var/lib/mandant/models
WORKDIR /var/lib/mandant

USER 10001
ENV PATH=/opt/venv/bin:$PATH HOME=/tmp
# 8000 KServe v2 REST, 8001 KServe v2 gRPC (+ gRPC health), 8002 metrics/dashboard.
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8002/readyz', timeout=2).status == 200 else 1)"

# The image serves the configuration you mount: nothing by default (no demo keys).
# Mount it at /etc/mandant/mandant.yaml, or pass another path:
#   docker run -v $PWD/conf:/etc/mandant -p 8001:8001 mandant
#   docker run -v $PWD/conf:/conf mandant --config /conf/mandant.yaml
# Listen addresses come from the file (server.host: 0.0.0.0 to be reachable from
# outside the container; server.http_host puts the HTTP port, dashboard and /metrics,
# on another address). The public-key demo (`--demo`) is not in the image: it needs a
# source checkout (examples/demo), and `mandant serve --demo` says so here.
ENTRYPOINT ["mandant", "serve"]
CMD ["--config", "/etc/mandant/mandant.yaml"]
