#!/usr/bin/env bash
# Corral end to end on a laptop with Docker: a kind cluster, the images built from this checkout and
# loaded into it, KubeRay (its Helm chart), Corral (charts/corral), the example pool with sim engines, and
# requests through the router. Needs docker, kind, kubectl, helm, curl, jq and ~12 GiB for Docker
# (the Ray head asks for 8 GiB).
#
# Usage:
#   e2e/kind/run.sh             run everything; deletes the cluster at the end unless KEEP=1
#   e2e/kind/run.sh --dry-run   print the steps (commands) without running anything (no tools needed)
# Environment:
#   CLUSTER (corral)  KIND_NODE_IMAGE (kindest/node:v1.33.1)  KUBERAY_VERSION (1.5.0)  TAG (dev)  KEEP (0)
#   WITH_VLLM (false; true builds the Ray image with vLLM, for GPU nodes only)
#
# kind nodes have no GPUs: the script advertises a fake `nvidia.com/gpu` capacity on the worker node
# (node status patch, as in "Advertise Extended Resources for a Node") and gives it the GPU product labels
# the example pool selects; the sim engines never touch a GPU.
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER="${CLUSTER:-corral}"
KIND_NODE_IMAGE="${KIND_NODE_IMAGE:-kindest/node:v1.33.1}"
KUBERAY_VERSION="${KUBERAY_VERSION:-1.5.0}"
TAG="${TAG:-dev}"
KEEP="${KEEP:-0}"
WITH_VLLM="${WITH_VLLM:-false}"
NS=corral-system
OPERATOR_IMAGE="corral-operator:$TAG"
RAY_IMAGE="corral-ray:$TAG"
CTX="kind-$CLUSTER"
DRY_RUN=0

case "${1:-}" in
  --dry-run) DRY_RUN=1 ;;
  -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
  "") ;;
  *) echo "run.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
esac

step() { printf '\n== %s\n' "$*"; }
# run CMD...: print it; execute it unless --dry-run
run() {
  printf '+ %s\n' "$*"
  if ((DRY_RUN == 0)); then "$@"; fi
}

CORRAL="${CORRAL:-$(command -v corral || echo .venv/bin/corral)}"
ROUTER=http://127.0.0.1:18080
corral_doctor() { "$CORRAL" doctor --context "$CTX"; }
check_models() {
  curl -sf "$ROUTER/v1/models" \
    | jq -e '[.data[].id] | (index("llama-3.1-8b-instruct") != null) and (index("support-bot") != null)'
}
check_completion() {
  curl -sf "$ROUTER/v1/chat/completions" -H 'Content-Type: application/json' \
    -d '{"model":"support-bot","messages":[{"role":"user","content":"hello"}],"max_tokens":8}' \
    | jq -e '.choices[0].message.content | length > 0'
}

if ((DRY_RUN == 0)); then
  for tool in docker kind kubectl helm curl jq; do
    command -v "$tool" >/dev/null || { echo "run.sh: $tool not found on PATH" >&2; exit 1; }
  done
fi

cleanup() {
  local rc=$?
  if [[ -n "${PF_PID:-}" ]]; then kill "$PF_PID" 2>/dev/null || true; fi
  rm -f "${KIND_CONFIG:-}"
  if ((DRY_RUN == 0)) && [[ "$KEEP" != "1" ]]; then
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  fi
  exit "$rc"
}
trap cleanup EXIT

step "1. kind cluster $CLUSTER (one control-plane, one worker)"
KIND_CONFIG="$(mktemp)"
cat >"$KIND_CONFIG" <<EOF
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
  - role: worker
EOF
if ((DRY_RUN == 0)) && kind get clusters | grep -qx "$CLUSTER"; then
  echo "reusing kind cluster $CLUSTER"
else
  run kind create cluster --name "$CLUSTER" --image "$KIND_NODE_IMAGE" --config "$KIND_CONFIG" --wait 120s
fi
K=(kubectl --context "$CTX")

step "2. images from this checkout, loaded into the cluster"
run docker build -f images/operator.Dockerfile -t "$OPERATOR_IMAGE" .
run docker build -f images/ray.Dockerfile --build-arg "WITH_VLLM=$WITH_VLLM" -t "$RAY_IMAGE" .
run kind load docker-image "$OPERATOR_IMAGE" "$RAY_IMAGE" --name "$CLUSTER"

step "3. fake GPUs on the worker: the example pool's node labels + nvidia.com/gpu capacity"
WORKER="$CLUSTER-worker"
run "${K[@]}" label node "$WORKER" --overwrite \
  nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3 corral.dev/gpu-class=H100
run "${K[@]}" patch node "$WORKER" --subresource=status --type=json \
  -p '[{"op":"add","path":"/status/capacity/nvidia.com~1gpu","value":"8"}]'
# the example's a100 class selects A100 nodes: point it at the same worker by relabelling in step 6

step "4. KubeRay $KUBERAY_VERSION (its Helm chart)"
run helm --kube-context "$CTX" repo add kuberay https://ray-project.github.io/kuberay-helm/ --force-update
run helm --kube-context "$CTX" install kuberay-operator kuberay/kuberay-operator \
  --version "$KUBERAY_VERSION" --namespace kuberay-system --create-namespace --wait --timeout 5m

step "5. Corral (charts/corral) with the local images and laptop-sized engine pods"
run "${K[@]}" create namespace "$NS"
run helm --kube-context "$CTX" lint --strict charts/corral
run helm --kube-context "$CTX" install corral charts/corral --namespace "$NS" \
  --set operator.image.repository=corral-operator --set "operator.image.tag=$TAG" \
  --set operator.image.pullPolicy=Never \
  --set operator.rayImage.repository=corral-ray --set "operator.rayImage.tag=$TAG" \
  --set operator.workerCpu=500m --set operator.workerMemory=2Gi \
  --set router.service.namespace=default \
  --wait --timeout 5m
run corral_doctor

step "6. the example ModelPool + RoutingPolicy (sim engines), scaled to one replica per class"
run "${K[@]}" apply -f manifests/examples/
run "${K[@]}" patch modelpool llama-8b --type=json -p '[
  {"op":"replace","path":"/spec/gpuClasses/0/minReplicas","value":1},
  {"op":"replace","path":"/spec/gpuClasses/0/replicas","value":1},
  {"op":"replace","path":"/spec/gpuClasses/1/replicas","value":1},
  {"op":"replace","path":"/spec/gpuClasses/1/nodeSelector","value":{"nvidia.com/gpu.product":"NVIDIA-H100-80GB-HBM3"}}]'
run "${K[@]}" wait --for=create rayservice/llama-8b --timeout=120s
run "${K[@]}" wait --for=condition=Ready modelpool/llama-8b --timeout=15m

step "7. requests through the router (service/corral-router)"
run helm --kube-context "$CTX" test corral --namespace "$NS" --logs
if ((DRY_RUN == 0)); then
  "${K[@]}" -n default port-forward service/corral-router 18080:8080 >/dev/null 2>&1 &
  PF_PID=$!
  for _ in $(seq 1 60); do curl -sf "$ROUTER/v1/models" >/dev/null && break; sleep 1; done
fi
run check_models
run check_completion

step "8. delete the examples (finalized by the operator), uninstall"
run "${K[@]}" delete -f manifests/examples/ --timeout=120s
run helm --kube-context "$CTX" uninstall corral --namespace "$NS" --wait
echo
echo "kind e2e: OK"
