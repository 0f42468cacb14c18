# The two commands a new user needs: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?= -m "not slow"

.PHONY: demo test lint bench docs clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch and torchvision come from the package index as a matching pair (a CPU-only torch wheel on
# its own breaks torchvision); the import check catches a mismatched pair before anything else runs.
$(VENV)/.demo-installed: pyproject.toml | $(PY)
	$(PIP) install --quiet torch torchvision
	$(PIP) install --quiet -e ".[demo]"
	$(PY) -c "import torchvision.ops, branchify"
	touch $@

$(VENV)/.dev-installed: pyproject.toml | $(PY)
	$(PIP) install --quiet torch torchvision
	$(PIP) install --quiet -e ".[dev]"
	$(PY) -c "import torchvision.ops, branchify"
	touch $@ $(VENV)/.demo-installed

demo: $(VENV)/.demo-installed
	$(PY) -m branchify.commands.demo

test: $(VENV)/.dev-installed
	$(PY) -m pytest $(PYTEST_ARGS)
	$(VENV)/bin/mkdocs build --strict --quiet -d $(or $(TMPDIR),/tmp)/branchify-site

lint: $(VENV)/.dev-installed
	$(PY) -m ruff check branchify tests benchmarks examples docs

bench: $(VENV)/.dev-installed
	$(PY) benchmarks/surgery.py

clean:
	rm -rf $(VENV) runs site build *.egg-info
