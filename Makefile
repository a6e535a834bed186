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

demo: install
	$(PY) tools/train_net.py --config synthetic/faster_rcnn_R_18_FPN_synth.yaml

test: install
	$(PY) -m pytest -q tests

clean-venv:
	rm -rf $(VENV)
