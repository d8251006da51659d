# The Ray image of Corral's RayServices: Ray (KubeRay starts it with `ray start`) + corral[serve]
# (engines, routers, the Serve application the operator's serveConfigV2 imports). Sim engines by default;
# vLLM with --build-arg WITH_VLLM=true on the GPU base:
#   docker build -f images/ray.Dockerfile -t ghcr.io/corral-dev/corral-ray:0.1.0 .
#   docker build -f images/ray.Dockerfile --build-arg RAY_IMAGE=rayproject/ray:2.60.0-py311-gpu \
#     --build-arg WITH_VLLM=true -t ghcr.io/corral-dev/corral-ray:0.1.0-vllm .
# The Ray version must be the one corral pins (ray[serve]==2.60.0); base images pinned by exact tag.
ARG RAY_IMAGE=rayproject/ray:2.60.0-py311-cpu

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

FROM ${RAY_IMAGE}
ARG WITH_VLLM=false
ARG VLLM_VERSION=0.33.0
COPY --from=build /dist/ /tmp/dist/
RUN extras="serve" \
 && if [ "$WITH_VLLM" = "true" ]; then extras="serve,vllm"; fi \
 && pip install --no-cache-dir "$(ls /tmp/dist/corral-*.whl)[$extras]" \
 && if [ "$WITH_VLLM" = "true" ]; then pip install --no-cache-dir "vllm==${VLLM_VERSION}"; fi \
 && rm -rf /tmp/dist
# the base image's non-root user (ray, uid 1000); KubeRay supplies the container command (ray start)
USER 1000:100
