"""Every shipped config loads and passes the start-up checks, and the recipes say what they are."""
import glob
import os

import pytest

from pgp_det.config import RENAMED_PRUNING_KEYS, load_config
from pgp_det.errors import UserInputError
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
    assert (p.CRITERION.NAME, p.ALLOCATION.NAME, p.SCHEDULE.NAME, p.SOFT.REMOVE_RATIO) == ("frs", "global", "linear", 1.0)
    demo = load_config(os.path.join(ROOT, "configs", "synthetic", "pgp_faster_rcnn_R_18_FPN_synth.yaml"))
    # the same target and pruning iterations as the demo's PGP, so the two compare
    for node, key in (("TARGET", "KIND"), ("TARGET.FLOPS", "REDUCTION"), ("TARGET.FLOPS", "INPUT_SIZE"),
                      ("SCHEDULE", "START"), ("SCHEDULE", "INTERVAL"), ("SCHEDULE", "END"), ("", "SCOPES")):
        mine, theirs = p, demo.PRUNING
        for part in filter(None, node.split(".")):
            mine, theirs = mine[part], theirs[part]
        assert mine[key] == theirs[key], (node, key)


OLD_VALUES = {"PRUNING.TARGET": "flops", "PRUNING.SCHEDULE": "linear", "PRUNING.ALLOCATION": "global",
              "PRUNING.CRITERION": "l1", "PRUNING.COST_INPUT_SIZE": "(256, 256)", "PRUNING.SCOPE_RATIOS": "()",
              "PRUNING.LATENCY_TABLE": "t.json", "PRUNING.LATENCY_DEVICE": "cpu", "PRUNING.UNIT": "iter",
              "PRUNING.SOFT_MODE": "sfp", "PRUNING.KNAPSACK_VALUE": "taylor", "PRUNING.KEEP_ZEROED": "True"}


@pytest.mark.parametrize("old", sorted(RENAMED_PRUNING_KEYS))
def test_every_renamed_key_is_refused_in_one_line_naming_the_new_key(old, tmp_path):
    value = OLD_VALUES.get(old, "1")
    new = RENAMED_PRUNING_KEYS[old]
    config = tmp_path / "old.yaml"
    config.write_text(f'_BASE_: "{os.path.join(ROOT, "configs", "synthetic", "faster_rcnn_R_18_FPN_synth.yaml")}"\n'
                      f"PRUNING:\n  {old.split('.', 1)[1]}: {value}\n")
    for source, overrides in ((str(config), []), (os.path.join(ROOT, "configs", "synthetic",
                                                               "faster_rcnn_R_18_FPN_synth.yaml"), [old, value])):
        with pytest.raises(UserInputError) as error:
            load_config(source, overrides)
        message = str(error.value)
        assert "\n" not in message and f"{old} was renamed {new}" in message, message
