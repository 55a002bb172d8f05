# Paths are quoted in recipes: the checkout may live in a folder whose name has a space.
# Set-up is part of every target: a venv with the pinned requirements, rebuilt only when
# requirements.txt changes (fast when already installed).
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)

.PHONY: setup repro test test-fast bench browser params plots-template mutate estimate

setup: $(STAMP)

$(STAMP): requirements.txt
	python3 -m venv "$(VENV)"
	"$(BIN)/python" -m pip install -q --upgrade pip
	"$(BIN)/python" -m pip install -q -r requirements.txt
	touch "$@"

# The whole pipeline with the default params (real data; needs the internet or DATA_MIRROR).
repro: setup
	dvc repro

# Debian's Chromium for the report's browser test (Playwright drives it; no browser download).
browser:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium >/dev/null; }

test: setup browser postgres slurm
	"$(BIN)/python" -m pytest

# The inner loop: the unit tests (no DVC subprocess, no services, no apt); what make mutate runs.
test-fast: setup
	"$(BIN)/python" -m pytest tests/unit -q

bench: setup
	"$(BIN)/python" -m bench.cnn_throughput

# Check params.yaml without running anything.
params: setup
	"$(BIN)/python" -m pipeline.params

# Rebuild the offline `dvc plots show` template (vega, vega-lite, vega-embed inlined) from npm.
plots-template: setup
	"$(BIN)/python" vega/build_template.py

# Mutation testing (slow; not in CI): mutate pipeline/data, models, train and the report builder,
# run the fast unit tests (tests/unit) against each mutant, print the kill rate per module.
# MUTATE=pipeline.train.* limits the run to some mutants (a glob on mutant names).
# One BLAS/OpenMP thread per mutant: mutmut already runs MUTATE_JOBS of them side by side.
mutate: setup
	rm -rf mutants
	OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 TQDM_DISABLE=1 \
		"$(BIN)/mutmut" run --max-children $${MUTATE_JOBS:-2} $(if $(MUTATE),'$(MUTATE)')
	"$(BIN)/python" -m bench.mutation_report --survivors
.PHONY: postgres team-up team-down wheels gpu-check slurm sweep

# Debian's Slurm and munge for tests/test_slurm.py (it starts its own munged, slurmctld, slurmd).
slurm:
	@command -v sbatch >/dev/null && test -x /usr/sbin/slurmd || { apt-get update -qq && apt-get install -y -qq slurm-wlm munge >/dev/null; } \
		|| echo "Slurm could not be installed: tests/test_slurm.py will skip (and fail under CI)"

# A -S grid as one Slurm array job: make sweep ARGS="-S 'backprop.lr=choice(0.01,0.05)' --wait backprop"
sweep: setup
	"$(BIN)/python" -m team.slurm sweep $(ARGS)

# Debian's PostgreSQL for the team services (tests/test_team.py starts its own cluster in a temp folder).
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq postgresql >/dev/null; } \
		|| echo "PostgreSQL could not be installed: tests/test_team.py will be skipped"

# The team services (PostgreSQL, SeaweedFS S3, MLflow server) in .team/: eval "$$(make -s team-up)".
team-up: setup postgres
	@"$(BIN)/python" -m team.services start

team-down: setup
	@"$(BIN)/python" -m team.services stop

# Wheels for the offline GPU check (bench/gpu_check.sh installs from .whl/; torch & co. are there).
# The GPU check's wheels for the device's CPython 3.12 manylinux x86-64 (not this venv's Python),
# then the size of what travels (wheels + working tree); fails above 60 MiB. Needs the network.
WHEEL_PLATFORMS := $(foreach n,28 27 17,--platform manylinux_2_$(n)_x86_64) --platform manylinux2014_x86_64 --platform manylinux1_x86_64
wheels:
	@mkdir -p .whl && rm -f .whl/*.whl
	"$(BIN)/python" -m bench.gpu_wheels > .whl/requirements.txt
	"$(BIN)/python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(WHEEL_PLATFORMS) -d .whl -r .whl/requirements.txt
	"$(BIN)/python" -m bench.gpu_wheels --size .whl

# On the GPU machine (carry .whl); `bash bench/gpu_check.sh --dry-run` runs it at toy size on a CPU.
gpu-check:
	bash bench/gpu_check.sh
# The projected time of every stage `dvc repro` would run here with the current params (runs none).
estimate: setup
	"$(BIN)/python" -m bench.estimate

# Wait until DVC's queue is empty (before `dvc exp show`); QUEUE_TIMEOUT seconds, default 24 h.
.PHONY: queue-wait
queue-wait: setup
	"$(BIN)/python" -m pipeline.queue wait
