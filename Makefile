# The two commands of the README: `make run` and `make test`.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch that this project pins for development and CI
# (a plain `torch` requirement would pull the multi-GB CUDA build).
TORCH_PIN := torch==2.13.0
CORES ?= 2
RUN := default

.PHONY: setup run sweep peers-env bench-peers lint test test-fast bench bench-infer bench-gnpe learning-curve dag clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

run: setup
	CONDOR_CONFIG=/dev/null $(BIN)/snakemake --cores $(CORES)
	CONDOR_CONFIG=/dev/null $(BIN)/snakemake --report results/$(RUN)/report.html
	@echo "Report: $(CURDIR)/results/$(RUN)/report.html (metrics: results/$(RUN)/evaluation/metrics.json)"

# The example sweep (config/sweep_example.yaml, about 40 min on 2 cores): every run trained, evaluated and compared.
SWEEP ?= config/sweep_example.yaml
sweep: setup
	CONDOR_CONFIG=/dev/null $(BIN)/snakemake sweep --cores $(CORES) --config sweep=$(SWEEP)
	CONDOR_CONFIG=/dev/null $(BIN)/snakemake sweep --report results/sweep_report.html --config sweep=$(SWEEP)
	@echo "Report: $(CURDIR)/results/sweep_report.html (table: results/<sweep name>/comparison.csv)"

# The peers' environment (.venv-peers, never stagewise's dependencies): Dingo, bilby and dynesty beside the
# CPU torch; torchvision replaced by a stub (bench/peers/requirements.txt says why).
peers-env: .venv-peers/.installed
.venv-peers/.installed: bench/peers/requirements.txt pyproject.toml
	$(PYTHON) -m venv .venv-peers
	.venv-peers/bin/pip install --quiet --upgrade pip
	.venv-peers/bin/pip install --quiet $(TORCH_PIN)
	.venv-peers/bin/pip install --quiet -e . -r bench/peers/requirements.txt $(TORCH_PIN)
	.venv-peers/bin/pip uninstall --quiet --yes torchvision
	cp -r bench/peers/torchvision_stub/torchvision .venv-peers/lib/python3.11/site-packages/
	touch $@

# stagewise against Dingo's own data pipeline and against bilby with dynesty (about 25 min on 2 cores from a
# fresh clone, `make run` included): bench/peers.json and docs/peers_corner.png.
bench-peers: run peers-env
	CONDOR_CONFIG=/dev/null .venv-peers/bin/python bench/peers/peers.py

# Static checks: ruff, the layer contract (pyproject's [tool.importlinter]) and the type checker.
# snakefmt and `snakemake --lint` run inside the tests (tests/test_workflow.py).
lint: setup
	$(BIN)/ruff check src tests bench workflow/scripts examples
	$(BIN)/lint-imports
	$(BIN)/mypy

test: lint
	CONDOR_CONFIG=/dev/null $(BIN)/python -m pytest

# The quick loop: everything but the tests marked slow (real Snakemake runs end to end, cluster, browser).
test-fast: lint
	CONDOR_CONFIG=/dev/null $(BIN)/python -m pytest -m "not slow"

bench: setup
	CONDOR_CONFIG=/dev/null $(BIN)/python bench/bench.py

# Needs a finished `make run`: infer calibration and efficiency on 200 new labelled events.
bench-infer: setup
	CONDOR_CONFIG=/dev/null $(BIN)/python bench/infer_calibration.py

# Needs a finished `make run`: GNPE's importance-sampling efficiency against fixed numbers of Gibbs iterations.
bench-gnpe: setup
	CONDOR_CONFIG=/dev/null $(BIN)/python bench/gnpe_iterations.py

# Trains and evaluates the default problem for several numbers of epochs (about 40 min on 2 cores):
# bench/learning_curve.json and docs/learning_curve.png.
learning-curve: setup
	CONDOR_CONFIG=/dev/null $(BIN)/python bench/learning_curve.py

dag: setup
	CONDOR_CONFIG=/dev/null $(BIN)/snakemake --dag | dot -Tsvg > docs/dag.svg

clean:
	rm -rf results .snakemake
