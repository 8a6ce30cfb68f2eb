# Two commands do everything on a fresh clone:
#   make book   environment, install, execute the notebooks, build the HTML book (warnings are errors)
#   make test   the same environment, then ruff, the unit tests, nbval over every notebook, and the browser
#               check of the built book (tests/browser_check.py; skipped, saying why, without chromium)
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
NPM     ?= npm
# The browser check drives Debian's chromium. As root with CI=true, `make` installs it with apt-get.
CHROMIUM ?= /usr/bin/chromium
NODE_STAMP := node_modules/.installed

.PHONY: env test lint unit nbval book browser-check chromium bench clean

env: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip "setuptools>=77"
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $@

test: lint unit nbval browser-check

# ruff (configured in pyproject.toml; book/ruff.toml for the notebooks' narrower cells)
lint: env
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

unit: env
	$(PY) -m pytest tests $(PYTEST_ARGS)

nbval: env
	$(PY) -m pytest --nbval-lax --nbval-current-env -p no:randomly book $(PYTEST_ARGS)

# MathJax, RequireJS and the widget manager are served with the book (package.json), not loaded from CDNs.
$(NODE_STAMP): package.json package-lock.json
	$(NPM) ci --no-audit --no-fund
	touch $@

book: env $(NODE_STAMP)
	$(BIN)/jupyter-book build . --warningiserror --keep-going

browser-check: book chromium
	CHROMIUM=$(CHROMIUM) $(PY) -m pytest tests/browser_check.py $(PYTEST_ARGS)

chromium:
	@if [ -x "$(CHROMIUM)" ]; then :; \
	elif [ "$$CI" = true ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "Installing Debian's chromium for the browser check (CI=true, root)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else \
		echo "No browser at $(CHROMIUM): the browser check will be skipped (set CHROMIUM, or run as root with CI=true to install Debian's chromium)"; \
	fi

bench: env
	$(PY) benchmarks/step_speed.py

clean:
	rm -rf $(VENV) _build .pytest_cache node_modules
