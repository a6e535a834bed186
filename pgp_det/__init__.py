"""pgp_det: prune detectron2's Faster R-CNN while it trains, and measure what it buys."""
__version__ = "0.1.0"
