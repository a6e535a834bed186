# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# exact versions of every package installed (pip constraints); `make lock` refreshes it
LOCK := constraints.txt
PIP_INSTALL = -m pip install --disable-pip-version-check -q -c $(LOCK)

.PHONY: install demo test test-fast lock clean-venv

install: $(STAMP)

# Re-runs when the install recipe or the lock changes; each step is a no-op when already satisfied.
$(STAMP): setup.py tools/install_detectron2.py tools/check_lock.py Makefile $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch and torchvision first, as the locked pair (see docs/install.md)
	$(PY) $(PIP_INSTALL) torch torchvision
	$(PY) $(PIP_INSTALL) -e '.[dev]'
	$(PY) tools/install_detectron2.py
	# the environment is exactly the lock (one line naming what differs, otherwise)
	$(PY) tools/check_lock.py $(LOCK)
	touch $@

# the unpruned R18-FPN and the same model pruned by PGP to half its FLOPs (backbone only), side by side
demo: install
	$(PY) tools/sweep.py --config synthetic/pgp_backbone_faster_rcnn_R_18_FPN_synth.yaml --baseline \
		--flops-reductions 0.5 --reuse --output output/demo

# one test process per core (pytest-xdist); a file's tests stay together, so its shared fixtures
# (a trained run, a latency profile) are built once
PYTEST := $(PY) -m pytest -q -n auto --dist loadfile

test: install
	$(PYTEST) tests

# the tests that neither train a detector, start a process nor profile one (tests/conftest.py marks the others slow)
test-fast: install
	$(PYTEST) -m "not slow" tests

# Upgrade deliberately: install the newest releases setup.py allows into a scratch environment,
# run the tests there, and only if they pass write their versions into $(LOCK).
# LOCK_TESTS='-m "not slow" tests' refreshes on the fast tier (minutes instead of the whole suite).
LOCK_VENV := .venv-lock
LOCK_TESTS ?= tests
lock:
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --disable-pip-version-check -q torch torchvision
	$(LOCK_VENV)/bin/python -m pip install --disable-pip-version-check -q -e '.[dev]'
	$(LOCK_VENV)/bin/python tools/install_detectron2.py
	$(LOCK_VENV)/bin/python -m pytest -q -n auto --dist loadfile $(LOCK_TESTS)
	{ sed -n '1,2p' $(LOCK); $(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable \
		| grep -viE '^(pip|pb1-detectron2|detectron2)([=@ ]|$$)'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	rm -rf $(LOCK_VENV)
	@echo "$(LOCK) refreshed; 'make install' uses it"

clean-venv:
	rm -rf $(VENV)
