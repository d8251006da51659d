# Thin wrappers; the scripts hold the logic. Override the interpreter with `make PY=python3 ...`.
PY ?= .venv/bin/python
PYTEST_ARGS ?=

.PHONY: help demo k8s-bins k8s-bin-dir k8s-up test test-unit test-integration lint bench-docs

help:
	@echo "make k8s-bins          build (or reuse cached) kube-apiserver/KCM/scheduler/kubectl/etcd/kwok/helm/ray-operator (KubeRay)"
	@echo "make k8s-bin-dir       print where those binaries live"
	@echo "make k8s-up            start a local control plane (prints export lines; stop: e2e/cluster/down.sh DIR)"
	@echo "make demo              set up .venv and run the local demo (scripts/demo.sh)"
	@echo "make test              the whole suite as CI runs it (scripts/test.sh)"
	@echo "make test-unit         pytest -m 'not integration'"
	@echo "make test-integration  pytest -m integration"
	@echo "make lint              ruff check + ruff format --check"
	@echo "make bench-docs        rerun the benchmarks into docs/benchmarks (fleet family ~25 min, then router/overhead/peers/...)"

k8s-bins:
	bash e2e/cluster/build.sh

k8s-bin-dir:
	@bash e2e/cluster/build.sh --print-bin-dir

k8s-up:
	bash e2e/cluster/up.sh

demo:
	bash scripts/demo.sh

test:
	bash scripts/test.sh $(PYTEST_ARGS)

test-unit:
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

test-integration:
	$(PY) -m pytest -m integration $(PYTEST_ARGS)

lint:
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The committed results: `corral bench X` alone writes to ./corral-bench/.
bench-docs:
	bash scripts/fleet-docs.sh   # every simulated-fleet result (suite, seeds, held-out, dualmap_paper, ablation, CPU KV tier)
	.venv/bin/corral bench router --out docs/benchmarks
	.venv/bin/corral bench overhead --ray --out docs/benchmarks
	.venv/bin/corral bench recovery --out docs/benchmarks
	.venv/bin/corral bench load --out docs/benchmarks
	.venv/bin/corral bench peers --out docs/benchmarks   # runs sglang-router / vllm-router when installed (corral[peers])
	.venv/bin/corral bench security --out docs/benchmarks
	.venv/bin/python -m corral.bench.grpc_breakdown --out docs/benchmarks
