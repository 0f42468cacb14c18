# The two commands a new user needs: `make demo` and `make test`.
# Two test tiers (tests/conftest.py says what is slow): `make test` runs the fast tier (a few minutes on two
# cores: every module and public function at least once); `make check` runs everything (the slow marks,
# the doctests, the whole zoo, full Hypothesis runs), then the strict docs build, and is what CI runs.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=
# One torch thread per test process: small tensors on a few shared cores run faster without a thread
# pool (the tests that time or spawn set their own threads).
TEST_ENV := OMP_NUM_THREADS=1
# Tests run in TEST_JOBS processes (pytest-xdist), a test file to a process so that its module fixtures are
# built once; `make test TEST_JOBS=0` runs them in this one process.
TEST_JOBS ?= 2
XDIST := $(if $(filter 0,$(TEST_JOBS)),-p no:xdist,-n $(TEST_JOBS) --dist loadfile)
SITE := $(or $(TMPDIR),/tmp)/branchify-site

.PHONY: demo test check docs lint bench clean

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
	$(TEST_ENV) $(PY) -m pytest $(XDIST) -m "not slow" --durations=15 $(PYTEST_ARGS)

# STATUS_FILE (.ci/run sets it) receives pytest's own exit status, which make would turn into its own 2.
check: $(VENV)/.dev-installed
	$(TEST_ENV) $(PY) -m pytest $(XDIST) --doctest-modules --durations=15 $(PYTEST_ARGS) tests branchify; \
	status=$$?; if [ -n "$(STATUS_FILE)" ]; then echo $$status > "$(STATUS_FILE)"; fi; exit $$status
	$(MAKE) --no-print-directory docs

# The strict site build; it executes the quick-start notebook (cached under .cache/mkdocs-jupyter).
docs: $(VENV)/.dev-installed
	$(TEST_ENV) $(VENV)/bin/mkdocs build --strict --quiet -d $(SITE)

lint: $(VENV)/.dev-installed
	$(PY) -m ruff check branchify tests benchmarks examples docs

bench: $(VENV)/.dev-installed
	$(PY) benchmarks/surgery.py

clean:
	rm -rf $(VENV) runs site build *.egg-info
