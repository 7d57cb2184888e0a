# The orchestrator (control plane) image, for `docker compose` / `make up`.
# It drives the host's engine through the mounted Docker socket; sandboxes never get that socket.

ARG BASE_IMAGE=tci-base:bookworm

FROM ${BASE_IMAGE} AS builder
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/orchestrator
# Optional proxy CA staged by `make up`; it stays in this stage.
COPY sandbox-image/ca/ /tmp/ca/
RUN if [ -s /tmp/ca/ca.pem ]; then cat /tmp/ca/ca.pem >> /etc/ssl/certs/ca-certificates.crt; fi
# Dependencies first, read from pyproject.toml (cached until it changes), then the code.
COPY pyproject.toml /src/
RUN set -e; \
    if [ -s /tmp/ca/ca.pem ]; then export PIP_CERT=/etc/ssl/certs/ca-certificates.crt; fi; \
    /opt/orchestrator/bin/python -c "import tomllib; print('\\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/deps.txt; \
    /opt/orchestrator/bin/pip install --no-cache-dir --disable-pip-version-check -r /tmp/deps.txt
COPY README.md /src/
COPY orchestrator/ /src/orchestrator/
RUN /opt/orchestrator/bin/pip install --no-cache-dir --no-deps --disable-pip-version-check /src \
 && /opt/orchestrator/bin/python -c "import orchestrator.app"

FROM ${BASE_IMAGE}
ARG DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/orchestrator /opt/orchestrator
ENV PATH=/opt/orchestrator/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    ORCH_HOST=0.0.0.0 \
    ORCH_PORT=8000
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
ENTRYPOINT ["python", "-m", "orchestrator"]
