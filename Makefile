# Two commands on a fresh machine: `make demo` and `make test`.
# TORCH defaults to the CPU build that lies on local disk; GPU users override it,
# e.g. `make demo TORCH=torch==2.14.1`.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_OUT ?= out/demo

.PHONY: demo test lint venv install install-test bench clean browser

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Stamp files make re-runs cheap; they depend on pyproject.toml so a change reinstalls.
$(VENV)/.installed: $(VENV)/bin/python pyproject.toml
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e ".[test]"
	# The original ldm modules (test oracle for single-file checkpoints); no dependencies.
	$(PIP) install -q --no-deps stable-diffusion-sdkit
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(PY) -m ldm_jobs run examples/demo.yaml --overwrite --set output.path=$(DEMO_OUT)
	$(PY) -m ldm_jobs show $(DEMO_OUT) --sheet $(DEMO_OUT)_contact_sheet.png
	@echo "images:        $(DEMO_OUT)/part-*.parquet"
	@echo "manifest:      $(DEMO_OUT)/_manifest.json"
	@echo "contact sheet: $(DEMO_OUT)_contact_sheet.png"

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check ldm_jobs model jobs tests benchmarks examples

# The gallery's tests drive a real browser: Debian's Chromium and its driver (root on a
# Debian machine); without them those tests skip and say why.
browser:
	@(command -v chromium && command -v chromedriver) >/dev/null || (apt-get update -q && apt-get install -y -q chromium chromium-driver) \
		|| echo "note: could not install chromium and chromium-driver; the gallery's browser tests will be skipped"

test: $(VENV)/.installed-test lint browser
	$(PY) -m pytest -q -m "not slow" tests

bench: $(VENV)/.installed-test
	$(PY) benchmarks/compare_diffusers.py

clean:
	rm -rf $(VENV) out .pytest_cache
