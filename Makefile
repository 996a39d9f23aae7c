# Set-up and entry points. `make test` and `make demo` do all set-up on a fresh machine.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= dev,video,text,logging,curate,demo

.PHONY: setup test lint demo clean

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	PY=$(PY) EXTRAS=$(EXTRAS) bash scripts/setup.sh
	touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/python -m pytest -q tests

lint: setup
	$(BIN)/ruff check mugv tests tools scripts

demo: setup
	$(BIN)/mugv demo --out runs/demo --overwrite

clean:
	rm -rf $(VENV) runs
