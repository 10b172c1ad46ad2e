# Mandant server image. CUDA-capable base: torch uses the GPU when the container
# runs with one (docker run --gpus all …), the CPU otherwise.
# Not built or run in this project's CI (no docker there); kept deliberately simple.
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 mandant
WORKDIR /opt/mandant
COPY --chown=mandant:mandant . .

# A CUDA build of torch (set TORCH_SPEC to pin another), then Mandant and its client.
ARG TORCH_SPEC="torch==2.13.0"
RUN python3.11 -m venv /opt/venv \
 && /opt/venv/bin/pip install "${TORCH_SPEC}" \
 && /opt/venv/bin/pip install -e ./clients/python -e . \
 && chown -R mandant:mandant /opt/mandant/examples

USER mandant
ENV PATH=/opt/venv/bin:$PATH
EXPOSE 8001 8002
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8002/readyz', timeout=2).status == 200 else 1)"

# Mount your configuration and models, e.g. -v $PWD/conf:/conf, and pass
# --config /conf/mandant.yaml. Without --config the demo runs (demo keys only!).
ENTRYPOINT ["mandant", "serve", "--host", "0.0.0.0"]
