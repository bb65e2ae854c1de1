# A partner site: Flower's SuperNode, which runs the fedistill ClientApp on the site's records.
# Build from the repository root:
#   docker build -f deploy/site.Dockerfile -t fedistill-site:0.1.0 .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The CPU build, installed before the project so that `pip install .` finds torch satisfied
# instead of pulling the CUDA build (gigabytes) from PyPI. A site with a GPU builds its own
# image with the matching wheel.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# Only what the distribution is built from, so a change to tests/ or bench/ keeps the layer cached.
WORKDIR /opt/fedistill
COPY pyproject.toml requirements.txt README.md ./
COPY common common
COPY server server
COPY client client
COPY fedistill fedistill
COPY conf conf
RUN pip install .

# A fixed numeric id: Kubernetes' runAsNonRoot can only verify a numeric USER, and the
# directories below are owned by it so that a fresh named volume starts out writable.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/fedistill fedistill \
    && mkdir -p /var/lib/fedistill/ledger /var/cache/fedistill /data /etc/fedistill/certs \
    && chown fedistill:fedistill /var/lib/fedistill/ledger /var/cache/fedistill
USER 10001:10001

# The ledger is the site's privacy record: losing it would let the budget be spent again,
# so even a forgotten mount keeps it out of the container's writable layer. The cache holds
# teachers fitted on this site and parsed data. /data holds the site's records (mounted
# read-only); the site file (/etc/fedistill/site.yaml), the CA certificate and the site's
# key (/etc/fedistill/certs) are mounted read-only too.
VOLUME ["/var/lib/fedistill/ledger", "/var/cache/fedistill", "/data"]

# Nothing is exposed: the SuperNode only dials out, and the site's metrics listen on the
# container's loopback (the site file's metrics_host) for a Prometheus of the site's own.

ENTRYPOINT ["fedistill", "site"]
CMD ["--config", "/etc/fedistill/site.yaml"]
