#!/usr/bin/env bash
# Build a Docker-free local Kubernetes control plane from Go modules (via GOPROXY), cached per version set:
#   kube-apiserver, kube-controller-manager, kube-scheduler, kubectl  (k8s.io/kubernetes via a wrapper module)
#   etcd (go.etcd.io/etcd/server/v3 via a wrapper module), kwok (+ its default stage YAMLs), helm,
#   ray-operator (KubeRay's operator, github.com/ray-project/kuberay/ray-operator)
#
# Usage:
#   e2e/cluster/build.sh                 build whatever is missing, then print the bin dir (last stdout line)
#   e2e/cluster/build.sh --print-bin-dir print where the binaries are / would be, build nothing
#   e2e/cluster/build.sh --check         exit 0 if every binary is present in the bin dir, 1 otherwise
#
# Environment:
#   K8S_VERSION ETCD_VERSION KWOK_VERSION HELM_VERSION KUBERAY_VERSION   versions (defaults below)
#   CORRAL_CACHE   cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/corral)
#   K8S_BIN_DIR    bin dir override (default $CORRAL_CACHE/k8s/<k8s>-etcd<v>-kwok<v>-helm<v>)
#   K8S_BUILD_DIR  scratch dir for the wrapper modules (default $CORRAL_CACHE/k8s-build)
#   JOBS           go build -p (default: nproc)
# Needs: Go >= 1.26, python3, flock (util-linux), network access to GOPROXY (+ its sumdb, or GOSUMDB=off).
# Idempotent and safe to run concurrently: finished binaries are skipped (a warm run takes well under a
# second), builds happen in a staging dir and are moved in atomically, and a lock serialises parallel runs.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.37.2}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.14}"   # any go.etcd.io/etcd/server/v3 v3.6.x / v3.7.x the proxy serves
KWOK_VERSION="${KWOK_VERSION:-v0.8.0}"    # last release whose go.mod says `go 1.26.0` (kwok main needs go 1.27)
HELM_VERSION="${HELM_VERSION:-v3.22.0}"
KUBERAY_VERSION="${KUBERAY_VERSION:-v1.5.0}"   # `go list -m -versions github.com/ray-project/kuberay/ray-operator`
CACHE="${CORRAL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/corral}"
OUT="${K8S_BIN_DIR:-$CACHE/k8s/$K8S_VERSION-etcd$ETCD_VERSION-kwok$KWOK_VERSION-helm$HELM_VERSION}"
WORK="${K8S_BUILD_DIR:-$CACHE/k8s-build}"
# ray-operator is not in the bin-dir name: an older cache dir just gets it built (--check fails until then).
BINARIES=(kube-apiserver kube-controller-manager kube-scheduler kubectl etcd kwok helm ray-operator)
FILES=(kwok-stages.yaml)

all_present() {
  local b
  for b in "${BINARIES[@]}"; do [[ -x "$OUT/$b" ]] || return 1; done
  for b in "${FILES[@]}"; do [[ -s "$OUT/$b" ]] || return 1; done
}

case "${1:-}" in
  --print-bin-dir) printf '%s\n' "$OUT"; exit 0 ;;
  --check) all_present && exit 0
           echo "missing control-plane binaries in $OUT (run: make k8s-bins)" >&2; exit 1 ;;
  -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
  "") ;;
  *) echo "build.sh: unknown argument '$1' (try --help)" >&2; exit 2 ;;
esac

T0=$SECONDS
log() { printf '[build.sh %s +%ss] %s\n' "$(date -u +%H:%M:%S)" "$((SECONDS - T0))" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }
STEP="startup"
STAGE=""
on_exit() {
  local rc=$?
  [[ -z "$STAGE" ]] || rm -rf "$STAGE"
  ((rc == 0)) || log "FAILED during: $STEP (exit $rc). Bin dir: $OUT. Re-running only rebuilds what is missing."
}
trap on_exit EXIT

if all_present; then
  log "all binaries already present (cached)"
  printf '%s\n' "$OUT"
  exit 0
fi

command -v go >/dev/null || die "go not found on PATH (need Go >= 1.26: https://go.dev/dl/)"
command -v python3 >/dev/null || die "python3 not found on PATH"
GO_MINOR="$(go env GOVERSION | sed -E 's/^go1\.([0-9]+).*/\1/')"
if ! [[ "$GO_MINOR" =~ ^[0-9]+$ ]] || ((GO_MINOR < 26)); then
  log "warning: $(go env GOVERSION) is older than go1.26; relying on GOTOOLCHAIN to fetch a newer one"
fi

export GOWORK=off CGO_ENABLED=0
export GOFLAGS=""                 # `go install pkg@ver` rejects most -mod values; keep it empty
: "${GOTOOLCHAIN:=auto}"; export GOTOOLCHAIN   # lets go fetch a newer toolchain *via GOPROXY* if a go.mod asks for it
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"

mkdir -p "$OUT" "$WORK"
# One build at a time per cache (parallel CI jobs / xdist workers would otherwise race and thrash 2 cores).
if command -v flock >/dev/null; then
  exec 9>"$WORK/.lock"
  if ! flock -n 9; then
    log "another build.sh holds $WORK/.lock; waiting for it"
    flock 9
  fi
  if all_present; then log "built by the concurrent run"; printf '%s\n' "$OUT"; exit 0; fi
fi

STAGE="$(mktemp -d "$WORK/stage.XXXXXX")"
# move finished artefacts from the staging dir into $OUT (same filesystem => atomic rename)
publish() { local f; for f in "$@"; do mv -f "$STAGE/$f" "$OUT/$f"; done; }

# drop go's per-module chatter ("go: downloading ..."), keep real messages; go's exit status survives (pipefail)
quiet() { grep -v -E '^go: (downloading|added|upgraded|finding) ' >&2 || true; }
json_field() { python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }
# run `go mod download` outside any module so a half-written wrapper go.mod can't interfere
mod_download() { (cd "$STAGE" && go mod download -json "$1"); }

K8S_MINOR="${K8S_VERSION#v1.}"; K8S_MINOR="${K8S_MINOR%%.*}"       # 37
STAGING_VERSION="v0.${K8S_VERSION#v1.}"                             # v0.37.2
BUILD_DATE="$(date -u +%Y-%m-%dT%H:%M:%SZ)"

log "building into $OUT (k8s $K8S_VERSION, etcd $ETCD_VERSION, kwok $KWOK_VERSION, helm $HELM_VERSION, kuberay $KUBERAY_VERSION, -p $JOBS)"

# ---------------------------------------------------------------- kubernetes
K8S_BINS=(kube-apiserver kube-controller-manager kube-scheduler kubectl)
missing=0; for b in "${K8S_BINS[@]}"; do [[ -x "$OUT/$b" ]] || missing=1; done
if ((missing)); then
  STEP="kubernetes $K8S_VERSION: wrapper module"
  log "$STEP"
  d="$WORK/k8s-$K8S_VERSION"; mkdir -p "$d"; cd "$d"; rm -f go.mod go.sum
  # `go install k8s.io/kubernetes/cmd/...@v` is refused (its go.mod replaces the staging modules with
  # ./staging/src/...). Derive the replace list from k8s.io/kubernetes' own go.mod: every
  # `k8s.io/X => ./staging/src/k8s.io/X` becomes `k8s.io/X => k8s.io/X v0.MINOR.PATCH`.
  kmod="$(mod_download "k8s.io/kubernetes@$K8S_VERSION" | json_field GoMod)"
  kgo="$(awk '$1=="go"{print $2; exit}' "$kmod")"
  {
    printf 'module local/k8s-control-plane-build\n\ngo %s\n\nreplace (\n' "$kgo"
    awk -v v="$STAGING_VERSION" '
      { if ($1 == "replace") { $1 = ""; $0 = $0 } }
      $2 == "=>" && $3 ~ /^\.\/staging\/src\// { printf "\t%s => %s %s\n", $1, $1, v }' "$kmod"
    printf ')\n'
  } > go.mod
  nrep="$(grep -c ' => ' go.mod || true)"
  ((nrep > 20)) || die "only $nrep staging replaces derived from k8s.io/kubernetes@$K8S_VERSION go.mod; format changed?"
  log "wrapper go.mod: go $kgo, $nrep staging replaces -> $STAGING_VERSION"
  # `tool` directives (Go >= 1.24) make the main packages roots of the module graph.
  STEP="kubernetes $K8S_VERSION: go get -tool (module downloads)"
  log "$STEP"
  go get -tool \
    "k8s.io/kubernetes/cmd/kube-apiserver@$K8S_VERSION" \
    "k8s.io/kubernetes/cmd/kube-controller-manager@$K8S_VERSION" \
    "k8s.io/kubernetes/cmd/kube-scheduler@$K8S_VERSION" \
    "k8s.io/kubernetes/cmd/kubectl@$K8S_VERSION" 2>&1 | quiet
  # Version ldflags: without them /version says v0.0.0-master, which breaks helm's kubeVersion checks.
  X="-X k8s.io/component-base/version"; C="-X k8s.io/client-go/pkg/version"
  LDF="-s -w"
  for p in "$X" "$C"; do
    LDF+=" $p.gitVersion=$K8S_VERSION $p.gitMajor=1 $p.gitMinor=$K8S_MINOR $p.gitTreeState=clean"
    LDF+=" $p.gitCommit=0000000000000000000000000000000000000000 $p.buildDate=$BUILD_DATE"
  done
  STEP="kubernetes $K8S_VERSION: go build ${K8S_BINS[*]}"
  log "$STEP (the slow part: ~5-15 min on 2 cores with a cold build cache)"
  go build -p "$JOBS" -trimpath -ldflags "$LDF" -o "$STAGE/" \
    k8s.io/kubernetes/cmd/kube-apiserver \
    k8s.io/kubernetes/cmd/kube-controller-manager \
    k8s.io/kubernetes/cmd/kube-scheduler \
    k8s.io/kubernetes/cmd/kubectl
  got="$("$STAGE/kube-apiserver" --version)"
  [[ "$got" == "Kubernetes $K8S_VERSION" ]] || die "built kube-apiserver reports '$got', expected 'Kubernetes $K8S_VERSION'"
  publish "${K8S_BINS[@]}"
  log "kubernetes binaries done"
fi

# ---------------------------------------------------------------- etcd
if [[ ! -x "$OUT/etcd" ]]; then
  # server/go.mod has `replace ../api` etc. -> `go install go.etcd.io/etcd/server/v3@...` is refused;
  # as a *dependency* those replaces are ignored and its requires (api/v3, client/*, pkg/v3 at the
  # same tag) are used, so a wrapper module builds it. server/main.go is `package main`.
  STEP="etcd $ETCD_VERSION"
  log "$STEP"
  d="$WORK/etcd-$ETCD_VERSION"; mkdir -p "$d"; cd "$d"; rm -f go.mod go.sum
  printf 'module local/etcd-build\n\ngo 1.26.0\n' > go.mod
  go get -tool "go.etcd.io/etcd/server/v3@$ETCD_VERSION" 2>&1 | quiet
  go build -p "$JOBS" -trimpath -ldflags "-s -w" -o "$STAGE/etcd" go.etcd.io/etcd/server/v3
  publish etcd
fi

# ---------------------------------------------------------------- kwok (+ its default stages)
if [[ ! -x "$OUT/kwok" ]]; then
  STEP="kwok $KWOK_VERSION"
  log "$STEP"
  GOBIN="$STAGE" go install -trimpath -ldflags "-s -w" "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION"
  publish kwok
fi
if [[ ! -s "$OUT/kwok-stages.yaml" ]]; then
  # The standalone kwok binary has NO built-in stages ("no stages found" otherwise); kwokctl embeds
  # these same files. They ship inside the module zip.
  STEP="kwok $KWOK_VERSION stage files"
  log "$STEP"
  kdir="$(mod_download "sigs.k8s.io/kwok@$KWOK_VERSION" | json_field Dir)"
  first=1
  for f in kustomize/stage/node/fast/node-initialize.yaml \
           kustomize/stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
           kustomize/stage/pod/fast/pod-ready.yaml \
           kustomize/stage/pod/fast/pod-complete.yaml \
           kustomize/stage/pod/fast/pod-delete.yaml; do
    [[ -s "$kdir/$f" ]] || die "kwok module zip lacks $f"
    [[ $first == 1 ]] || printf -- '---\n'; first=0
    cat "$kdir/$f"; printf '\n'
  done > "$STAGE/kwok-stages.yaml"
  publish kwok-stages.yaml
fi

# ---------------------------------------------------------------- helm
if [[ ! -x "$OUT/helm" ]]; then
  STEP="helm $HELM_VERSION"
  log "$STEP"
  # `go install` leaves helm's version empty and its client-side KubeVersion at v1.20; set both.
  H="-X helm.sh/helm/v3"
  GOBIN="$STAGE" go install -trimpath -ldflags "-s -w \
      $H/internal/version.version=$HELM_VERSION \
      $H/pkg/chartutil.k8sVersionMajor=1 $H/pkg/chartutil.k8sVersionMinor=$K8S_MINOR \
      $H/pkg/lint/rules.k8sVersionMajor=1 $H/pkg/lint/rules.k8sVersionMinor=$K8S_MINOR" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  publish helm
fi

# ---------------------------------------------------------------- KubeRay operator
if [[ ! -x "$OUT/ray-operator" ]]; then
  # The module root is the operator's main package and its go.mod has no replace directives, so a
  # plain `go install` works. Its CRDs (config/crd/bases/) are vendored in manifests/third_party/kuberay/.
  STEP="kuberay ray-operator $KUBERAY_VERSION"
  log "$STEP (~3-5 min on 2 cores with a cold build cache)"
  GOBIN="$STAGE" go install -trimpath -ldflags "-s -w" \
    "github.com/ray-project/kuberay/ray-operator@$KUBERAY_VERSION" 2>&1 | quiet
  [[ -x "$STAGE/ray-operator" ]] || die "go install produced no ray-operator binary"
  publish ray-operator
fi

STEP="final check"
all_present || die "some artefacts are still missing in $OUT"
log "done in $((SECONDS - T0))s: $("$OUT/kube-apiserver" --version), $("$OUT/etcd" --version | head -1), helm $("$OUT/helm" version --short), $("$OUT/kwok" --version 2>&1 | cut -d" " -f1-3)"
printf '%s\n' "$OUT"
