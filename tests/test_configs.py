"""Every shipped config loads and passes the start-up checks, and the recipes say what they are."""
import glob
import os

import pytest

from pgp_det.config import load_config
from pgp_det.pruning.settings import check_pruning_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.relpath(p, ROOT) for p in CONFIGS])
def test_shipped_configs_load_and_pass_the_checks(path):
    cfg = load_config(path)
    check_pruning_config(cfg)


def test_the_frs_recipe_is_frs_as_its_paper_runs_it():
    cfg = load_config(os.path.join(ROOT, "configs", "synthetic", "frs_faster_rcnn_R_18_FPN_synth.yaml"))
    p = cfg.PRUNING
    assert (p.CRITERION, p.ALLOCATION, p.SCHEDULE, p.REMOVE_RATIO) == ("frs", "global", "linear", 1.0)
    demo = load_config(os.path.join(ROOT, "configs", "synthetic", "pgp_faster_rcnn_R_18_FPN_synth.yaml"))
    # the same target and pruning iterations as the demo's PGP, so the two compare
    for key in ("TARGET", "FLOPS_REDUCTION", "COST_INPUT_SIZE", "START", "INTERVAL", "END", "SCOPES"):
        assert p[key] == demo.PRUNING[key], key
