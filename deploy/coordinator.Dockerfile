# The coordinator: Flower's SuperLink, which starts the fedistill ServerApp for each run.
# Build from the repository root:
#   docker build -f deploy/coordinator.Dockerfile -t fedistill-coordinator:0.1.0 .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The CPU build, installed before the project so that `pip install .` finds torch satisfied
# instead of pulling the CUDA build (gigabytes the coordinator never uses) from PyPI.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# Only what the distribution is built from, so a change to tests/ or bench/ keeps the layer cached.
WORKDIR /opt/fedistill
COPY pyproject.toml requirements.txt README.md ./
COPY common common
COPY server server
COPY client client
COPY fedistill fedistill
COPY conf conf
# The SuperLink runs with runtime dependency installation disabled: every package a run
# needs must be in the image, so install them here.
RUN pip install .

# A fixed numeric id: Kubernetes' runAsNonRoot can only verify a numeric USER, and the
# directories below are owned by it so that a fresh named volume starts out writable.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/fedistill fedistill \
    && mkdir -p /var/lib/fedistill /etc/fedistill/certs \
    && chown fedistill:fedistill /var/lib/fedistill
USER 10001:10001

# The SuperLink's database and the runs' output directories: they must outlive the container.
# The TLS files (ca.crt, server.crt, server.key) are mounted read-only at /etc/fedistill/certs.
VOLUME ["/var/lib/fedistill"]

# 8000: Fleet, Control and Runtime APIs (Flower 1.41 serves them on one port).
# 9400: the ServerApp's Prometheus metrics, while a run is going.
EXPOSE 8000 9400

ENTRYPOINT ["fedistill", "coordinator"]
# The metrics listen on every interface of the container only: compose and Kubernetes keep
# that port on their own network (neither publishes it on the host).
CMD ["--certs", "/etc/fedistill/certs", "--host", "0.0.0.0", "--port", "8000", \
     "--state", "/var/lib/fedistill", "--metrics-host", "0.0.0.0", "--metrics-port", "9400"]
