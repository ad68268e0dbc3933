# The two commands of the README's quick start: `make demo` and `make test`.
# Each creates the virtual environment .venv on first use.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
OUT    ?= out

.PHONY: demo test lint venv browser clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned, so that no other dependency can pull a different build
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test]' torch==2.14.1 torchvision==0.29.1
	touch $@

demo: venv
	$(BIN)/convlens report --out $(OUT)/convlens-report.html

test: venv browser lint
	$(BIN)/python -m pytest

# The source's checks, run first by `make test`: ruff (lint and format) and mypy (types), set in pyproject.toml.
lint: venv
	$(BIN)/ruff check src && $(BIN)/ruff format --check src && $(BIN)/mypy

# The report test opens the HTML in headless Chromium (Debian packages chromium, chromium-driver).
# Installed here when missing and we are root; otherwise that one test is skipped.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 \
	  && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) ; } \
	  || echo "chromium is not installed: the browser test will be skipped"


clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
