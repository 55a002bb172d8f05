# Set-up is part of every target: a venv with the pinned requirements, rebuilt only when
# requirements.txt changes (fast when already installed).
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)

.PHONY: setup repro test bench browser estimate

setup: $(STAMP)

$(STAMP): requirements.txt
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $@

# The whole pipeline with the default params (real data; needs the internet or DATA_MIRROR).
repro: setup
	dvc repro

# Debian's Chromium for the report's browser test (Playwright drives it; no browser download).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

test: setup browser
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python -m bench.cnn_throughput

# The projected time of every stage `dvc repro` would run here with the current params (runs none).
estimate: setup
	$(BIN)/python -m bench.estimate
