# Two entry points: `make run` (install, then serve the shipped default model) and `make test`.
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 0.0.0.0
PORT ?= 8000

.PHONY: install run test lint clean

install: $(VENV)/.installed

# One resolve for server, trainer and tests: mediapipe 0.10.21 pins numpy<2 and protobuf<5,
# and torch is pinned to the CPU build (an unpinned torch pulls a multi-GB CUDA build).
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[train,dev]'
	touch $@

run: install
	$(BIN)/mgstream serve --host $(HOST) --port $(PORT)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: install
	$(BIN)/ruff check .
	$(BIN)/pytest -q -ra

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
