# The two commands of the README's quick start: `make demo` and `make test`.
# Each creates the virtual environment .venv on first use.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
OUT    ?= out

.PHONY: demo test venv browser clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned, so that no other dependency can pull a different build
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[test]' torch==2.14.1 torchvision==0.29.1
	touch $@

demo: venv
	$(BIN)/convlens layers resnet18 --weights none

test: venv
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) $(OUT) .pytest_cache
