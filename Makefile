# Two commands do everything on a fresh clone:
#   make book   environment, install, execute the notebooks, build the HTML book (warnings are errors)
#   make test   the same environment, then the unit tests and nbval over every notebook
#
# TORCH is what pip installs first. The default takes a CPU build of torch that this kind of machine
# keeps on disk (fast, no multi-GB CUDA download); elsewhere override it, e.g. `make test TORCH=torch`.

PYTHON  ?= python3
VENV    ?= .venv
TORCH   ?= torch==2.13.0
BIN     := $(VENV)/bin
PY      := $(BIN)/python
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: env test unit nbval book browser-check bench clean

env: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

test: unit nbval

unit: env
	$(PY) -m pytest tests $(PYTEST_ARGS)

nbval: env
	$(PY) -m pytest --nbval-lax --nbval-current-env -p no:randomly book $(PYTEST_ARGS)

book: env
	$(BIN)/jupyter-book build . --warningiserror --keep-going

bench: env
	$(PY) benchmarks/step_speed.py

clean:
	rm -rf $(VENV) _build .pytest_cache
