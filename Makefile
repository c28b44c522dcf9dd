# The two commands of the README: `make reproduce` and `make test`. Each bootstraps .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0
# Optional: a torch index, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu for a CPU build
TORCH_INDEX ?=
export TORCH_INDEX
STAMP  := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
PRESET ?= quick
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export MPLBACKEND ?= Agg

.PHONY: setup reproduce test lab lint clean browser peers

# torch first (from TORCH_INDEX when given), then the package with the exact tested versions
$(STAMP): pyproject.toml constraints.txt Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[all,test]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (scalebio)" >/dev/null
	@touch $(STAMP)

setup: $(STAMP)

# the optional peers of benchmarks/peers.py (Betty, BOAT) at the versions tested: see the
# `peers` extra in pyproject.toml for why two of them come without their declared dependencies
PEERS_STAMP := $(VENV)/.peers
$(PEERS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[peers]" higher==0.2.1
	$(BIN)/python -m pip install --quiet --no-deps --ignore-requires-python \
		betty-ml==0.1.1 boat-torch==1.1.1
	@touch $(PEERS_STAMP)

peers: $(PEERS_STAMP)

# the notebooks' training runs go to build/runs, made afresh each time (regenerable); only this
# target writes the committed figures/ (elsewhere, e.g. `make lab`, they go to build/figures)
# each notebook's result sentence and runtime go to build/results; at quick they rewrite the
# README table's last two columns (scalebio_core/lab/results.py)
reproduce: setup
	@rm -rf build/runs build/results && mkdir -p build/notebooks build/runs build/results figures
	@set -e; export SCALEBIO_RUNS=$(CURDIR)/build/runs SCALEBIO_RESULTS=$(CURDIR)/build/results \
		SCALEBIO_FIGURES=$(CURDIR)/figures; \
	for nb in $(NOTEBOOKS); do \
		name=$$(basename $$nb); start=$$(date +%s); \
		echo "== $$name (PRESET=$(PRESET))"; \
		(cd notebooks && ../$(BIN)/papermill --log-level WARNING --no-progress-bar \
			$$name ../build/notebooks/$$name -p PRESET $(PRESET)); \
		secs=$$(( $$(date +%s) - start )); echo $$secs > build/results/$${name%.ipynb}.seconds; \
		echo "   done in $$secs s"; \
	done
	@if [ "$(PRESET)" = quick ]; then $(BIN)/python -m scalebio_core.lab.results README.md build/results; fi
	@echo "figures written to figures/; executed notebooks in build/notebooks/"

# Debian's chromium for the browser test, where it is missing and this user may install it
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing Debian's chromium for the browser test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is missing and cannot be installed here: the browser test will be skipped"; fi; }

# notebooks: ruff reads each notebook's py:percent twin (notebooks/NN_*.py), not the .ipynb
test: setup peers browser
	$(BIN)/python -m ruff check scalebio_core tests benchmarks notebooks
	$(BIN)/python -m ruff format --check scalebio_core tests benchmarks
	$(BIN)/python -m pytest

lab: setup
	$(BIN)/jupyter lab notebooks

# the twins are brought up to date with their notebooks, fixed, and the fixes taken back
lint: setup
	$(BIN)/jupytext --sync --quiet $(NOTEBOOKS)
	$(BIN)/python -m ruff check --fix scalebio_core tests benchmarks notebooks
	$(BIN)/python -m ruff format scalebio_core tests benchmarks
	$(BIN)/jupytext --sync --quiet $(NOTEBOOKS)

clean:
	rm -rf build .pytest_cache
