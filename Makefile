# Set-up is part of every target: a venv with the pinned requirements, rebuilt only when
# requirements.txt changes (fast when already installed).
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)

.PHONY: setup repro test bench browser

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

test: setup browser postgres
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python -m bench.cnn_throughput

.PHONY: postgres team-up team-down wheels gpu-check

# Debian's PostgreSQL for the team services (tests/test_team.py starts its own cluster in a temp folder).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq postgresql >/dev/null; } \
		|| echo "PostgreSQL could not be installed: tests/test_team.py will be skipped"

# The team services (PostgreSQL, SeaweedFS S3, MLflow server) in .team/: eval "$$(make -s team-up)".
team-up: setup postgres
	@$(BIN)/python -m team.services start

team-down: setup
	@$(BIN)/python -m team.services stop

# Wheels for the offline GPU check (bench/gpu_check.sh installs from .whl/; torch & co. are there).
wheels: setup
	@mkdir -p .whl
	$(BIN)/python bench/gpu_wheels.py > .whl/requirements.txt
	$(BIN)/python -m pip download -q --no-deps -d .whl -r .whl/requirements.txt
	@du -sh .whl

gpu-check:
	bash bench/gpu_check.sh
