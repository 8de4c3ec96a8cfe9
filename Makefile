PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: venv test lint demo bench format clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff format --check celery_concurrent tests benchmarks examples
	$(VENV)/bin/ruff check celery_concurrent tests benchmarks examples
	$(VENV)/bin/mypy celery_concurrent

format: venv
	$(VENV)/bin/ruff format celery_concurrent tests benchmarks examples
	$(VENV)/bin/ruff check --fix celery_concurrent tests benchmarks examples

demo: venv
	$(PY) -m examples.demo

bench: venv
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
