PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LINTED := celery_concurrent devkit tests benchmarks examples docs

.PHONY: venv test soak lint demo bench format clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

# 50,000 inputs through scale-up and scale-down cycles, per broker (a few minutes)
soak: venv
	$(PY) -m pytest -q -s -n 0 -m slow tests/test_soak.py $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff format --check $(LINTED)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/mypy celery_concurrent

format: venv
	$(VENV)/bin/ruff format $(LINTED)
	$(VENV)/bin/ruff check --fix $(LINTED)

# CELERY_BROKER_URL=redis://... or amqp://... runs it on that broker; DEMO_ARGS=--quick
demo: venv
	$(PY) -m examples.demo $(DEMO_ARGS)

bench: venv
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
