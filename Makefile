# Every target sets itself up: a fresh clone needs only python3 (>= 3.11) and make.
# `make demo` and `make test` are the two commands at the top of README.md.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,demo]'
	@# The dashboard's browser tests drive Debian's chromium (Playwright cannot download its own
	@# browser here); install it when missing. Without apt the tests fail saying so, never skip.
	@if [ ! -x /usr/bin/chromium ]; then \
		if command -v apt-get >/dev/null 2>&1; then \
			DEBIAN_FRONTEND=noninteractive apt-get install -y chromium >/dev/null 2>&1 || \
			{ apt-get update >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium >/dev/null; } || \
			echo "warning: could not apt-get install chromium: the browser tests will fail"; \
		else \
			echo "warning: no apt-get to install chromium (/usr/bin/chromium): the browser tests will fail"; \
		fi; \
	fi
	touch $@

demo: $(VENV)/.installed
	$(BIN)/python -m example_project.demo $(ARGS)

test: $(VENV)/.installed
	$(BIN)/python -m pytest $(ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check celery_msg tests bench example_project
	$(BIN)/ruff format --check celery_msg tests bench example_project
	$(BIN)/mypy celery_msg example_project/demo

# The benchmarks also run Dramatiq in the same run (the `bench` extra).
$(VENV)/.bench-installed: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	touch $@

bench: $(VENV)/.bench-installed
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
