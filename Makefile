# Set-up and the two main commands. `make generate` and `make test` each create .venv and install
# what they need on a fresh machine. TORCH pins this machine's CPU build; on a GPU machine use e.g.
# `make TORCH=torch test` inside an environment that already has your CUDA build of torch.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install browser generate test clean

$(BIN)/llamazoo: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(BIN)/llamazoo

generate: install
	$(BIN)/llamazoo generate

# The chat page test (tests/test_serve_page.py) drives a headless Chromium: Debian's packages, installed
# here when missing (as root; otherwise the command to run is printed).
browser:
	@if ! command -v chromedriver >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium and chromium-driver (apt-get)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	  else \
	    echo "error: the tests need a headless Chromium: run 'sudo apt-get install chromium chromium-driver'" \
	         "(Debian/Ubuntu) or put chromium and chromedriver on PATH" >&2; exit 1; \
	  fi; \
	fi

test: install browser
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
