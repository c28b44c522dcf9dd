# The two commands of the README: `make reproduce` and `make test`. Each bootstraps .venv.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0
# Optional: a torch index, e.g. TORCH_INDEX=https://download.pytorch.org/whl/cpu for a CPU build
TORCH_INDEX ?=
STAMP  := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9][0-9]_*.ipynb))
PRESET ?= quick
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export MPLBACKEND ?= Agg

.PHONY: setup reproduce test lab lint clean

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "$(TORCH)" > $(VENV)/constraints.txt
	$(BIN)/python -m pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH)"
	$(BIN)/python -m pip install --quiet -c $(VENV)/constraints.txt -e ".[test]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (scalebio)" >/dev/null
	@touch $(STAMP)

setup: $(STAMP)

reproduce: setup
	@mkdir -p build/notebooks figures
	@set -e; for nb in $(NOTEBOOKS); do \
		name=$$(basename $$nb); start=$$(date +%s); \
		echo "== $$name (PRESET=$(PRESET))"; \
		(cd notebooks && ../$(BIN)/papermill --log-level WARNING --no-progress-bar \
			$$name ../build/notebooks/$$name -p PRESET $(PRESET)); \
		echo "   done in $$(( $$(date +%s) - start )) s"; \
	done
	@echo "figures written to figures/; executed notebooks in build/notebooks/"

test: setup
	$(BIN)/python -m ruff check scalebio_core tests benchmarks
	$(BIN)/python -m pytest

lab: setup
	$(BIN)/jupyter lab notebooks

lint: setup
	$(BIN)/python -m ruff check --fix scalebio_core tests benchmarks
	$(BIN)/python -m ruff format scalebio_core tests benchmarks

clean:
	rm -rf build .pytest_cache
