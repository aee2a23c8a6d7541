# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1

.PHONY: venv data demo quick test test-all lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

# Fashion-MNIST: Debian's package where apt-get is available; otherwise gradtail downloads it from the
# official mirror itself (or says clearly where it looked).
data:
	@if [ -d /usr/share/datasets/fashion-mnist ] || [ -n "$$GRADTAIL_DATA" ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) \
			|| echo "apt-get could not install dataset-fashion-mnist; gradtail will try the official download"; \
	else echo "no Debian package manager: gradtail will download Fashion-MNIST itself"; fi

# The main job: a few methods on real Fashion-MNIST-LT IF100 (a few minutes on 2 cores); prints the
# results table and writes runs/bench/demo/report.html. `make quick` runs every registered method.
demo: venv data
	$(VENV)/bin/gradtail bench suites/demo.yaml

quick: venv data
	$(VENV)/bin/gradtail bench suites/quick.yaml

test: venv data
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/pytest

test-all: venv data
	$(VENV)/bin/pytest -m ""

lint: venv
	$(VENV)/bin/ruff check src tests benchmarks

# Speed benchmarks (JSON under runs/bench/): loader share of a step, gradtail vs a torchvision-DataLoader
# reference loop, per-step cost of every method relative to CE (and GBG's for G = 2, 4, 8), GBG's
# grouping memory at ImageNet scale. On a GPU: benchmarks/gpu_200_epochs.py.
bench: venv data
	$(PY) benchmarks/loader_throughput.py --output runs/bench/loader_throughput.json
	$(PY) benchmarks/reference_loop.py --output runs/bench/reference_loop.json
	$(PY) benchmarks/step_cost.py --suite suites/quick.yaml --output runs/bench/step_cost.json
	$(PY) benchmarks/step_cost.py --suite suites/gbg_cost.yaml --output runs/bench/step_cost_gbg.json
	$(PY) benchmarks/grouping_memory.py --output runs/bench/grouping_memory.json

clean:
	rm -rf runs .pytest_cache .ruff_cache
