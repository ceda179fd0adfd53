# One image for the kubelet plugin, the controller and the webhook, built from pyproject.toml:
#   docker build -t ghcr.io/partita-dev/partita:0.1.0 .
# The default user is non-root; the chart runs the plugin as root (it writes the kubelet's directories
# and /var/run/cdi on the host) and the controller and webhook as 65532.
# Every dependency comes from requirements-runtime.lock (exact versions, sha256-checked; hack/lock.sh refreshes it).
FROM python:3.11-slim AS build
WORKDIR /src
COPY requirements-runtime.lock pyproject.toml README.md ./
COPY driver ./driver
COPY controller ./controller
RUN pip install --no-cache-dir --disable-pip-version-check --require-hashes --only-binary=:all: \
      -r requirements-runtime.lock \
 && pip wheel --no-cache-dir --disable-pip-version-check --no-deps --no-build-isolation --wheel-dir /wheels .

FROM python:3.11-slim
LABEL org.opencontainers.image.title="partita" \
      org.opencontainers.image.description="Kubernetes DRA driver and operator for NVIDIA GPUs" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/partita-dev/partita"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /wheels
COPY requirements-runtime.lock /tmp/
RUN pip install --no-cache-dir --require-hashes --only-binary=:all: -r /tmp/requirements-runtime.lock \
 && pip install --no-cache-dir --no-deps /wheels/partita-*.whl \
 && rm -rf /wheels /tmp/requirements-runtime.lock \
 && groupadd --system --gid 65532 partita \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --shell /usr/sbin/nologin partita
USER 65532:65532
ENTRYPOINT ["partita"]
CMD ["--help"]
