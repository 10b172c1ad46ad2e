# Mandant — `make serve` and `make test` are the whole set-up.
PYTHON     ?= python3
VENV       ?= .venv
BIN        := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=
# The suite runs in this many pytest processes (pytest-xdist), each taking whole test
# files: most of a test's time is spent waiting on the servers it starts, so three keep
# two cores busy. TEST_JOBS=0: one process, in order.
TEST_JOBS  ?= 3

.PHONY: install install-test triton-venv redis-server grpc-balancer serve test lint typecheck protos protos-check clean browser-tools node-tools loadtest bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned: a plain `torch` requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: $(BIN)/python pyproject.toml clients/python/pyproject.toml
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e clients/python -e .
	touch $@

# A real Triton for the Triton backend's tests (PyTriton bundles the server binary). Its
# own venv: nvidia-pytriton pins numpy<2, protobuf<7 and an older tritonclient.
TRITON_VENV ?= .venv-triton
$(TRITON_VENV)/.installed:
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/pip install -q "nvidia-pytriton==0.7.0"
	touch $@

triton-venv: $(TRITON_VENV)/.installed

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# `make serve` serves the built-in demo (public demo keys, 127.0.0.1 only); your own
# configuration: make serve ARGS="--config mandant.yaml".
ARGS ?= --demo
serve: install
	$(BIN)/mandant serve $(ARGS)

protos: install-test
	$(BIN)/python protos/generate.py

protos-check: install-test
	$(BIN)/python protos/generate.py --check

lint: install-test
	$(BIN)/ruff check server clients tests benchmarks loadtests

typecheck: install-test
	$(BIN)/mypy server/mandant clients/python/mandant_client benchmarks

# A real redis-server for the shared-limits tests (Debian's package).
redis-server:
	command -v redis-server || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server)

# A real L7 gRPC load balancer for the replica tests (Debian's nginx: grpc_pass).
grpc-balancer:
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y nginx-light)

# Bytecode is written and kept whatever PYTHONDONTWRITEBYTECODE says: without it every
# server process the tests start compiled Mandant's sources again, and every pytest
# process rewrote the assertions of every test module (10-15 s of CPU each).
test: install-test triton-venv redis-server grpc-balancer browser-tools node-tools protos-check lint typecheck
	$(BIN)/python -m compileall -q -j 0 server clients/python > /dev/null
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile $(PYTEST_ARGS)

# Issues 10 and 11: the benchmarks in sequence; tables in benchmarks/results/ (≈ 18 min, quiet machine).
bench: install-test triton-venv
	PYTHON=$(BIN)/python benchmarks/run_all.sh

clean:
	rm -rf $(VENV) $(TRITON_VENV) .pytest_cache .mypy_cache .ruff_cache

# Debian's chromium (dashboard browser test) and prometheus (promtool checks the
# alert rules), installed when missing.
browser-tools:
	@command -v chromium >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)
	@command -v promtool >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y prometheus)

# Node.js and npm for the Node client's test (Debian's packages), installed when missing.
node-tools:
	@command -v npm >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y nodejs npm)

# Headless locust against a running server (`make serve` in another shell):
#   make loadtest DURATION=2m USERS=30 TARGET=127.0.0.1:8001 SCENARIO=loadtests/noisy_neighbour.yaml
DURATION   ?= 60s
USERS      ?= 20
SPAWN_RATE ?= 20
TARGET     ?= 127.0.0.1:8001
SCENARIO   ?= loadtests/noisy_neighbour.yaml
loadtest: install-test
	mkdir -p loadtests/reports
	MANDANT_TARGET=$(TARGET) MANDANT_LOADTEST_CONFIG=$(SCENARIO) $(BIN)/locust \
		-f loadtests/locustfile.py --headless -u $(USERS) -r $(SPAWN_RATE) -t $(DURATION) \
		--csv loadtests/reports/mandant --html loadtests/reports/mandant.html \
		--only-summary --stop-timeout 5
	@echo "reports: loadtests/reports/mandant_stats.csv, loadtests/reports/mandant.html"
