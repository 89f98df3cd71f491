# The two commands of the README: `make demo` and `make test`.
VENV := .venv/bin

.PHONY: setup demo test test-slow test-gpu
setup:
	bash scripts/setup.sh

demo: setup
	$(VENV)/leantune demo

test: setup
	$(VENV)/python -m pytest -q

test-slow: setup
	$(VENV)/python -m pytest -q -m slow

test-gpu: setup
	LEANTUNE_TRITON_AUTOTUNE=0 $(VENV)/python -m pytest -q -m gpu
