# absence-sync worker image.
#   docker build -t registry.example.com/absence-sync:0.1.0 .
# Production image: the package and its runtime dependencies only (no embedded
# broker, database or CalDAV server, no test tools), run as uid 10001 like the
# Kubernetes manifests in deploy/kubernetes expect.

FROM python:3.11-slim AS build
WORKDIR /src
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
COPY pyproject.toml README.md ./
COPY consumer ./consumer
RUN pip wheel --wheel-dir /wheels .

FROM python:3.11-slim
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    ABSENCE_SYNC_HTTP_PORT=8080 ABSENCE_SYNC_LOG_FORMAT=json
RUN groupadd --gid 10001 absence-sync \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin absence-sync
COPY --from=build /wheels /wheels
RUN pip install --no-index --find-links=/wheels absence-sync && rm -rf /wheels
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"]
ENTRYPOINT ["absence-sync"]
CMD ["run"]
