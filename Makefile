# One command each, enough on a fresh Linux machine that reaches the package registries:
#   make run    set up, fetch the versioned dataset, then the profile that fits the machine, preflight
#               first: the study (`dvc repro`) on a CUDA GPU, the quick profile without one;
#               PROFILE=study or PROFILE=quick chooses (the study on a CPU takes days)
#   make quick  set up and run the whole pipeline on a 2-core CPU (params.quick.yaml)
#   make test   set up and run the tests
#   make ui     mlflow ui on this project's runs; prints the address of the profile's runs table
#   make serve  serve the profile's @champion over HTTP (PORT=5001 by default); without PROFILE, ui and
#               serve open the profile whose champion was registered last
#   make bench  set up and print the performance table (bench/)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# A pip constraint file on some machines caps torch below the locked release; the lock decides.
export PIP_CONSTRAINT :=
export PATH := $(abspath $(BIN)):$(PATH)
# OpenMP threads that spin while they wait make torch on a shared CPU up to 10x slower when anything
# else runs (bench/README.md measured it); passive waiting costs little when the machine is idle.
export OMP_WAIT_POLICY ?= PASSIVE

# study | quick; empty: the study on a CUDA GPU, the quick profile without one (`transfer-study profile`)
PROFILE ?=
PORT ?=

.PHONY: setup system-deps venv data run run-study run-quick quick ui serve test bench clean-quick lock

setup: venv system-deps

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python >= 3.11 is needed"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

venv: $(STAMP)

# Fashion-MNIST from Debian, where apt is available; elsewhere `data fetch` downloads it.
system-deps:
	@if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; \
	fi

# Fetch the default dataset when data/raw is empty, fill the DVC cache with it, and check that it is
# the version data.dvc records (dvc commit must leave data.dvc unchanged). Your own data is left alone.
data: setup
	@if [ -z "$$(ls -A data/raw 2>/dev/null)" ]; then \
	  transfer-study data fetch && mkdir -p .dvc/tmp && cp data.dvc .dvc/tmp/data.dvc.expected && \
	  dvc commit --force --quiet data.dvc && \
	  if ! cmp -s data.dvc .dvc/tmp/data.dvc.expected; then \
	    cp .dvc/tmp/data.dvc.expected data.dvc; \
	    echo "error: the fetched data/raw differs from the version in data.dvc; check the locked Pillow" >&2; exit 1; \
	  fi; \
	fi
	dvc status data.dvc

# Without a GPU and without PROFILE, `profile --estimate` also prints how long the study would take here.
run: data
	@profile=$$(transfer-study profile --estimate $(PROFILE)) && $(MAKE) --no-print-directory run-$$profile

# run-study and run-quick are run's two branches (after `data`); each ends with the same closing lines.
run-study:
	transfer-study plan
	dvc repro
	@transfer-study next-steps

# The quick profile's own DVC pipeline (it brings the shared data stages up to date first): a second
# run with nothing changed runs no stage and registers nothing new.
run-quick:
	transfer-study --params params.quick.yaml plan
	dvc repro profiles/quick/dvc.yaml
	@transfer-study --params params.quick.yaml next-steps

quick: data
	@$(MAKE) --no-print-directory run-quick

# Without PROFILE, ui and serve open the profile whose champion was registered last (the one you ran).
ui: setup
	@params=$$(transfer-study profile --registered --params-file $(PROFILE)) && \
	  transfer-study --params $$params ui $(if $(PORT),--port $(PORT))

serve: setup
	@params=$$(transfer-study profile --registered --params-file $(PROFILE)) && \
	  transfer-study --params $$params serve $(if $(PORT),--port $(PORT))

test: setup
	$(BIN)/python -m pytest -m "slow or not slow" -q

# The split of the profile bench/run.py measures here: the quick profile's on a CPU, the study's on a GPU.
bench: data
	@if [ "$$(transfer-study profile)" = quick ]; then dvc repro profiles/quick/dvc.yaml:split; else dvc repro split; fi
	$(BIN)/python bench/run.py

clean-quick:
	rm -rf outputs/quick

lock: venv
	$(BIN)/python scripts/lock.py
