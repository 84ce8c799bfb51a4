# gradtrace: every target installs what it needs into .venv first (a fresh clone needs only python3).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev
# pytest workers; the suite is sized for 2 cores.
JOBS   ?= 2

.PHONY: install test test-fast lint format demo demo-data reproduce-table1 reproduce-architectures \
	sweep sweep-local bench \
	gpu-check dist clean

# Reinstalls whenever pyproject.toml changes.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -n $(JOBS) --dist worksteal --durations=15

# Everything but the slow real-data and multi-process tests.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -n $(JOBS) -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(STAMP)
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

# Real data for the demo and the smoke table: local copy, download, or (offline Debian, root) apt.
demo-data: $(STAMP)
	@sh scripts/fetch-demo-data.sh $(BIN)/python

# Writes runs/demo/ (summary.md, gradient_flow.png, the runs); exit status 1 when one of the
# study's claims does not hold.
demo: demo-data
	@$(BIN)/python -m gradtrace.studies.demo $(ARGS)

# The runs, report.md and figures/ go to runs/table1/ (BUDGET=smoke: runs/table1-smoke/);
# ARGS=--update-reports also refreshes the committed reports/table1.md and reports/figures/.
# ARGS passes more options through, e.g. ARGS="--from runs/sweeps/table1" or, for the runs
# themselves, ARGS="-- --data.root=/datasets/cifar". One line per run (its output is in its
# launch.log); exit status 1 when a run failed or a claim of the report does not hold.
reproduce-table1: $(STAMP) $(if $(filter smoke,$(BUDGET)),demo-data)
	$(BIN)/python -m gradtrace.studies.table1 --budget $(or $(BUDGET),full) $(if $(GPUS),--gpus $(GPUS)) $(ARGS)

# The architecture comparison: BUDGET=smoke trains every model of sweeps/architectures.yaml but
# the 110-layer twins on Fashion-MNIST on a CPU (under 10 minutes) into
# runs/architectures-smoke/; the full budget runs that grid (GPUS=0,1,... one run per GPU) into
# runs/architectures/. report.md and figures/ go there; ARGS=--update-reports also refreshes
# reports/architectures.md and reports/figures/architectures_*.png. Exit status 1 when a run
# failed or a claim does not hold.
reproduce-architectures: $(STAMP) $(if $(filter smoke,$(BUDGET)),demo-data)
	$(BIN)/python -m gradtrace.studies.architectures --budget $(or $(BUDGET),full) $(if $(GPUS),--gpus $(GPUS)) $(ARGS)

# DDP=N runs each cell as one DDP run over N of the GPUS (same global batch). One line per
# agent as it ends; each agent's output, its runs' included, is in runs/sweeps/<grid>/agent-<n>.log.
sweep: $(STAMP)
	$(BIN)/python -m gradtrace.sweeps agents $(SWEEP) $(if $(GPUS),--gpus $(GPUS)) $(if $(DDP),--ddp $(DDP)) $(ARGS)

# ARGS="-- --trainer.max_epochs=10" appends CLI overrides to every run; SHARD=K/N runs only
# the cells i with i % N == K (0 <= K < N; one SLURM array task each). One line per run as it
# ends (its output is in its launch.log) and a summary; exit status 1 when a run failed.
sweep-local: $(STAMP)
	$(BIN)/python -m gradtrace.sweeps local $(SWEEP) $(if $(GPUS),--gpus $(GPUS)) $(if $(DDP),--ddp $(DDP)) $(if $(SHARD),--shard $(SHARD)) $(ARGS)

# The bench lives in benchmarks/ (not installed with gradtrace); run from the repository root.
bench: $(STAMP)
	$(BIN)/python -m benchmarks $(if $(QUICK),--quick)

# At most 8 minutes on one H100/H200, a hard bound (each step is killed at its limit; what was
# cut is reported): the gpu-marked tests (those needing 2-4 GPUs skip on one; which run is
# listed in benchmarks/gpu_check.py), the bench's GPU section and Table 1's projections (as
# configured, and the fastest faithful configuration) into reports/bench.md. Without CUDA:
# one line, exit 0.
gpu-check: $(STAMP)
	$(BIN)/python -m benchmarks.gpu_check

# Wheel and sdist under dist/ (what `pip install gradtrace` gets; `build` is in the dev extra).
dist: $(STAMP)
	$(BIN)/python -m build --outdir dist .

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache runs lightning_logs wandb
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
