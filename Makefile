# Two entry points: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test clean-venv

install: $(STAMP)

# Re-runs only when the install recipe changes; each step is a no-op when already satisfied.
$(STAMP): setup.py tools/install_detectron2.py Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch and torchvision together, so pip picks a matching pair (see README: Installing)
	$(PY) -m pip install --disable-pip-version-check -q torch torchvision
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]'
	$(PY) tools/install_detectron2.py
	touch $@

# the unpruned R18-FPN and the same model pruned by PGP to half its FLOPs, side by side
demo: install
	$(PY) tools/sweep.py --config synthetic/pgp_faster_rcnn_R_18_FPN_synth.yaml --baseline \
		--flops-reductions 0.5 --output output/demo

test: install
	$(PY) -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
