# The Corral operator image: `corral operator run` (kopf) and the rest of the `corral` CLI, no Ray.
# Build from the repository root:
#   docker build -f images/operator.Dockerfile -t ghcr.io/corral-dev/corral-operator:0.1.0 .
# Base images pinned by exact tag (add @sha256:<digest> when publishing from CI).

FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
RUN pip install --no-cache-dir "build==1.2.2.post1"
COPY pyproject.toml hatch_build.py README.md ./
COPY proto proto
COPY api api
COPY router router
COPY serve serve
COPY operator operator
COPY bench bench
RUN python -m build --wheel --outdir /dist

FROM python:3.11.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 HOME=/tmp
COPY --from=build /dist/ /tmp/dist/
RUN pip install --no-cache-dir "$(ls /tmp/dist/corral-*.whl)[operator]" \
 && rm -rf /tmp/dist \
 && useradd --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin corral
USER 10001:10001
EXPOSE 8080 9443
ENTRYPOINT ["corral"]
CMD ["operator", "run", "--all-namespaces", "--liveness=http://0.0.0.0:8080/healthz"]
