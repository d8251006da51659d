#!/usr/bin/env bash
# Build a Docker-free local Kubernetes control plane from the Go module proxy:
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl  (k8s.io/kubernetes via a wrapper module)
#   etcd (go.etcd.io/etcd/server/v3 via a wrapper module), kwok, helm (plain `go install pkg@version`)
# Needs: Go >= 1.26, python3, network access to GOPROXY (+ its sumdb proxy, or GONOSUMDB/GOSUMDB=off).
# Idempotent: skips anything already present in $OUT.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.37.2}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.14}"   # any go.etcd.io/etcd/server/v3 v3.6.x / v3.7.x the proxy serves
KWOK_VERSION="${KWOK_VERSION:-v0.8.0}"    # last release whose go.mod says `go 1.26.0` (kwok main needs go 1.27)
HELM_VERSION="${HELM_VERSION:-v3.22.0}"
CACHE="${CORRAL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/corral}"
OUT="${K8S_BIN_DIR:-$CACHE/k8s/$K8S_VERSION-etcd$ETCD_VERSION-kwok$KWOK_VERSION-helm$HELM_VERSION}"
WORK="${K8S_BUILD_DIR:-$CACHE/k8s-build}"

export GOWORK=off CGO_ENABLED=0
export GOFLAGS=""                 # `go install pkg@ver` rejects most -mod values; keep it empty
: "${GOTOOLCHAIN:=auto}"; export GOTOOLCHAIN   # lets go fetch a newer toolchain *via GOPROXY* if a go.mod asks for it
JOBS="${JOBS:-$(nproc)}"

mkdir -p "$OUT" "$WORK"
json_field() { python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }
# run `go mod download` outside any module so a half-written wrapper go.mod can't interfere
mod_download() { (cd "$(mktemp -d)" && go mod download -json "$1"); }

K8S_MINOR="${K8S_VERSION#v1.}"; K8S_MINOR="${K8S_MINOR%%.*}"       # 37
STAGING_VERSION="v0.${K8S_VERSION#v1.}"                             # v0.37.2
BUILD_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)"

# ---------------------------------------------------------------- kubernetes
if [[ ! -x "$OUT/kube-apiserver" || ! -x "$OUT/kube-controller-manager" || ! -x "$OUT/kube-scheduler" || ! -x "$OUT/kubectl" ]]; then
  d="$WORK/k8s-$K8S_VERSION"; mkdir -p "$d"; cd "$d"; rm -f go.mod go.sum
  # Derive the replace list from k8s.io/kubernetes' own go.mod (every `k8s.io/X => ./staging/src/k8s.io/X`
  # becomes `k8s.io/X => k8s.io/X v0.MINOR.PATCH`). This keeps the list complete for any 1.3x version.
  kmod="$(mod_download "k8s.io/kubernetes@$K8S_VERSION" | json_field GoMod)"
  kgo="$(awk '$1=="go"{print $2; exit}' "$kmod")"
  {
    printf 'module local/k8s-control-plane-build\n\ngo %s\n\nreplace (\n' "$kgo"
    awk -v v="$STAGING_VERSION" '
      { if ($1 == "replace") { $1 = ""; $0 = $0 } }
      $2 == "=>" && $3 ~ /^\.\/staging\/src\// { printf "\t%s => %s %s\n", $1, $1, v }' "$kmod"
    printf ')\n'
  } > go.mod
  echo "== wrapper go.mod:"; cat go.mod
  # `tool` directives (Go >= 1.24) make the main packages roots of the module graph.
  go get -tool \
    "k8s.io/kubernetes/cmd/kube-apiserver@$K8S_VERSION" \
    "k8s.io/kubernetes/cmd/kube-controller-manager@$K8S_VERSION" \
    "k8s.io/kubernetes/cmd/kube-scheduler@$K8S_VERSION" \
    "k8s.io/kubernetes/cmd/kubectl@$K8S_VERSION"
  go mod tidy   # optional; go.sum is already complete after `go get -tool`
  X="-X k8s.io/component-base/version"; C="-X k8s.io/client-go/pkg/version"
  LDF="-s -w"
  for p in "$X" "$C"; do
    LDF+=" $p.gitVersion=$K8S_VERSION $p.gitMajor=1 $p.gitMinor=$K8S_MINOR $p.gitTreeState=clean"
    LDF+=" $p.gitCommit=0000000000000000000000000000000000000000 $p.buildDate=$BUILD_DATE"
  done
  time go build -p "$JOBS" -trimpath -ldflags "$LDF" -o "$OUT/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubectl
fi

# ---------------------------------------------------------------- etcd
if [[ ! -x "$OUT/etcd" ]]; then
  # server/go.mod has `replace ../api` etc. -> `go install go.etcd.io/etcd/server/v3@...` is refused;
  # as a *dependency* those replaces are ignored and its requires (api/v3, client/*, pkg/v3 at the
  # same tag) are used, so a wrapper module builds it. server/main.go is `package main`.
  d="$WORK/etcd-$ETCD_VERSION"; mkdir -p "$d"; cd "$d"; rm -f go.mod go.sum
  printf 'module local/etcd-build\n\ngo 1.26.0\n' > go.mod
  go get -tool "go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  time go build -p "$JOBS" -trimpath -ldflags "-s -w" -o "$OUT/etcd" go.etcd.io/etcd/server/v3
fi

# ---------------------------------------------------------------- kwok (+ its default stages)
if [[ ! -x "$OUT/kwok" ]]; then
  GOBIN="$OUT" go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
fi
if [[ ! -s "$OUT/kwok-stages.yaml" ]]; then
  # The standalone kwok binary has NO built-in stages ("no stages found" otherwise); kwokctl embeds
  # these same files. They ship inside the module zip.
  kdir="$(mod_download "sigs.k8s.io/kwok@$KWOK_VERSION" | json_field Dir)"
  first=1
  for f in kustomize/stage/node/fast/node-initialize.yaml \
           kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
           kustomize/stage/pod/fast/pod-ready.yaml \
           kustomize/stage/pod/fast/pod-complete.yaml \
           kustomize/stage/pod/fast/pod-delete.yaml; do
    [[ $first == 1 ]] || printf -- '---\n'; first=0
    cat "$kdir/$f"; printf '\n'
  done > "$OUT/kwok-stages.yaml"
fi

# ---------------------------------------------------------------- helm
if [[ ! -x "$OUT/helm" ]]; then
  H="-X helm.sh/helm/v3"
  GOBIN="$OUT" go install -trimpath -ldflags "-s -w \
      $H/internal/version.version=$HELM_VERSION \
      $H/pkg/chartutil.k8sVersionMajor=1 $H/pkg/chartutil.k8sVersionMinor=$K8S_MINOR \
      $H/pkg/lint/rules.k8sVersionMajor=1 $H/pkg/lint/rules.k8sVersionMinor=$K8S_MINOR" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
fi

ls -la "$OUT"
"$OUT/kube-apiserver" --version
"$OUT/etcd" --version | head -1
"$OUT/helm" version --short || true
