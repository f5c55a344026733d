# Set-up and the two main commands. `make generate` and `make test` each create .venv and install
# what they need on a fresh machine. TORCH pins this machine's CPU build; on a GPU machine use e.g.
# `make TORCH=torch test` inside an environment that already has your CUDA build of torch.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install generate test clean

$(BIN)/llamazoo: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(BIN)/llamazoo

generate: install
	$(BIN)/llamazoo generate

test: install
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
