#!/usr/bin/env python
"""pgp_det: prune detectron2's Faster R-CNN while it trains.

detectron2 itself has no PyPI release: ``tools/install_detectron2.py`` installs it (``make``
targets run it for you).
"""
from setuptools import find_packages, setup

setup(
    name="pgp_det",
    version="0.1.0",
    description="Progressive Gradient Pruning of detectron2's Faster R-CNN during training",
    packages=find_packages(include=("pgp_det", "pgp_det.*")),
    python_requires=">=3.9",
    # Honest ranges for installing into an environment of your own; `make install` uses the exact
    # versions of constraints.txt. Upper bounds mark the newest releases verified with detectron2 v0.6
    # (torch 2.14/2.15; detectron2 v0.6 relies on torch.jit.script, which torch deprecates) or a
    # known break (fvcore/iopath releases detectron2 v0.6 does not accept).
    install_requires=[
        "torch>=2.1,<2.16",
        "torchvision>=0.16,<0.31",
        "numpy>=1.24,<3",
        "pillow>=10",
        "opencv-python",
        "pycocotools>=2.0.2",
        "matplotlib",
        "pyyaml>=5.1",
        # detectron2 v0.6's runtime needs (installed --no-deps, see tools/install_detectron2.py)
        "termcolor>=1.1",
        "yacs>=0.1.8",
        "tabulate",
        "cloudpickle",
        "tqdm>4.29.0",
        "tensorboard",
        "fvcore>=0.1.5,<0.1.6",
        "iopath>=0.1.7,<0.1.10",
        "omegaconf>=2.1",
    ],
    extras_require={"dev": ["pytest", "pytest-xdist", "onnx", "onnxruntime"]},
)
