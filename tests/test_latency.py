"""Latency lookup tables and TARGET latency: the table's JSON round trip, bilinear interpolation
and refusal of tables made for something else; the knapsack allocation on a toy table (the budget
exactly, more importance than a uniform cut); and, on the synthetic R18-FPN with a table made by
the profiler with a fake timer (milliseconds = MFLOPs counted by torch, so no real timing runs),
each pruning step's budget, the hook's log, one-shot pruning with tools/prune_net.py and the
PRUNING settings."""
import copy
import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from torch.utils.flop_counter import FlopCounterMode

from pgp_det.checkpoint import load_model
from pgp_det.config import get_pgp_cfg
from pgp_det.errors import UserInputError
from pgp_det.latency import LatencyEntry, LatencyTable, load_table, save_table, table_from_dict, table_to_dict
from pgp_det.benchmark.latency import ProfileSettings
from pgp_det.benchmark.latency.layers import grid_widths
from pgp_det.benchmark.latency.timers import Timing
from pgp_det.benchmark.latency.whole_model import time_whole_model
from pgp_det.pruning import ChannelGroup, PruningRequestError, derive_channel_groups, hard_prune, kept_count
from pgp_det.pruning.allocation import allocate
from pgp_det.pruning.criteria import build_criterion
from pgp_det.pruning.hook import PGPHook, plan_pruning_step
from pgp_det.pruning.target import build_target, cost_input_size, latency_budget, target_latency_ms
from pgp_det.pruning.settings import check_pruning_config
from conftest import load_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "synthetic/faster_rcnn_R_18_FPN_synth.yaml"
SIZE = (128, 160)
# random init, few proposals: short CPU forwards
OVERRIDES = ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.RPN.PRE_NMS_TOPK_TEST", "200",
             "MODEL.RPN.POST_NMS_TOPK_TEST", "100", "TEST.DETECTIONS_PER_IMAGE", "50"]


def flop_timer(fn):
    """The fake timer: 'milliseconds' = MFLOPs of one call, as torch counts them (convs and
    matrix products; deterministic, bilinear in a layer's widths)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / 1e6


def synthetic_cfg(*extra):
    cfg = get_pgp_cfg()
    cfg.merge_from_file(os.path.join(ROOT, "configs", CONFIG))
    cfg.merge_from_list(OVERRIDES + ["PRUNING.TARGET.FLOPS.INPUT_SIZE", SIZE, *extra])
    return cfg


def synthetic_model(cfg):
    torch.manual_seed(0)
    return build_model(cfg).eval()


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(UserInputError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# a toy table: a chain input -> a -> b -> c -> output, milliseconds known by construction


def toy_table(**metadata) -> LatencyTable:
    grid64, grid32 = (8, 24, 40, 64), (8, 16, 32)
    entries = [
        # cheap per channel of a, b; expensive per channel of c (a wide feature map)
        LatencyEntry("l1", "conv", None, "a", (3,), grid64, ((0.8, 2.4, 4.0, 6.4),)),
        LatencyEntry("l2", "conv", "a", "b", grid64, grid64,
                     tuple(tuple(1e-3 * i * o for o in grid64) for i in grid64)),
        LatencyEntry("l3", "conv", "b", "c", grid64, grid32,
                     tuple(tuple(1e-2 * i * o for o in grid32) for i in grid64)),
        LatencyEntry("l4", "linear", "c", None, grid32, (10,), tuple((0.05 * i,) for i in grid32),
                     proposal_ms=(0.5, 1.6)),
    ]
    meta = {"device_kind": "cpu", "device_name": "toy CPU", "num_threads": 2, "precision": "fp32",
            "torch": torch.__version__}
    meta.update(metadata)
    return LatencyTable({"a": 64, "b": 64, "c": 32, "fixed_group": 16}, (128, 160), entries, (50, 100), (2.0, 3.0),
                        100, meta)


def toy_group(name, size):
    return ChannelGroup(name=name, scope="backbone", size=size, producers=(), consumers=(), counts=(),
                        producer_layers=(), consumer_layers=())


def test_table_json_round_trip(tmp_path):
    table = toy_table()
    path = str(tmp_path / "table.json")
    assert save_table(table, path) == path
    assert [p.name for p in tmp_path.iterdir()] == ["table.json"]  # atomic: no temporary left
    loaded = load_table(path)
    assert loaded.source == path
    assert table_to_dict(loaded) == table_to_dict(table)
    for widths, proposals in [({}, None), ({"a": 24, "b": 40, "c": 16}, None), ({"a": 8}, 50), ({"c": 20}, 75)]:
        assert loaded.predict(widths, proposals) == pytest.approx(table.predict(widths, proposals), rel=1e-12)
    assert loaded.metadata["device_name"] == "toy CPU" and loaded.input_size == (128, 160)


def pinned_table() -> LatencyTable:
    """A table using every part of the prediction: steps, proposal-dependent entries, the ROI
    pooler, element-wise weights and both fitted coefficients of the rest."""
    grid64, grid32 = (8, 24, 40, 64), (8, 16, 32)
    entries = [
        LatencyEntry("l1", "conv", None, "a", (3,), grid64, ((0.8, 2.4, 4.0, 6.4),),
                     out_steps=tuple((w, 0.1 * block_cost(w)) for w in range(8, 65, 8))),
        LatencyEntry("l2", "conv", "a", "b", grid64, grid64, tuple(tuple(1e-3 * i * o for o in grid64) for i in grid64)),
        LatencyEntry("l3", "conv", "b", "c", grid64, grid32, tuple(tuple(1e-2 * i * o for o in grid32) for i in grid64)),
        LatencyEntry("l4", "linear", "c", None, grid32, (10,), tuple((0.05 * i,) for i in grid32), proposal_ms=(0.5, 1.6)),
        LatencyEntry("pool", "roi_pooler", "c", None, grid32, (1,), ((0.3,), (0.5,), (0.9,)), proposal_ms=(0.4, 0.9)),
    ]
    meta = {"device_kind": "cpu", "device_name": "toy CPU", "num_threads": 2, "precision": "fp32"}
    return LatencyTable({"a": 64, "b": 64, "c": 32}, (128, 160), entries, (50, 100), (2.0, 3.0), 100, meta,
                        activations={"a": 3.0, "c": 5.0}, activation_ms=1.25, layer_overhead=0.1)


# (widths, proposals) -> milliseconds, as the table predicted them before the latency code became
# the pgp_det.latency package: a refactoring must give the same floats, to the last digit
PINNED_PREDICTIONS = [
    (({}, None), 36.476),
    (({"a": 40, "b": 24}, None), 16.930718181818182),
    (({"a": 8, "b": 8, "c": 8}, None), 1.9940727272727272),
    (({"a": 56, "c": 20}, 75), 25.21671287878788),
    (({"b": 48}, 50), 27.117600000000003),
    (({"a": 33, "b": 64, "c": 17}, 130), 19.73169659090909),
]


def test_predictions_are_pinned_to_the_last_digit_before_and_after_a_file_round_trip(tmp_path):
    table = pinned_table()
    loaded = load_table(save_table(table, str(tmp_path / "pinned.json")))
    for (widths, proposals), ms in PINNED_PREDICTIONS:
        assert table.predict(widths, proposals) == ms, (widths, proposals)
        assert loaded.predict(widths, proposals) == ms, (widths, proposals)
    assert loaded.full_ms == table.full_ms == PINNED_PREDICTIONS[0][1]


def test_bilinear_interpolation_is_exact_at_grid_points_and_linear_between():
    values = ((1.0, 5.0, 2.0), (4.0, 3.0, 9.0), (0.5, 7.0, 8.0))
    entry = LatencyEntry("x", "conv", "a", "b", (8, 16, 32), (8, 24, 64), values)
    for i, w_in in enumerate(entry.in_widths):
        for j, w_out in enumerate(entry.out_widths):
            assert entry.at(w_in, w_out) == pytest.approx(values[i][j])
    # linear along each axis between neighbouring points
    assert entry.at(12, 8) == pytest.approx(0.5 * 1.0 + 0.5 * 4.0)
    assert entry.at(16, 34) == pytest.approx(0.75 * 3.0 + 0.25 * 9.0)
    for t in (0.1, 0.3, 0.9):
        assert entry.at(16 + 16 * t, 24) == pytest.approx((1 - t) * 3.0 + t * 7.0)
    # bilinear inside a cell: at its centre, the mean of its corners
    assert entry.at(24, 44) == pytest.approx((3.0 + 9.0 + 7.0 + 8.0) / 4)
    # the table sums entries and the fixed part; proposal-dependent entries scale with the count
    table = toy_table()
    parts = table.breakdown({"a": 24, "b": 40, "c": 16})
    assert parts["fixed"] == 3.0
    assert parts["l2"] == pytest.approx(1e-3 * 24 * 40) and parts["l3"] == pytest.approx(1e-2 * 40 * 16)
    assert table.predict({"a": 24, "b": 40, "c": 16}) == pytest.approx(sum(parts.values()))
    at_50 = table.breakdown({}, proposals=50)
    assert at_50["fixed"] == 2.0 and at_50["l4"] == pytest.approx(0.05 * 32 * 0.5 / 1.6)
    assert table.breakdown({}, proposals=75)["fixed"] == pytest.approx(2.5)
    assert table.with_proposals(50).predict() == pytest.approx(table.predict(proposals=50))
    with pytest.raises(PruningRequestError, match="1..64"):
        table.predict({"a": 65})
    with pytest.raises(PruningRequestError, match="unknown channel group"):
        table.predict({"nope": 8})


def test_tables_made_for_something_else_are_refused_in_one_line(tmp_path):
    table = toy_table()
    widths = {"a": 64, "b": 64, "c": 32, "fixed_group": 16}
    table.check_compatible(widths, (128, 160), "cpu")
    table.check_compatible(widths, (128, 160))  # any device kind
    assert "another architecture: channel group b has 64 channels there and 48" in one_line_error(
        table.check_compatible, dict(widths, b=48), (128, 160), "cpu")
    assert "it has channel group fixed_group, which this model lacks" in one_line_error(
        table.check_compatible, {"a": 64, "b": 64, "c": 32}, (128, 160))
    assert "this model has channel group d, which the table lacks" in one_line_error(
        table.check_compatible, dict(widths, d=8), (128, 160))
    assert "was measured at 128x160, not at the 800x1333 asked for" in one_line_error(
        table.check_compatible, widths, (800, 1333), "cpu")
    assert "was measured on a cpu device (toy CPU), not on cuda" in one_line_error(
        table.check_compatible, widths, (128, 160), "cuda")
    # files that are not tables
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert "is not valid JSON" in one_line_error(load_table, str(bad))
    bad.write_text(json.dumps({"format": "something else"}))
    assert "is not a pgp_det latency table" in one_line_error(load_table, str(bad))
    data = table_to_dict(table)
    data["entries"][1]["ms"] = data["entries"][1]["ms"][:2]
    bad.write_text(json.dumps(data))
    assert "layer l2: ms must be a 4 x 4 grid" in one_line_error(load_table, str(bad))
    assert "does not exist" in one_line_error(load_table, str(tmp_path / "missing.json"))
    # a device may hide part of the layers' time (layer_overhead down to -1), never more than all of it
    data = table_to_dict(table)
    data["rest"]["layer_overhead"] = -0.5
    bad.write_text(json.dumps(data))
    assert load_table(str(bad)).layer_overhead == -0.5
    data["rest"]["layer_overhead"] = -1.5
    bad.write_text(json.dumps(data))
    assert "layer_overhead must be finite and >= -1" in one_line_error(load_table, str(bad))


# ---------------------------------------------------------------------------------------------
# the knapsack on the toy table


def toy_scores():
    """Skewed scores in a (many weak channels), flat ones in b and c."""
    generator = torch.Generator().manual_seed(0)
    a = torch.cat([torch.rand(48, generator=generator) * 0.05, 1.0 + torch.rand(16, generator=generator)])
    b = 1.0 + 0.1 * torch.rand(64, generator=generator)
    c = 1.0 + 0.1 * torch.rand(32, generator=generator)
    return {"a": a[torch.randperm(64, generator=generator)], "b": b, "c": c}


def kept_importance(scores, kept):
    """Sum of the mean-normalised scores of the channels a group keeps (its highest)."""
    total = 0.0
    for name, count in kept.items():
        normalised = scores[name] / scores[name].mean()
        total += float(torch.sort(normalised, descending=True).values[:count].sum())
    return total


def toy_allocation(method, budget):
    table = toy_table()
    groups = {name: toy_group(name, size) for name, size in (("a", 64), ("b", 64), ("c", 32))}
    weak = allocate(method, toy_scores(), groups, 0.0, {n: g.size for n, g in groups.items()}, multiple=8, floor=8,
                    budget=latency_budget(table, budget))
    return {name: groups[name].size - len(channels) for name, channels in weak.items()}


@pytest.mark.parametrize("fraction", [0.3, 0.45, 0.6, 0.75, 0.9, 0.97])
def test_knapsack_respects_the_budget_exactly_and_leaves_no_step_that_fits(fraction):
    table = toy_table()
    budget = fraction * table.predict()
    kept = toy_allocation("knapsack", budget)
    assert table.predict(kept) <= budget
    # nothing could be given back: one more step of any group would break the budget
    for name, count in kept.items():
        if count < table.groups[name]:
            larger = min(w for w in range(count + 1, table.groups[name] + 1) if w % 8 == 0)
            assert table.predict(dict(kept, **{name: larger})) > budget, (name, kept)


def test_knapsack_keeps_more_importance_than_a_uniform_cut_at_equal_latency():
    table = toy_table()
    scores = toy_scores()
    for fraction in (0.5, 0.7):
        uniform = toy_allocation("uniform", fraction * table.predict())
        latency = table.predict(uniform)
        knapsack = toy_allocation("knapsack", latency)
        assert table.predict(knapsack) <= latency
        assert kept_importance(scores, knapsack) > kept_importance(scores, uniform) + 1.0, (uniform, knapsack)
    # a's 48 weak channels hold a small share of its importance: they go first, its 16 strong
    # ones stay; b and c (flat scores) lose a share each, neither is emptied
    kept = toy_allocation("knapsack", 0.6 * table.predict())
    assert 16 <= kept["a"] <= 24 and kept["b"] > 8 and kept["c"] > 8, kept


def test_unreachable_latency_budget_fails_clearly():
    with pytest.raises(PruningRequestError, match=r"knapsack allocation cannot meet the budget of 1 ms on toy CPU"):
        toy_allocation("knapsack", 1.0)


def test_targets_in_ms_or_fps():
    assert target_latency_ms(25.0, 0.0) == 25.0 and target_latency_ms(0.0, 40.0) == 25.0
    assert "not both" in one_line_error(target_latency_ms, 25.0, 40.0)
    assert "not neither" in one_line_error(target_latency_ms, 0.0, 0.0)
    assert grid_widths(64, 5) == [8, 24, 32, 48, 64] and grid_widths(24, 5) == [8, 16, 24]
    assert grid_widths(256, 4, 8, 8, 32) == [32, 96, 192, 256]  # GroupNorm multiple honoured


# ---------------------------------------------------------------------------------------------
# the synthetic R18-FPN, with a table measured by the profiler and the fake timer


@pytest.fixture(scope="module")
def r18_table(tmp_path_factory):
    """A table made by tools/profile_latency.py (fake timer, --check), and the tool's output."""
    path = tmp_path_factory.mktemp("table") / "r18.json"
    tool = load_tool("profile_latency")
    assert tool.main(["--config", CONFIG, "--device", "cpu", "--input-size", "128x160", "--points", "4",
                      "--output", str(path), "--check", *OVERRIDES], timer=flop_timer) == 0
    return str(path)


def test_profiler_table_predicts_what_the_fake_timer_measures(r18_table, capsys):
    table = load_table(r18_table)
    meta = table.metadata
    assert meta["device_kind"] == "cpu" and meta["precision"] == "fp32" and meta["num_threads"] >= 1
    for key in ("device_name", "torch", "torchvision", "detectron2", "profile_seconds"):
        assert meta[key] not in (None, ""), key
    assert table.input_size == SIZE and table.reference_proposals == 100 and table.proposal_counts == (25, 50, 100)
    model = synthetic_model(synthetic_cfg())
    table.check_compatible(derive_channel_groups(model), SIZE, "cpu")
    kinds = {e.kind for e in table.entries}
    assert kinds == {"conv", "linear", "roi_pooler"}
    assert {e.name for e in table.entries if e.proposal_ms is not None} == {
        "roi_heads.box_pooler", "roi_heads.box_head.fc1", "roi_heads.box_head.fc2",
        "roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"}
    # FLOPs are bilinear in a layer's widths: predictions of uniformly pruned models are exact
    assert [row["ratio"] for row in meta["check"]] == [0.0, 0.25, 0.5, 0.75]
    for row in meta["check"]:
        assert abs(row["error_percent"]) < 1e-6, row
    assert meta["page_faults_per_inference"] >= 0 and meta["environment"]["freed_memory_kept"] is False
    assert table.predict(proposals=25) < table.predict()  # fewer proposals, less ROI-head work
    assert time_whole_model(model, SIZE, flop_timer, proposals=25) == pytest.approx(table.predict(proposals=25))


@pytest.mark.parametrize("method", ["knapsack", "uniform"])
def test_each_pruning_step_meets_its_latency_budget(r18_table, method):
    table = load_table(r18_table)
    cfg = synthetic_cfg("PRUNING.TARGET.KIND", "latency", "PRUNING.TARGET.LATENCY.TABLE", r18_table, "PRUNING.TARGET.LATENCY.FPS",
                        str(1000.0 / (0.5 * table.predict())), "PRUNING.ALLOCATION.NAME", method,
                        "PRUNING.SCHEDULE.NAME", "pgp_exponential")
    check_pruning_config(cfg)
    model = synthetic_model(cfg)
    groups = {n: g for n, g in derive_channel_groups(model).items() if g.prunable}
    original = {n: g.size for n, g in groups.items()}
    criterion = build_criterion("l1")
    target = build_target(cfg, derive_channel_groups(model))
    budgets = [target.budget(cfg.PRUNING.SCHEDULE.NAME, step, 3).limit for step in (1, 2, 3)]
    assert budgets[0] > budgets[1] > budgets[2] == pytest.approx(0.5 * table.predict())
    for step, budget in zip((1, 2, 3), budgets):
        criterion.attach(model, groups)
        weak = plan_pruning_step(cfg, model, groups, criterion.scores(model), step, 3, original, target)
        hard_prune(model, {n: w for n, w in weak.items() if w}, groups=groups)
        groups = {n: g for n, g in derive_channel_groups(model).items() if n in original}
        predicted = table.predict({n: g.size for n, g in groups.items()})
        assert predicted <= budget, (step, predicted, budget)
        if method == "knapsack":
            assert predicted >= 0.98 * budget, (step, predicted, budget)
    # the fake timer measures the pruned model itself: what the table predicted
    assert time_whole_model(model, SIZE, flop_timer) == pytest.approx(predicted, rel=1e-6)


def test_hook_logs_predicted_latency_at_each_step(r18_table, tmp_path):
    table = load_table(r18_table)
    target = 0.6 * table.predict()
    cfg = synthetic_cfg("PRUNING.ENABLED", "True", "PRUNING.TARGET.KIND", "latency", "PRUNING.TARGET.LATENCY.TABLE", r18_table,
                        "PRUNING.TARGET.LATENCY.MS", str(target), "PRUNING.ALLOCATION.NAME", "knapsack",
                        "PRUNING.CRITERION.NAME", "l1", "PRUNING.SOFT.REMOVE_RATIO", "0.5", "SOLVER.MAX_ITER", "20",
                        "PRUNING.SCHEDULE.START", "0", "PRUNING.SCHEDULE.INTERVAL", "5", "PRUNING.SCHEDULE.END", "10", "OUTPUT_DIR", str(tmp_path))
    check_pruning_config(cfg)
    model = synthetic_model(cfg)
    hook = PGPHook(cfg)
    assert hook.step_iters == [5, 10]
    with EventStorage(0) as storage:
        hook.trainer = SimpleNamespace(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                       storage=storage, iter=0)
        hook.before_train()
        for iteration in hook.step_iters:
            hook.trainer.iter = iteration - 1
            hook._prune_step()
        logged = [value for value, _ in storage.history("pruning/latency_ms").values()]
        kept = [value for value, _ in storage.history("pruning/latency_kept_ms").values()]
    log = json.loads((tmp_path / "pruning_log.json").read_text())
    assert [step["latency_ms"] for step in log["steps"]] == pytest.approx(logged)
    assert [step["latency_kept_ms"] for step in log["steps"]] == pytest.approx(kept)
    assert log["latency"]["target_ms"] == pytest.approx(target) and log["latency"]["table"] == r18_table
    first, last = log["steps"]
    # step 1 zeroes half its weak channels: the kept ones meet the budget, the model still runs them
    assert first["zeroed"] > 0 and first["latency_kept_ms"] <= first["latency_budget_ms"] < first["latency_ms"]
    assert last["zeroed"] == 0 and last["latency_ms"] == pytest.approx(last["latency_kept_ms"])
    assert last["latency_budget_ms"] == pytest.approx(target)
    sizes = {n: g.size for n, g in derive_channel_groups(model).items()}
    assert table.predict(sizes) == pytest.approx(logged[-1]) and logged[-1] <= target


# the table: 128x160, proposal counts 25-100, PRE_NMS_TOPK_TEST 200 (OVERRIDES)
@pytest.mark.parametrize("test_size, proposals, pre_nms, expected", [
    (128, 100, 200, []),
    (256, 100, 200, ["latency table", "128x160", "INPUT.MIN_SIZE_TEST 256"]),
    (128, 400, 200, ["POST_NMS_TOPK_TEST 400 is outside the proposal counts [25, 50, 100]", "extrapolated"]),
    (128, 100, 50, ["MODEL.RPN.PRE_NMS_TOPK_TEST 50 differs from the 200", "profile with MODEL.RPN.PRE_NMS_TOPK_TEST 50"]),
])
def test_hook_warns_when_the_model_is_tested_where_the_table_was_not_measured(r18_table, tmp_path, caplog, test_size,
                                                                               proposals, pre_nms, expected):
    import logging

    table = load_table(r18_table)
    cfg = synthetic_cfg("PRUNING.ENABLED", "True", "PRUNING.TARGET.KIND", "latency", "PRUNING.TARGET.LATENCY.TABLE", r18_table,
                        "PRUNING.TARGET.LATENCY.MS", str(0.6 * table.predict()), "INPUT.MIN_SIZE_TEST", str(test_size),
                        "MODEL.RPN.POST_NMS_TOPK_TEST", str(proposals), "MODEL.RPN.PRE_NMS_TOPK_TEST", str(pre_nms),
                        "OUTPUT_DIR", str(tmp_path))
    model = synthetic_model(cfg)
    hook = PGPHook(cfg)
    with EventStorage(0) as storage, caplog.at_level(logging.WARNING, logger="pgp_det"):
        hook.trainer = SimpleNamespace(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                                       storage=storage, iter=0)
        hook.before_train()
    lines = [r.getMessage() for r in caplog.records
             if r.getMessage().startswith(("latency table", "MODEL.RPN", "TEST.DETECTIONS"))]
    assert len(lines) == (1 if expected else 0), lines
    for part in expected:
        assert part in lines[0]


@pytest.mark.parametrize("test_size, warned", [(128, False), (256, True)])
def test_prune_net_meets_a_latency_target(r18_table, tmp_path, capsys, test_size, warned):
    tool = load_tool("prune_net")
    table = load_table(r18_table)
    target = 0.55 * table.predict()
    out = tmp_path / "pruned"
    code = tool.main(["--config", CONFIG, "--latency-table", r18_table, "--target-latency-ms", str(target),
                      "--allocation", "knapsack", "--output", str(out), *OVERRIDES,
                      "INPUT.MIN_SIZE_TEST", str(test_size)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    # tested at another size than the table's: the target would hold where the model is not run
    size_warnings = [line for line in printed.err.splitlines() if "INPUT.MIN_SIZE_TEST" in line]
    assert len(size_warnings) == int(warned)
    if warned:
        assert size_warnings[0].startswith("warning: ") and "128x160" in size_warnings[0]
    assert "latency predicted on" in printed.out and f"(target {target:.3f} ms)" in printed.out
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["settings"]["requested"] == {"target_latency_ms": pytest.approx(target)}
    assert report["latency"]["predicted_after_ms"] <= target
    assert report["flops"]["input_size"] == list(SIZE)  # the table's input size by default
    cfg = synthetic_cfg()
    cfg.MODEL.WEIGHTS = str(out / "model_pruned.pth")
    model = load_model(cfg, str(out / "model_pruned.pth"))
    sizes = {n: g.size for n, g in derive_channel_groups(model).items()}
    assert sizes == {n: g["kept"] for n, g in report["groups"].items()}
    assert table.predict(sizes) <= target
    assert time_whole_model(model, SIZE, flop_timer) <= target * (1 + 1e-6)


@pytest.mark.parametrize("options, overrides, message", [
    (["--target-fps", "30"], [], "a latency target needs --latency-table"),
    (["--latency-table", "{table}", "--target-fps", "-3"], [], "--target-fps -3.0: give a number > 0"),
    (["--latency-table", "{table}", "--ratio", "0.5"], [], "--latency-table is used with --target-latency-ms"),
    (["--latency-table", "{table}", "--target-latency-ms", "1e9"], [], "is not below the unpruned model's"),
    (["--latency-table", "{table}", "--target-latency-ms", "0.001"], [], "is unreachable: pruning every prunable group"),
    (["--latency-table", "{table}", "--target-fps", "30", "--input-size", "256x256"], [],
     "--input-size does not apply to a latency target"),
    (["--latency-table", "{table}", "--target-fps", "30"], ["MODEL.FPN.OUT_CHANNELS", "32"],
     "was made for another architecture: channel group backbone.fpn.inner has 64 channels there and 32"),
    (["--latency-table", "{table}", "--target-fps", "30"], ["PRUNING.TARGET.LATENCY.DEVICE", "cuda"], "not on cuda"),
])
def test_prune_net_refuses_bad_latency_requests_in_one_line(r18_table, tmp_path, capsys, options, overrides, message):
    tool = load_tool("prune_net")
    out = tmp_path / "out"
    options = [o.replace("{table}", r18_table) for o in options]
    assert tool.main(["--config", CONFIG, *options, "--allocation", "knapsack", "--output", str(out),
                      *OVERRIDES, *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not out.exists()


def test_profiler_says_how_much_pruning_can_remove_and_prune_net_agrees(r18_table, tmp_path, capsys):
    """The profiler's headroom line names the time left with every group at its fewest channels:
    the floor that prune_net then refuses to go below, in the same milliseconds."""
    import re

    from pgp_det.benchmark.latency.report import headroom_report

    table = load_table(r18_table)
    line = headroom_report(table)
    least, full, share = (float(x) for x in re.search(r"([\d.]+) ms of ([\d.]+) ms predicted \(([\d.]+)%", line).groups())
    assert full == pytest.approx(table.predict(), abs=1e-3) and 0.0 < least < 0.5 * full
    assert share == pytest.approx(100.0 * (full - least) / full, abs=0.05)
    out = tmp_path / "out"
    assert load_tool("prune_net").main(["--config", CONFIG, "--latency-table", r18_table, "--target-latency-ms",
                                        str(0.9 * least), "--allocation", "knapsack", "--output", str(out),
                                        *OVERRIDES]) == 2
    err = capsys.readouterr().err
    refused_at = re.search(r"leaves ([\d.]+) ms", err)
    assert refused_at and float(refused_at.group(1)) == pytest.approx(least, rel=1e-3), err
    assert load_tool("prune_net").main(["--config", CONFIG, "--latency-table", r18_table, "--target-latency-ms",
                                        str(1.01 * least), "--allocation", "knapsack", "--output", str(out),
                                        *OVERRIDES]) == 0


def test_profile_tool_refuses_bad_input_and_writes_nothing(tmp_path, capsys):
    tool = load_tool("profile_latency")
    out = tmp_path / "t.json"
    base = ["--config", CONFIG, "--output", str(out)]
    cases = [
        (["--device", "cpu", "--fp16", "--input-size", "128x160"], "--fp16 needs --device cuda"),
        (["--input-size", "12x160"], "must each be >= 32"),
        (["--input-size", "128x160", "--points", "1"], "--points 1"),
        (["--input-size", "128x160", "--proposals", "0,10"], "proposal counts are >= 1"),
        (["--input-size", "128x160", "--check-ratios", "0.5,1.0"], "ratios are fractions in [0, 1)"),
        (["--input-size", "128x160", "--images", "0"], "--images 0: profile on at least 1 image"),
        (["--input-size", "128x160", "--check-weights", "w.pth"], "--check-weights is used with --check"),
        (["--input-size", "128x160", "--check", "--check-weights", "missing.pth"], "missing.pth"),
        ([], "--input-size HxW is required"),
        (["--passes", "0", "--input-size", "128x160"], "--runs and --passes must be >= 1"),
        (["--table", str(tmp_path / "missing.json")], "does not exist"),
    ]
    for extra, message in cases:
        assert tool.main(base + extra + OVERRIDES, timer=flop_timer) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)
    # an override's test-time setting is checked with the config, before anything is measured
    assert tool.main(base + ["--input-size", "128x160"] + OVERRIDES + ["MODEL.RPN.POST_NMS_TOPK_TEST", "0"],
                     timer=flop_timer) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MODEL.RPN.POST_NMS_TOPK_TEST 0 keeps no proposal" in err[0], err
    assert not list(tmp_path.iterdir())
    out.write_text("{}")
    assert tool.main(base + ["--input-size", "128x160"] + OVERRIDES, timer=flop_timer) == 2
    assert "already exists: pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]


def test_settings_check_the_latency_keys(r18_table, tmp_path):
    def check(*extra):
        cfg = synthetic_cfg("PRUNING.ENABLED", "True", "PRUNING.TARGET.KIND", "latency", *extra)
        return check_pruning_config(cfg)

    good = ["PRUNING.TARGET.LATENCY.TABLE", r18_table]
    check(*good, "PRUNING.TARGET.LATENCY.MS", "100.0")
    check(*good, "PRUNING.TARGET.LATENCY.FPS", "20.0", "PRUNING.TARGET.LATENCY.DEVICE", "cpu")
    cases = [
        (["PRUNING.TARGET.LATENCY.FPS", "20.0"], "PRUNING.TARGET.LATENCY.TABLE is empty"),
        (good, "are invalid: give exactly one latency target: a latency in ms or a frame rate, not neither"),
        (good + ["PRUNING.TARGET.LATENCY.FPS", "20.0", "PRUNING.TARGET.LATENCY.MS", "5.0"], "not both"),
        (good + ["PRUNING.TARGET.LATENCY.FPS", "-2.0"], "must be a number >= 0"),
        (["PRUNING.TARGET.LATENCY.TABLE", str(tmp_path / "none.json"), "PRUNING.TARGET.LATENCY.FPS", "20.0"], "does not exist"),
        (good + ["PRUNING.TARGET.LATENCY.FPS", "20.0", "PRUNING.TARGET.LATENCY.DEVICE", "cuda"], "was measured on cpu"),
        (good + ["PRUNING.TARGET.LATENCY.FPS", "20.0", "PRUNING.TARGET.LATENCY.DEVICE", "tpu"], "PRUNING.TARGET.LATENCY.DEVICE = 'tpu'"),
        (good + ["PRUNING.TARGET.LATENCY.FPS", "20.0", "PRUNING.TARGET.CHANNELS.SCOPE_RATIOS", "(('fpn', 0.3),)"], "PRUNING.TARGET.KIND 'channels' only"),
        (good + ["PRUNING.TARGET.LATENCY.FPS", "20.0", "PRUNING.ALLOCATION.NAME", "magic"], "PRUNING.ALLOCATION.NAME = 'magic'"),
    ]
    for extra, message in cases:
        assert message in one_line_error(check, *extra), extra
    # a latency target is met at its table's input size, whatever the FLOPs target's size says
    other_size = ["PRUNING.TARGET.LATENCY.FPS", "20.0", "PRUNING.TARGET.FLOPS.INPUT_SIZE", "(256, 256)"]
    check(*good, *other_size)
    cfg = synthetic_cfg("PRUNING.ENABLED", "True", "PRUNING.TARGET.KIND", "latency", *good, *other_size)
    assert cost_input_size(cfg) == tuple(load_table(r18_table).input_size) != (256, 256)
    cfg = synthetic_cfg("PRUNING.ENABLED", "True", "PRUNING.TARGET.KIND", "speed")
    assert "use 'channels', 'flops' or 'latency'" in one_line_error(check_pruning_config, cfg)


def test_training_preflight_refuses_a_table_of_another_architecture(r18_table):
    """train_net's checks (before anything is written) build the config's model and refuse a
    table made for another architecture; the matching one passes."""
    from pgp_det.engine.preflight import _check_model_for_pruning

    latency = ["PRUNING.ENABLED", "True", "PRUNING.TARGET.KIND", "latency", "PRUNING.TARGET.LATENCY.TABLE", r18_table,
               "PRUNING.TARGET.LATENCY.FPS", "20.0"]
    _check_model_for_pruning(synthetic_cfg(*latency))
    message = one_line_error(_check_model_for_pruning, synthetic_cfg(*latency, "MODEL.ROI_BOX_HEAD.FC_DIM", "128"))
    assert "was made for another architecture: channel group roi_heads.box_head.fc1 has 256 channels there" in message


# ---------------------------------------------------------------------------------------------
# what a coarse grid and isolated layer timings miss: channel blocks, element-wise work


def block_cost(width):
    """Channels a device computing in blocks of 16 pays for."""
    return 16 * -(-width // 16)


def test_training_refuses_an_unreachable_target_before_writing_anything(r18_table, tmp_path):
    """A latency or FLOPs target that pruning every group to its floor cannot reach is refused by
    train_net's checks, which run before anything is written, not by the hook once training has
    started; a reachable one passes them."""
    from pgp_det.engine.preflight import check_training_run

    run = tmp_path / "run"
    latency = ["PRUNING.ENABLED", "True", "PRUNING.TARGET.KIND", "latency", "PRUNING.TARGET.LATENCY.TABLE", r18_table,
               "PRUNING.ALLOCATION.NAME", "knapsack", "OUTPUT_DIR", str(run)]
    table = load_table(r18_table)
    floor = table.predict({name: 8 for name in table.groups})
    message = one_line_error(check_training_run, synthetic_cfg(*latency, "PRUNING.TARGET.LATENCY.MS", str(0.9 * floor)),
                             eval_only=False, resume=False)
    assert "is unreachable" in message and f"leaves {floor:.4g} ms" in message, message
    flops = ["PRUNING.ENABLED", "True", "PRUNING.TARGET.KIND", "flops", "PRUNING.TARGET.FLOPS.REDUCTION", "0.999",
             "OUTPUT_DIR", str(run)]
    assert "FLOPs reduction of 99.9% at 128x160 is unreachable" in one_line_error(
        check_training_run, synthetic_cfg(*flops), eval_only=False, resume=False)
    assert check_training_run(synthetic_cfg(*latency, "PRUNING.TARGET.LATENCY.MS", str(1.1 * floor)),
                              eval_only=False, resume=False) == ""
    assert not run.exists()


def test_steps_reproduce_a_device_that_computes_channels_in_blocks():
    """A layer on such a device costs the same at 40 channels as at 48; the coarse grid alone
    interpolates between 32 and 64 and misses it, the per-axis steps restore it at every width."""
    grid = (8, 32, 64)
    allowed = tuple(range(8, 65, 8))

    def device_ms(w_in, w_out):
        return 1e-3 * block_cost(w_in) * block_cost(w_out)

    entry = LatencyEntry("x", "conv", "a", "b", grid, grid, tuple(tuple(device_ms(i, o) for o in grid) for i in grid),
                         in_steps=tuple((w, device_ms(w, 64)) for w in allowed),
                         out_steps=tuple((w, device_ms(64, w)) for w in allowed))
    for w_in in allowed:
        for w_out in allowed:
            assert entry.at(w_in, w_out) == pytest.approx(device_ms(w_in, w_out)), (w_in, w_out)
    assert entry.bilinear(40, 40) < 0.8 * device_ms(40, 40)  # what the grid alone predicts
    assert entry.at(40, 48) == pytest.approx(entry.at(48, 48))
    # steps must end at the full width and belong to a prunable axis
    table = toy_table()
    data = table_to_dict(table)
    data["entries"][1]["in_steps"] = [[8, 0.1], [32, 0.2]]
    with pytest.raises(UserInputError, match="layer l2: steps must be ascending widths"):
        table_from_dict(data)


def test_knapsack_never_keeps_a_width_that_costs_a_whole_block():
    """With block costs a step from 64 to 56 channels saves nothing; the knapsack still gets
    past it (to 48) and never ends on a width whose block it pays for in full."""
    grid = tuple(range(8, 65, 8))
    entries = [LatencyEntry(f"l{name}", "conv", None, name, (3,), grid, (tuple(0.1 * block_cost(w) for w in grid),))
               for name in ("a", "b")]
    table = LatencyTable({"a": 64, "b": 64}, (128, 160), entries, (100,), (1.0,), 100, toy_table().metadata)
    groups = {name: toy_group(name, 64) for name in ("a", "b")}
    generator = torch.Generator().manual_seed(1)
    scores = {name: torch.rand(64, generator=generator) for name in groups}
    for fraction in (0.45, 0.6, 0.75, 0.9):
        budget = fraction * table.predict()
        weak = allocate("knapsack", scores, groups, 0.0, {n: 64 for n in groups}, multiple=8, floor=8,
                        budget=latency_budget(table, budget))
        kept = {name: 64 - len(channels) for name, channels in weak.items()}
        assert table.predict(kept) <= budget
        assert all(count % 16 == 0 for count in kept.values()), (fraction, kept)


ELEMENT_WISE = {torch.ops.aten.relu, torch.ops.aten.relu_, torch.ops.aten.add, torch.ops.aten.add_,
                torch.ops.aten.upsample_nearest2d, torch.ops.aten.max_pool2d_with_indices}


class _ElementWiseCounter(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.elements, self.calls = 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls += 1
        if func.overloadpacket in ELEMENT_WISE:
            first = out[0] if isinstance(out, (tuple, list)) else out
            self.elements += first.numel()
        return out


def element_wise_timer(fn):
    """A fake device that also pays for element-wise work (ReLUs, sums, upsampling, pooling):
    'milliseconds' = MFLOPs + 400 per million elements written."""
    counter = _ElementWiseCounter()
    with FlopCounterMode(display=False) as flops, counter:
        fn()
    return flops.get_total_flops() / 1e6 + 400 * counter.elements / 1e6


def test_fitted_rest_predicts_the_element_wise_work_between_layers():
    """On a device paying for element-wise work, most of it happens between the layers timed
    alone (the blocks' ReLUs and sums, FPN's upsampling) and shrinks with the channels: without
    the fit the table over-predicts pruned models, with it the prediction is close."""
    from pgp_det.benchmark.latency.check import check_latency
    from pgp_det.benchmark.latency.profile import profile_latency

    model = synthetic_model(synthetic_cfg())
    # uniform copies only (the knapsack-shaped ones: test_profile_times_the_cuts_a_latency_target_makes)
    fitted = profile_latency(model, SIZE, ProfileSettings(points=3, knapsack_shares=()),
                             Timing(timer=element_wise_timer))
    fixed = profile_latency(model, SIZE, ProfileSettings(points=3, calibration_ratios=()),
                            Timing(timer=element_wise_timer))
    assert fitted.activation_ms > 0 and fixed.activation_ms == 0 == fixed.layer_overhead
    assert fitted.activations and set(fitted.activations) <= set(fitted.groups)
    assert [row["ratio"] for row in fitted.metadata["calibration"]] == [0.2, 0.45, 0.7, 0.5, 0.5]
    with_fit = check_latency(model, fitted, (0.25, 0.5, 0.75), Timing(timer=element_wise_timer))
    without = check_latency(model, fixed, (0.25, 0.5, 0.75), Timing(timer=element_wise_timer))
    for fit_row, plain_row in zip(with_fit, without):
        assert fit_row["measured_ms"] == pytest.approx(plain_row["measured_ms"])
        assert plain_row["error_percent"] > 3.0, plain_row
        assert abs(fit_row["error_percent"]) < 1.5, fit_row
    from pgp_det.latency.fit import fit_rest

    # the calibration stored with the table (the copies' pruned widths and times) fits it again
    stored = table_from_dict(json.loads(json.dumps(table_to_dict(fitted)))).metadata["calibration"]
    refitted = fit_rest(fixed, [(row["widths"], row["measured_ms"]) for row in stored])
    assert refitted.activation_ms == pytest.approx(fitted.activation_ms, rel=1e-9)
    assert refitted.layer_overhead == pytest.approx(fitted.layer_overhead, abs=1e-9)
    # measurements above the table: only a share of the layers' savings shows, never a cost

    widths = with_fit[1]["widths"]
    assert 2.0 * fixed.predict(widths) < fixed.predict()
    slower = fit_rest(fixed, [(widths, 2.0 * fixed.predict(widths))])
    assert slower.activation_ms == 0 and -1.0 < slower.layer_overhead < 0.0
    assert slower.predict(widths) == pytest.approx(2.0 * fixed.predict(widths), rel=1e-9)
    slowest = fit_rest(fixed, [(widths, 1.1 * fixed.predict())])  # slower than the unpruned model
    assert slowest.layer_overhead == -1.0 and slowest.predict(widths) <= slowest.predict()
    unchanged = fit_rest(fixed, [(fixed.groups, fixed.predict())])  # nothing pruned: nothing to fit
    assert unchanged.activation_ms == 0 and unchanged.layer_overhead == 0


def test_contrasting_copies_keep_the_fitted_rest_steady_on_a_noisy_device():
    """Uniform copies shrink the element-wise work and the layers' times nearly in step, so a few
    percent of timing noise decides which of the two the fit blames; two more copies, each cutting
    half of the groups (the half with the most element-wise work per layer time, and the other
    half), tell them apart. On a device paying for element-wise work, with the calibration
    timings 2% noisy (100 draws), the fitted ``activation_ms`` stays near the noise-free fit and
    models pruned unevenly (random widths per group) are predicted closer than from the uniform
    copies alone."""
    import random
    import statistics

    from pgp_det.benchmark.latency.check import check_latency
    from pgp_det.benchmark.latency.inference import pruned_copy
    from pgp_det.benchmark.latency.profile import profile_latency
    from pgp_det.pruning.cost import uniform_sizes
    from pgp_det.latency.fit import fit_rest

    model = synthetic_model(synthetic_cfg())
    table = profile_latency(model, SIZE, ProfileSettings(points=3, knapsack_shares=()), Timing(timer=element_wise_timer))
    rows = table.metadata["calibration"]
    halves = [row for row in rows if "half" in row]
    assert [row["half"] for row in halves] == ["element-wise", "layers"]
    groups = derive_channel_groups(model, allow_frozen=True)
    cut = {name: kept for name, kept in dict(uniform_sizes(groups, 0.5, 8, 8)).items() if kept < groups[name].size}
    assert not set(halves[0]["widths"]) & set(halves[1]["widths"])
    assert {**halves[0]["widths"], **halves[1]["widths"]} == cut
    # the element-wise half saves the most element-wise work for the layer time it saves
    saved = [(1 - table.activation_fraction(row["widths"]), table.predict() - table.predict(row["widths"]))
             for row in halves]
    assert saved[0][0] / saved[0][1] > 2 * saved[1][0] / saved[1][1]

    draw = random.Random(7)
    uneven = {}
    for k in range(6):
        widths = {name: kept_count(g.size, draw.choice([0.0, 0.25, 0.5, 0.75]), 8, 8)
                  for name, g in groups.items() if g.prunable}
        uneven[f"uneven_{k}"] = pruned_copy(model, groups, widths, "cpu")
    measured = check_latency(model, table, (), Timing(timer=element_wise_timer), trained=uneven)
    unfitted = copy.copy(table)
    unfitted.activation_ms = unfitted.layer_overhead = 0.0
    spread, worst = {}, {}
    for name, subset in (("uniform", [row for row in rows if "half" not in row]), ("with halves", rows)):
        noise = random.Random(1)
        fits = [fit_rest(unfitted, [(row["widths"], row["measured_ms"] * (1 + noise.gauss(0, 0.02))) for row in subset])
                for _ in range(100)]
        spread[name] = statistics.pstdev(f.activation_ms for f in fits)
        errors = sorted(max(abs(f.predict(row["widths"]) / row["measured_ms"] - 1) for row in measured) for f in fits)
        worst[name] = errors[89]  # the 90th percentile of the worst error over the uneven models
    assert spread["with halves"] < 0.5 * spread["uniform"], spread
    assert worst["with halves"] < 0.05 and worst["with halves"] < 0.75 * worst["uniform"], worst


class PricedDevice(torch.utils._python_dispatch.TorchDispatchMode):
    """A fake CPU whose clock advances with the work done while it is entered: 1 ms per million
    multiply-adds of a conv or matrix product, 400 ms per million elements an element-wise
    operator writes, and ``pooling_price`` per million for max pooling (a stem's pooling over a
    high-resolution map that leaves the caches). ``clock()`` reads it; ``timer(fn)`` is the
    time one call takes on it."""

    def __init__(self, pooling_price=4000.0):
        super().__init__()
        self.ms = 0.0
        self.pooling_price = pooling_price

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) else out
        if func.overloadpacket == torch.ops.aten.convolution:
            self.ms += first.numel() * args[1][0].numel() / 1e6
        elif func.overloadpacket in (torch.ops.aten.addmm, torch.ops.aten.mm):
            self.ms += first.numel() * args[-1].shape[0] / 1e6
        elif func.overloadpacket == torch.ops.aten.max_pool2d_with_indices:
            self.ms += self.pooling_price * first.numel() / 1e6
        elif func.overloadpacket in ELEMENT_WISE:
            self.ms += 400 * first.numel() / 1e6
        return out

    def clock(self):
        return self.ms

    def timer(self, fn):
        start = self.ms
        fn()
        return self.ms - start


def test_element_wise_work_timed_between_layers_prices_each_groups_cut():
    """On a device where the stem's max pooling costs ten times what a block's sum does per
    element, element counts price cutting the stem's group too low: a model pruned only there is
    over-predicted (by 14%), one pruned only in the deep blocks under-predicted. Timed between the layers
    in the whole model (a clock), each group's element-wise work is priced as the device charges
    it: both models, and a uniformly pruned one, within 1.5%; per group, the time timed after its
    layers matches what the device charged for the operators that follow them."""
    from pgp_det.benchmark.latency.check import check_latency
    from pgp_det.benchmark.latency.inference import pruned_copy
    from pgp_det.benchmark.latency.layers import axis_groups
    from pgp_det.benchmark.latency.profile import profile_latency
    from pgp_det.benchmark.latency.whole_model import time_between_layers

    model = synthetic_model(synthetic_cfg())
    groups = derive_channel_groups(model, allow_frozen=True)
    stem = "backbone.bottom_up.res2.stream"  # the stem's output channels and the res2 blocks' sums
    deep = [name for name in groups if groups[name].prunable and ("res4" in name or "res5" in name)]
    cuts = {"stem only": {stem: groups[stem].size // 4},
            "deep only": {name: groups[name].size // 4 for name in deep}}
    with PricedDevice() as device:
        timed = profile_latency(model, SIZE, ProfileSettings(points=3), Timing(timer=device.timer, clock=device.clock))
        counted = profile_latency(model, SIZE, ProfileSettings(points=3), Timing(timer=device.timer))
        trained = {label: pruned_copy(model, groups, widths, "cpu") for label, widths in cuts.items()}
        rows = {name: check_latency(model, table, (0.5,), Timing(timer=device.timer), trained=trained)
                for name, table in (("timed", timed), ("counted", counted))}
        between = time_between_layers(model, {name: axis_groups(groups).get((name, 0), (None, 1))[0]
                                              for name, m in model.named_modules()
                                              if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))},
                                      SIZE, device.clock, runs=1)
    assert timed.metadata["activation_weights"] == "ms between layers"
    assert counted.metadata["activation_weights"] == "elements written"
    errors = {name: {row.get("label", "uniform"): row["error_percent"] for row in table_rows}
              for name, table_rows in rows.items()}
    for label, error in errors["timed"].items():
        assert abs(error) < 1.5, (label, errors)
    assert errors["counted"]["stem only"] > 3.0, errors
    assert errors["counted"]["deep only"] < -1.0, errors
    # the stem group: its stem's ReLU (in place, every element of the stem's map) and max pooling,
    # then each block's sum and ReLU on the pooled map
    stem_conv = dict(model.named_modules())["backbone.bottom_up.stem.conv1"]
    with torch.no_grad():
        stem_map = stem_conv(torch.zeros(1, 3, *SIZE)).shape
    pooled = (stem_map[-2] // 2) * (stem_map[-1] // 2)
    blocks = sum(1 for name, m in model.named_modules() if name.startswith("backbone.bottom_up.res2.") and
                 name.count(".") == 3)
    stem_size = stem_map[1] * stem_map[2] * stem_map[3]
    expected = (400 * stem_size + 4000 * stem_map[1] * pooled + blocks * 2 * 400 * stem_map[1] * pooled) / 1e6
    assert between[stem] == pytest.approx(expected, rel=1e-6)


class HostBoundDevice:
    """A fake GPU at batch 1: the host issues every operator (``launch_ms`` each) while the device
    computes (1 ms per MFLOP); a call takes the longer of the two. Whole models issue many
    operators, so a model whose FLOPs fall below its launch time runs no faster."""

    def __init__(self, launch_ms):
        self.launch_ms = launch_ms

    def __call__(self, fn):
        counter = _ElementWiseCounter()
        with FlopCounterMode(display=False) as flops, counter:
            fn()
        return max(counter.calls * self.launch_ms, flops.get_total_flops() / 1e6)


def test_fitted_rest_shows_only_the_savings_a_host_bound_device_turns_into_speed():
    """On a device that hides most of the layers' time behind launching them, uniformly pruned
    copies save far less than their layers' own times: the fit finds that only a share of those
    savings shows (``layer_overhead`` between -1 and 0), and every check copy is predicted closer
    than by the layers' times alone, within 6% of its measured share."""
    from pgp_det.benchmark.latency.check import check_latency
    from pgp_det.benchmark.latency.profile import profile_latency

    model = synthetic_model(synthetic_cfg())
    images = [torch.randint(0, 255, (*SIZE, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)).numpy()]

    def operator_calls(fn):
        counter = _ElementWiseCounter()
        with counter:
            fn()
        return counter.calls

    full_mflops = time_whole_model(model, SIZE, flop_timer, images=images)
    calls = time_whole_model(model, SIZE, operator_calls, images=images)
    device = HostBoundDevice(0.9 * full_mflops / calls)  # launching the whole model: 0.9 of its FLOPs' time
    table = profile_latency(model, SIZE, ProfileSettings(points=3), Timing(timer=device), images=images)
    assert -1.0 < table.layer_overhead < 0.0 and table.activation_ms == 0.0
    layers_alone = copy.copy(table)
    layers_alone.activation_ms, layers_alone.layer_overhead = 0.0, 0.0
    rows = check_latency(model, table, (0.25, 0.5, 0.75), Timing(timer=device), images=images)
    for row in rows:
        alone = layers_alone.predict(row["widths"]) / layers_alone.predict()
        assert row["relative"] > 0.85, row  # the device saves little
        assert abs(row["relative_error_percent"]) < 6.0, row
        assert abs(row["predicted_relative"] - row["relative"]) < abs(alone - row["relative"]), row
        assert row["predicted_relative"] <= 1.0


def test_profile_check_times_trained_checkpoints_of_the_architecture(r18_table, tmp_path, capsys):
    """--check-weights: a pruned checkpoint is predicted at its own widths and timed with its own
    proposals; with the fake timer (bilinear FLOPs) the prediction is exact. A profile of
    randomly initialised weights says that trained proposals pool differently; one of --weights
    does not."""
    from pgp_det.checkpoint import PrunedCheckpointer

    cfg = synthetic_cfg()
    model = synthetic_model(cfg)
    PrunedCheckpointer(model, str(tmp_path)).save("unpruned")
    groups = derive_channel_groups(model)
    removals = {name: list(range(g.size // 2)) for name, g in groups.items() if g.prunable and g.size >= 32}
    hard_prune(model, removals, groups=groups)
    PrunedCheckpointer(model, str(tmp_path)).save("pruned")
    table_path = tmp_path / "table.json"
    tool = load_tool("profile_latency")
    assert tool.main(["--config", CONFIG, "--device", "cpu", "--input-size", "128x160", "--points", "3",
                      "--images", "2", "--output", str(table_path), "--check", "--check-ratios", "0.5",
                      "--check-weights", str(tmp_path / "pruned.pth"), *OVERRIDES], timer=flop_timer) == 0
    out = capsys.readouterr().out
    assert "pruned.pth" in out and "is all that channel pruning can remove on this device" in out
    assert "profiled with randomly initialised weights: the ROI pooler's time" in out
    assert tool.main(["--config", CONFIG, "--device", "cpu", "--input-size", "128x160", "--points", "2",
                      "--images", "1", "--weights", str(tmp_path / "unpruned.pth"), "--output",
                      str(tmp_path / "trained.json"), *OVERRIDES], timer=flop_timer) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "randomly initialised" not in out
    table = load_table(str(table_path))
    assert table.metadata["images"] == 2 and table.metadata["images_from"] != "noise"
    row = table.metadata["check"][-1]
    assert row["label"].endswith("pruned.pth")
    kept = {name: g.size for name, g in derive_channel_groups(model).items()}
    assert row["predicted_ms"] == pytest.approx(table.predict(kept))
    assert row["predicted_ms"] < 0.7 * table.predict()
    assert abs(row["error_percent"]) < 1e-6


class DriftingDevice:
    """A fake device whose speed changes between rounds of interleaved timing: every
    ``calls_per_round`` calls of ``timer`` form a round, and round ``r`` is ``factors[r]`` times
    slower (the last factor holds after the list ends)."""

    def __init__(self, timer, factors, calls_per_round):
        self.timer, self.factors, self.calls_per_round, self.calls = timer, factors, calls_per_round, 0

    def __call__(self, fn):
        factor = self.factors[min(self.calls // self.calls_per_round, len(self.factors) - 1)]
        self.calls += 1
        return factor * self.timer(fn)


def test_check_measures_each_model_against_the_unpruned_model_of_its_round(r18_table):
    """The device runs 1.5x slower than when it was profiled from the second of three rounds
    on: the absolute errors show the drift (-33%), the share of the unpruned model's time stays
    exact, for uniform copies and for a trained pruned model alike."""
    from pgp_det.benchmark.latency.check import check_latency

    table = load_table(r18_table)
    cfg = synthetic_cfg()
    model = synthetic_model(cfg)
    trained = synthetic_model(cfg)
    groups = derive_channel_groups(trained)
    hard_prune(trained, {name: list(range(g.size // 4)) for name, g in groups.items() if g.prunable and g.size >= 32},
               groups=groups)
    ratios = (0.25, 0.5)
    device = DriftingDevice(flop_timer, [1.0, 1.5, 1.5], calls_per_round=1 + len(ratios) + 1)
    rows = check_latency(model, table, ratios, Timing(timer=device, rounds=3), trained={"trained": trained})
    assert [row.get("ratio", row.get("label")) for row in rows] == [0.25, 0.5, "trained"]
    assert device.calls == 3 * 4  # three rounds of four models on one image
    for row in rows:
        assert row["unpruned_ms"] == pytest.approx(1.5 * table.predict())
        assert row["error_percent"] == pytest.approx(100 * (1 / 1.5 - 1), abs=1e-6), row
        assert abs(row["relative_error_percent"]) < 1e-6, row
        assert row["relative"] == pytest.approx(row["predicted_relative"])
    assert rows[0]["relative"] > rows[1]["relative"] and rows[2]["relative"] < 0.8


def test_calibration_leaves_out_a_drift_of_the_device_speed():
    """The other proposal counts and the copies that fit the rest enter as shares of the
    unpruned model's time in the same round: a device that slows down 1.4x from the second
    round on gives the same fixed costs at every proposal count and fits the same rest as a
    steady one (timed one count after the other, the counts of the later rounds would look
    1.4x dearer)."""
    from pgp_det.benchmark.latency.profile import profile_latency

    model = synthetic_model(synthetic_cfg())
    steady = profile_latency(model, SIZE, ProfileSettings(points=3, knapsack_shares=()), Timing(timer=element_wise_timer))
    # the unpruned model at 100 (the reference), 25 and 50 proposals; five copies (the knapsack-shaped
    # ones, timed the same way in a second stage, left out so that every round is alike)
    calls_per_round = 3 + 5
    drifting = DriftingDevice(element_wise_timer, [1.0, 1.4, 1.4], calls_per_round=calls_per_round)
    drifted = profile_latency(model, SIZE, ProfileSettings(points=3, knapsack_shares=()),
                              Timing(timer=element_wise_timer, whole_timer=drifting, rounds=3))
    assert drifting.calls == 3 * calls_per_round
    assert steady.proposal_counts == drifted.proposal_counts == (25, 50, 100)
    assert steady.fixed_ms[0] < steady.fixed_ms[1] < steady.fixed_ms[2]  # more proposals, more selection work
    for a, b in zip(steady.fixed_ms, drifted.fixed_ms):
        assert b == pytest.approx(a, rel=1e-6)
    assert steady.activation_ms > 0
    assert drifted.activation_ms == pytest.approx(steady.activation_ms, rel=1e-6)
    assert drifted.layer_overhead == pytest.approx(steady.layer_overhead, abs=1e-9)
    for a, b in zip(steady.metadata["calibration"], drifted.metadata["calibration"]):
        assert b["measured_ms"] == pytest.approx(a["measured_ms"], rel=1e-6)


def test_repeated_layer_calls_give_the_time_of_one_call():
    """On a GPU each layer is called several times per timed sample (``layer_repeat``) to hide
    the synchronisation; the table keeps the time of one call: with a timer counting FLOPs, 3
    repetitions give the same entries as 1."""
    from pgp_det.benchmark.latency.profile import profile_latency

    model = synthetic_model(synthetic_cfg())
    once = profile_latency(model, SIZE, ProfileSettings(points=2, calibration_ratios=()), Timing(timer=flop_timer))
    thrice = profile_latency(model, SIZE, ProfileSettings(points=2, calibration_ratios=(), layer_repeat=3),
                             Timing(timer=flop_timer))
    assert thrice.metadata["layer_repeat"] == 3 and [e.name for e in once.entries] == [e.name for e in thrice.entries]
    for a, b in zip(once.entries, thrice.entries):
        assert a.kind == "roi_pooler" or a.ms[-1][-1] > 0, a.name  # torch counts no FLOPs in ROIAlign
        for row_a, row_b in zip(a.ms, b.ms):
            assert row_b == pytest.approx(row_a, rel=1e-9), a.name
    assert thrice.predict() == pytest.approx(once.predict(), rel=1e-9)


class BusyDevice:
    """A fake device that something else keeps busy now and then: every ``every``-th timing
    after the first ``quiet`` takes ``factor`` times as long."""

    def __init__(self, timer, every, factor, quiet=0):
        self.timer, self.every, self.factor, self.calls, self.spikes = timer, every, factor, -quiet, 0

    def __call__(self, fn):
        self.calls += 1
        if self.calls <= 0 or self.calls % self.every:
            return self.timer(fn)
        self.spikes += 1
        return self.factor * self.timer(fn)


def test_layer_timings_that_a_busy_device_spoiled_are_timed_again():
    """One layer timing in seven taking 30x as long (the device busy elsewhere) leaves the table
    as a quiet device makes it: every spoiled timing breaks what the layer's other widths (or
    proposal counts) allow, is timed again, and the faster timing is kept. A quiet device's
    timings break nothing, so none is repeated."""
    from pgp_det.benchmark.latency.profile import profile_latency

    model = synthetic_model(synthetic_cfg())
    quiet = profile_latency(model, SIZE, ProfileSettings(points=3, calibration_ratios=()), Timing(timer=flop_timer))
    busy_device = BusyDevice(flop_timer, every=7, factor=30.0, quiet=1)  # the whole model before the layers
    busy = profile_latency(model, SIZE, ProfileSettings(points=3, calibration_ratios=()),
                           Timing(timer=busy_device, whole_timer=flop_timer))
    assert quiet.metadata["repeated_layer_timings"] == 0
    assert busy_device.spikes > 10 and busy.metadata["repeated_layer_timings"] >= busy_device.spikes
    assert busy.metadata["distinct_layer_timings"] == quiet.metadata["distinct_layer_timings"]
    assert [e.name for e in busy.entries] == [e.name for e in quiet.entries]
    for a, b in zip(quiet.entries, busy.entries):
        for row_a, row_b in zip(a.ms, b.ms):
            assert row_b == pytest.approx(row_a, rel=1e-9), a.name
        for steps_a, steps_b in ((a.in_steps, b.in_steps), (a.out_steps, b.out_steps)):
            assert [w for w, _ in steps_b] == [w for w, _ in steps_a], a.name
            assert [ms for _, ms in steps_b] == pytest.approx([ms for _, ms in steps_a], rel=1e-9), a.name
        assert (a.proposal_ms is None) == (b.proposal_ms is None), a.name
        if a.proposal_ms is not None:
            assert b.proposal_ms == pytest.approx(a.proposal_ms, rel=1e-9), a.name
    assert busy.predict() == pytest.approx(quiet.predict(), rel=1e-9)


def half_group_saving(table, group):
    """Milliseconds the table predicts pruning half of ``group``'s channels saves."""
    return table.predict() - table.predict({group: table.groups[group] // 2})


class SlowedWhileDevice:
    """A fake device that other work slows ``factor`` times during the timings numbered
    ``start`` to ``stop - 1`` (a few seconds of a busy host): every timing in that window, so no
    layer's timings look wrong against each other."""

    def __init__(self, timer, start, stop, factor):
        self.timer, self.start, self.stop, self.factor, self.calls = timer, start, stop, factor, 0

    def __call__(self, fn):
        slowed = self.start <= self.calls < self.stop
        self.calls += 1
        return (self.factor if slowed else 1.0) * self.timer(fn)


def test_a_second_pass_keeps_a_slow_spell_out_of_the_layer_prices():
    """The device runs 1.6x slower through the middle third of the layer timings. In one pass,
    the layers timed then are priced 1.6x dearer against the others, and the table misprices
    pruning their groups; with two passes through all layers each keeps its faster timing and the
    table is the quiet device's, entry by entry and in what pruning each group saves."""
    from pgp_det.benchmark.latency.profile import profile_latency

    model = synthetic_model(synthetic_cfg())
    quiet = profile_latency(model, SIZE, ProfileSettings(points=3, calibration_ratios=()), Timing(timer=flop_timer))
    timings = quiet.metadata["distinct_layer_timings"]
    tables = {}
    for passes in (1, 2):
        device = SlowedWhileDevice(flop_timer, timings // 3, 2 * timings // 3, 1.6)
        tables[passes] = profile_latency(model, SIZE, ProfileSettings(points=3, calibration_ratios=(), passes=passes),
                                         Timing(timer=device, whole_timer=flop_timer))
        assert device.calls >= passes * timings
        assert tables[passes].metadata["layer_passes"] == passes
        assert tables[passes].metadata["distinct_layer_timings"] == timings

    prunable = [g for g in quiet.groups if half_group_saving(quiet, g) > 0]
    assert len(prunable) >= 4
    mispriced = [g for g in prunable if abs(half_group_saving(tables[1], g) / half_group_saving(quiet, g) - 1) > 0.1]
    assert len(mispriced) >= 2, "the slow spell should have spoiled some prices in one pass"
    for g in prunable:
        assert half_group_saving(tables[2], g) == pytest.approx(half_group_saving(quiet, g), rel=1e-9), g
    for a, b in zip(quiet.entries, tables[2].entries):
        for row_a, row_b in zip(a.ms, b.ms):
            assert row_b == pytest.approx(row_a, rel=1e-9), a.name
        assert [ms for _, ms in b.in_steps + b.out_steps] == pytest.approx([ms for _, ms in a.in_steps + a.out_steps],
                                                                          rel=1e-9), a.name


@pytest.mark.parametrize("slowed", ["before", "after"])
def test_the_whole_model_timed_in_a_slow_state_leaves_the_fixed_part_as_it_was(slowed):
    """The whole model is timed before and after the layer timings and the faster kept: a device
    (or process) 1.3x slower at either of the two timings gives the quiet device's fixed part,
    where either timing alone would put the slowdown into every prediction."""
    from pgp_det.benchmark.latency.profile import profile_latency

    model = synthetic_model(synthetic_cfg())
    quiet = profile_latency(model, SIZE, ProfileSettings(points=3, calibration_ratios=()), Timing(timer=flop_timer))
    assert quiet.metadata["whole_ms_before_layers"] == pytest.approx(quiet.metadata["whole_ms_after_layers"])
    first = 0 if slowed == "before" else 1 + quiet.metadata["distinct_layer_timings"]  # one image: one call each
    device = SlowedWhileDevice(flop_timer, first, first + 1, 1.3)
    table = profile_latency(model, SIZE, ProfileSettings(points=3, calibration_ratios=()), Timing(timer=device))
    meta = table.metadata
    assert meta["repeated_layer_timings"] == 0
    assert meta[f"whole_ms_{slowed}_layers"] == pytest.approx(1.3 * quiet.metadata["whole_ms_before_layers"])
    assert table.fixed_ms == pytest.approx(quiet.fixed_ms, rel=1e-9)
    assert table.predict() == pytest.approx(quiet.predict(), rel=1e-9)


def test_training_warns_of_a_table_profiled_while_the_model_faulted_many_pages():
    """A table whose whole model faulted thousands of pages in per inference, profiled without
    freed memory kept, gets one warning naming the flag; kept, or with few faults, none."""
    from pgp_det.pruning.target import latency_table_at_test_settings

    cfg = synthetic_cfg("MODEL.RPN.POST_NMS_TOPK_TEST", "100", "INPUT.MIN_SIZE_TEST", "128")
    cases = ((49000, False, 1), (49000, True, 0), (40, False, 0))
    for faults, kept, expected in cases:
        table = toy_table(page_faults_per_inference=faults, environment={"freed_memory_kept": kept})
        _, warnings = latency_table_at_test_settings(cfg, table, "t.json")
        about_faults = [w for w in warnings if "memory pages" in w]
        assert len(about_faults) == expected, (faults, kept, warnings)
        for line in about_faults:
            assert "49000 memory pages" in line and "--keep-freed-memory" in line and "\n" not in line


def test_keeping_freed_memory_without_glibc_is_refused_in_one_line(monkeypatch):
    """On a C library other than glibc there is no mallopt to call: one line naming the flag to
    drop, and nothing changed."""
    from pgp_det.utils import allocator

    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("musl", "1.2"))
    message = one_line_error(allocator.keep_freed_memory)
    assert "musl" in message and "drop --keep-freed-memory" in message
    assert allocator.freed_memory_kept() is False


def test_merged_profiles_give_the_quiet_table_when_each_was_slowed_elsewhere(tmp_path, capsys):
    """Three profiles, each slowed 1.6x through a different quarter of its layer timings (whole
    models timed quietly): each alone misprices some groups, the merged table
    (tools/merge_latency_tables.py) prices every group as the quiet device's table does, at every
    proposal count, with the same fitted rest (within 1%)."""
    from pgp_det.benchmark.latency.profile import profile_latency

    model = synthetic_model(synthetic_cfg())
    quiet = profile_latency(model, SIZE, ProfileSettings(points=3, knapsack_shares=()), Timing(timer=element_wise_timer))
    timings = quiet.metadata["distinct_layer_timings"]
    paths = []
    for k, (start, stop) in enumerate(((0, timings // 4), (3 * timings // 8, 5 * timings // 8),
                                       (3 * timings // 4, timings))):
        device = SlowedWhileDevice(element_wise_timer, start, stop, 1.6)
        table = profile_latency(model, SIZE, ProfileSettings(points=3, knapsack_shares=()),
                                Timing(timer=device, whole_timer=element_wise_timer))
        paths.append(save_table(table, str(tmp_path / f"profile_{k}.json")))

    prunable = [g for g in quiet.groups if half_group_saving(quiet, g) > 0]
    singles = [load_table(p) for p in paths]
    for t in singles:
        assert any(abs(half_group_saving(t, g) / half_group_saving(quiet, g) - 1) > 0.1 for g in prunable)

    merge_tool = load_tool("merge_latency_tables")
    output = tmp_path / "merged.json"
    assert merge_tool.main(paths + ["--output", str(output)]) == 0
    assert "merged 3 tables" in capsys.readouterr().out
    merged = load_table(str(output))
    assert [m["source"] for m in merged.metadata["merged_from"]] == paths
    assert len(merged.metadata["calibration"]) == 3 * len(quiet.metadata["calibration"])
    assert quiet.activation_ms > 0
    # each profile splits its contrasting copies by its own (mispriced) layer times, so the merged
    # fit sees other copies than the quiet profile's: the same rest to within a percent
    assert merged.activation_ms == pytest.approx(quiet.activation_ms, rel=1e-2)
    assert merged.layer_overhead == pytest.approx(quiet.layer_overhead, abs=1e-9)
    for n in quiet.proposal_counts:
        assert merged.with_proposals(n).predict() == pytest.approx(quiet.with_proposals(n).predict(), rel=1e-9), n
    for g in prunable:  # each single profile misprices one by more than 10% (above)
        assert half_group_saving(merged, g) == pytest.approx(half_group_saving(quiet, g), rel=1e-2), g


def test_merging_takes_each_groups_median_element_wise_weight(r18_table):
    """Profiles of a CPU time each group's element-wise work, so the weights differ from profile to
    profile: they merge, each group at its median weight (0 where a profile has none); a table
    weighed the other way (element counts against times) is refused in one line."""
    from pgp_det.latency.merge import merge_tables

    base = load_table(r18_table)
    assert base.metadata["activation_weights"] == "elements written"
    group = max(base.activations, key=lambda g: base.activations[g] * base.groups[g])
    tables = []
    for k, factor in enumerate((1.0, 3.0, 2.0)):
        table = copy.deepcopy(base)
        table.activations[group] *= factor
        table.source = f"profile_{k}.json"
        tables.append(table)
    merged = merge_tables(tables)
    for name, weight in base.activations.items():
        assert merged.activations[name] == pytest.approx((2.0 if name == group else 1.0) * weight), name
    # a timed profile drops a group whose saving its noise put at zero: weighed 0 there, merged
    other = min(base.activations, key=lambda g: base.activations[g] * base.groups[g])
    del tables[1].activations[other]
    assert merge_tables(tables).activations[other] == pytest.approx(base.activations[other])
    del tables[2].activations[other]
    assert merge_tables(tables).activations[other] == 0.0
    timed = copy.deepcopy(base)
    timed.metadata["activation_weights"] = "ms between layers"
    with pytest.raises(UserInputError, match="differ in activation_weights: merge only profiles of one model"):
        merge_tables([base, timed])


def test_merging_refuses_tables_of_other_settings_and_writes_nothing(r18_table, tmp_path, capsys):
    """Tables of another input size, thread count or kind of weights (trained or random), a single
    table, a file that is not JSON, or an output that is one of the inputs: one error line, exit
    code 2, no file."""
    merge_tool = load_tool("merge_latency_tables")
    table = load_table(r18_table)
    other_threads = copy.deepcopy(table)
    other_threads.metadata["num_threads"] = 7
    other_size = LatencyTable(table.groups, (64, 80), table.entries, table.proposal_counts, table.fixed_ms,
                              table.reference_proposals, table.metadata, activations=table.activations)
    threads_path = save_table(other_threads, str(tmp_path / "threads.json"))
    size_path = save_table(other_size, str(tmp_path / "size.json"))
    other_weights = copy.deepcopy(table)
    other_weights.metadata["weights"] = "" if table.metadata.get("weights") else "trained.pth"
    weights_path = save_table(other_weights, str(tmp_path / "weights.json"))
    garbled = tmp_path / "garbled.json"
    garbled.write_text("{not json")
    output = tmp_path / "merged.json"
    for argv, message in (([r18_table, threads_path], "differ in num_threads"),
                          ([r18_table, size_path], "differ in input size"),
                          ([r18_table, weights_path], "differ in weights (one profiled trained weights"),
                          ([r18_table], "at least two latency tables"),
                          ([r18_table, str(garbled)], "is not valid JSON"),
                          ([r18_table, threads_path, "--output", threads_path], "is one of the tables")):
        if "--output" not in argv:
            argv = argv + ["--output", str(output)]
        assert merge_tool.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and message in err, err
        assert not output.exists()
    assert load_table(threads_path).metadata["num_threads"] == 7


def test_profile_tool_checks_an_existing_table_without_profiling(r18_table, tmp_path, capsys):
    """``--table T`` times the check models against T's predictions, not a fresh profile's: the
    profiler's own table predicts the fake device exactly, a copy whose layers cost twice as much
    is off by the layers' share; the input is left as it was. An input size, test-time setting or
    kind of weights (random or trained) other than the table's is refused in one line, with
    nothing written."""
    tool = load_tool("profile_latency")
    data = table_to_dict(load_table(r18_table))
    for entry in data["entries"]:
        entry["ms"] = [[2 * v for v in row] for row in entry["ms"]]
        for key in ("in_steps", "out_steps"):
            entry[key] = [[w, 2 * v] for w, v in entry[key]]
        if entry.get("proposal_ms"):
            entry["proposal_ms"] = [2 * v for v in entry["proposal_ms"]]
    doubled = str(tmp_path / "doubled.json")
    save_table(table_from_dict(data), doubled)
    before = open(doubled).read()
    errors = {}
    for name, path in (("own", r18_table), ("doubled", doubled)):
        output = tmp_path / f"checked_{name}.json"
        assert tool.main(["--config", CONFIG, "--table", path, "--output", str(output), "--check-ratios", "0,0.5",
                          *OVERRIDES], timer=flop_timer) == 0
        out = capsys.readouterr().out
        assert f"checked {path}" in out and "uniformly pruned, ratio 0.50" in out
        rows = load_table(str(output)).metadata["check"]
        assert [row["ratio"] for row in rows] == [0.0, 0.5]
        errors[name] = [row["error_percent"] for row in rows]
    assert all(abs(e) < 1e-6 for e in errors["own"]), errors
    assert all(e > 10 for e in errors["doubled"]), errors
    assert open(doubled).read() == before

    output = tmp_path / "refused.json"
    for options, overrides, message in ((["--input-size", "64x64"], [], "was profiled at 128x160"),
                                        ([], ["MODEL.RPN.PRE_NMS_TOPK_TEST", "300"], "MODEL.RPN.PRE_NMS_TOPK_TEST 200"),
                                        (["--passes", "3", "--proposals", "10,20"], [],
                                         "--proposals, --passes set how a table is profiled"),
                                        # given at its default value, still a profiling option
                                        (["--points", "5"], [], "--points set how a table is profiled"),
                                        # timed with freed memory kept, the table was not: refused before it is kept
                                        (["--keep-freed-memory"], [], "profiled without freed memory kept, this "
                                         "check would run with: drop --keep-freed-memory")):
        assert tool.main(["--config", CONFIG, "--table", r18_table, "--output", str(output), *options,
                          *OVERRIDES, *overrides], timer=flop_timer) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and message in err, err
        assert not output.exists()
    data = table_to_dict(load_table(r18_table))
    data["metadata"]["environment"]["freed_memory_kept"] = True
    kept = str(tmp_path / "kept.json")
    save_table(table_from_dict(data), kept)
    assert "freed memory kept" in load_table(kept).describe()
    assert tool.main(["--config", CONFIG, "--table", kept, "--output", str(output), *OVERRIDES], timer=flop_timer) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and "pass --keep-freed-memory" in err, err
    assert not output.exists()
    # a table of random weights checked on trained ones, and the other way round: other proposals
    from pgp_det.checkpoint import PrunedCheckpointer

    PrunedCheckpointer(synthetic_model(synthetic_cfg()), str(tmp_path)).save("trained")
    trained = str(tmp_path / "trained.pth")
    data = table_to_dict(load_table(r18_table))
    data["metadata"]["weights"] = trained
    of_trained = str(tmp_path / "of_trained.json")
    save_table(table_from_dict(data), of_trained)
    for path, options, message in ((r18_table, ["--weights", trained], "profiled with randomly initialised weights, "
                                    "this check would time the unpruned model with trained weights: pass --weights ''"),
                                   (of_trained, [], f"profiled with trained weights, this check would time the "
                                    f"unpruned model with randomly initialised weights: pass --weights {trained}")):
        assert tool.main(["--config", CONFIG, "--table", path, "--output", str(output), *options, *OVERRIDES],
                         timer=flop_timer) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err and message in err, err
        assert not output.exists()


# -- the closed loop: pruning to a share of the unpruned time measured on the device ---------------


def fixed_stage_meter(table, fixed_share: float):
    """A fake device whose whole-model time is the table's prediction for the model's widths plus
    a stage that does not shrink (``fixed_share`` of the unpruned prediction): the table
    under-predicts its share the more, the deeper the cut."""
    fixed = fixed_share * table.predict()

    def time_of(model):
        return fixed + table.predict({n: g.size for n, g in derive_channel_groups(model, allow_frozen=True).items()})

    return lambda unpruned, pruned: time_of(pruned) / time_of(unpruned)


def latency_cfg(table_path, target_ms):
    cfg = synthetic_cfg("PRUNING.TARGET.KIND", "latency", "PRUNING.TARGET.LATENCY.TABLE", table_path,
                        "PRUNING.TARGET.LATENCY.MS", float(target_ms), "PRUNING.ALLOCATION.NAME", "knapsack", "SEED", 3,
                        "INPUT.MIN_SIZE_TEST", 128)  # tested at the table's size: no warning of its own
    cfg.freeze()
    return cfg


def test_closed_loop_meets_a_target_the_table_alone_misses(r18_table):
    from pgp_det.engine.closed_loop import prune_to_measured_latency

    table = load_table(r18_table)
    meter = fixed_stage_meter(table, 0.25)
    lines = []
    result = prune_to_measured_latency(latency_cfg(r18_table, 0.6 * table.predict()), "l1", meter, progress=lines.append)
    loop = result.report["closed_loop"]
    assert loop["rounds"][0]["error_percent"] > 5.0  # by the table alone: slower than asked
    assert loop["met"] and abs(loop["error_percent"]) <= 5.0 and len(loop["rounds"]) <= 4
    assert len(lines) >= 2 * len(loop["rounds"]) - 1  # each round printed, and each corrected budget
    # the model returned is the one measured: its share, measured again, is the reported one
    original = load_model(latency_cfg(r18_table, 1.0), "", strict=False)
    kept = loop["rounds"][loop["kept_round"] - 1]
    assert meter(original, result.model) == pytest.approx(kept["measured_share"])
    assert abs(kept["measured_share"] - 0.6) <= 0.05 * 0.6
    assert kept["budget_ms"] < loop["rounds"][0]["budget_ms"]  # the correction asked the table for less
    assert not result.warnings
    # the report names the target asked for, which a later check measures against, and the
    # budget the kept round asked of the table
    latency = result.report["latency"]
    assert latency["target_ms"] == pytest.approx(0.6 * table.predict())
    assert latency["budget_ms"] == pytest.approx(kept["budget_ms"])
    assert "(target " + f"{latency['target_ms']:.3f} ms, the table's budget after the closed loop" in result.summary()


def test_closed_loop_measures_on_the_images_the_table_was_profiled_on():
    """The loop's share is the one ``profile_latency --check-weights`` measures: on the first
    images of the table's dataset at its size, or on its noise images."""
    from pgp_det.benchmark.measure import fixed_size_images
    from pgp_det.engine.closed_loop import profiled_images

    images = profiled_images(toy_table(images_from="synth_voc_test", images=2))
    expected = fixed_size_images("synth_voc_test", (128, 160), 2)
    assert len(images) == 2 and all(np.array_equal(a, b) for a, b in zip(images, expected))
    noise = fixed_size_images(None, (128, 160), 3)
    assert not any(np.array_equal(a, b) for a, b in zip(images, noise))
    for source in ("noise", "no_such_dataset"):
        made = profiled_images(toy_table(images_from=source, images=3))
        assert len(made) == 3 and all(np.array_equal(a, b) for a, b in zip(made, noise))


def test_closed_loop_says_by_how_much_an_unreachable_target_is_missed(r18_table):
    from pgp_det.engine.closed_loop import prune_to_measured_latency

    table = load_table(r18_table)
    meter = fixed_stage_meter(table, 3.0)  # the fixed stage alone is 3/4 of the unpruned model's time
    result = prune_to_measured_latency(latency_cfg(r18_table, 0.6 * table.predict()), "l1", meter, max_rounds=3)
    loop = result.report["closed_loop"]
    assert not loop["met"] and loop["error_percent"] > 5.0 and loop["stopped"]
    assert 1 <= len(loop["rounds"]) <= 3
    kept = loop["rounds"][loop["kept_round"] - 1]
    assert kept["measured_share"] == min(r["measured_share"] for r in loop["rounds"])  # the fastest it got
    assert len(result.warnings) == 1 and f"{loop['error_percent']:+.1f}%" in result.warnings[0]


def test_closed_loop_is_refused_on_another_machine(r18_table, tmp_path):
    from pgp_det.engine.closed_loop import check_table_device

    table = load_table(r18_table)
    check_table_device(table)  # made here
    data = json.loads(open(r18_table).read())
    data["metadata"]["device_name"] = "Some Other CPU"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    with pytest.raises(UserInputError, match="'Some Other CPU', this machine has"):
        check_table_device(load_table(str(other)))
    out = tmp_path / "out"
    reachable = f"{0.9 * table.predict():.3f}"
    code = load_tool("prune_net").main(["--config", CONFIG, "--latency-table", str(other), "--target-latency-ms",
                                        reachable, "--closed-loop", "--output", str(out), *OVERRIDES])
    assert code == 2 and not out.exists()


def test_closed_loop_times_in_the_memory_setting_the_table_was_profiled_in(r18_table, tmp_path, capsys):
    """A table profiled with freed memory kept (large inputs on a CPU) is timed that way by the
    loop, or refused in one line naming the flag; the flag means nothing without the loop."""
    from pgp_det.engine.closed_loop import check_table_device

    data = json.loads(open(r18_table).read())
    data["metadata"].setdefault("environment", {})["freed_memory_kept"] = True
    kept = tmp_path / "kept.json"
    kept.write_text(json.dumps(data))
    check_table_device(load_table(str(kept)), freed_memory_kept=True)
    with pytest.raises(UserInputError, match="profiled with freed memory kept.*pass --keep-freed-memory"):
        check_table_device(load_table(str(kept)))
    with pytest.raises(UserInputError, match="profiled without freed memory kept.*drop --keep-freed-memory"):
        check_table_device(load_table(r18_table), freed_memory_kept=True)
    prune_net = load_tool("prune_net")
    for flag, table in (("--closed-loop", kept), ("--keep-freed-memory", r18_table)):
        out = tmp_path / f"out{flag}"
        code = prune_net.main(["--config", CONFIG, "--latency-table", str(table), "--target-latency-ms",
                               f"{0.9 * load_table(r18_table).predict():.3f}", flag, "--output", str(out), *OVERRIDES])
        assert code == 2 and not out.exists()
        assert "--keep-freed-memory" in capsys.readouterr().err


def test_check_of_a_model_pruned_to_a_latency_target_says_the_target_to_use_next_time(tmp_path):
    """A trained run's log beside the checked checkpoint names its latency target; the check's
    line says whether the measured share met it and which target would, next time, on this
    device: the same target when it was met, a lower one when the model measured slower."""
    from pgp_det.benchmark.latency.report import next_target_line
    from pgp_det.engine.profile_command import latency_target_of

    run = tmp_path / "run"
    run.mkdir()
    (run / "pruning_log.json").write_text(json.dumps({"steps": [], "latency": {"target_ms": 40.0, "unpruned_ms": 80.0}}))
    weights = str(run / "model_final.pth")
    assert latency_target_of(weights) == {"target_ms": 40.0, "target_share": 0.5}
    one_shot = tmp_path / "pruned"
    one_shot.mkdir()
    (one_shot / "pruning_report.json").write_text(json.dumps({"latency": {"target_ms": 30.0, "before_ms": 60.0}}))
    assert latency_target_of(str(one_shot / "model_pruned.pth")) == {"target_ms": 30.0, "target_share": 0.5}
    assert latency_target_of(str(tmp_path / "model.pth")) == {}  # no record: no target

    met = next_target_line({"label": weights, "relative": 0.5, **latency_target_of(weights)})
    assert "measured share 0.500 (+0.0%)" in met and "PRUNING.TARGET.LATENCY.MS 40.000" in met
    slower = next_target_line({"label": weights, "relative": 0.625, **latency_target_of(weights)})
    assert "(+25.0%)" in slower and "PRUNING.TARGET.LATENCY.MS 32.000" in slower


def test_profile_times_the_cuts_a_latency_target_makes():
    """Besides uniform cuts, the profile times copies cut as a latency target's ``knapsack``
    allocation cuts the model at 0.7 and 0.5 of its time: uneven across groups, each about as deep
    as its target (not shallower), and the fitted table predicts them closely; a share below what
    the floor allows gets no copy instead of an error."""
    from pgp_det.benchmark.latency.profile import profile_latency
    from pgp_det.benchmark.latency.report import calibration_report

    model = synthetic_model(synthetic_cfg())
    groups = derive_channel_groups(model, allow_frozen=True)
    table = profile_latency(model, SIZE, ProfileSettings(points=3), Timing(timer=element_wise_timer))
    rows = [row for row in table.metadata["calibration"] if "knapsack" in row]
    assert [row["knapsack"] for row in rows] == [0.7, 0.5]
    for row in rows:
        kept = [row["widths"].get(name, g.size) / g.size for name, g in groups.items() if g.prunable]
        assert max(kept) - min(kept) > 0.2, row  # not a uniform cut
        assert row["knapsack"] - 0.1 < row["relative"] <= row["knapsack"] + 0.02, row
        predicted = table.predict(row["widths"]) / table.predict()
        assert predicted == pytest.approx(row["relative"], rel=0.03), row
    assert "knapsack for 0.70: predicted" in calibration_report(table)
    unreachable = profile_latency(model, SIZE, ProfileSettings(points=2, contrast=False, knapsack_shares=(0.01,)),
                                  Timing(timer=element_wise_timer))
    assert not [row for row in unreachable.metadata["calibration"] if "knapsack" in row]


def test_profile_states_the_error_to_expect_at_each_depth_of_cut():
    """The calibration copies' measured shares against the fitted table's: a copy the table
    predicts exactly reads +0.0%, one that measured faster than predicted a positive error."""
    from pgp_det.benchmark.latency.report import calibration_report

    table = toy_table()
    full = table.predict()
    shallow = {"a": 40, "b": 40, "c": 32}
    deep = {"a": 8, "b": 8, "c": 8}
    exact, faster = table.predict(shallow) / full, 0.8 * table.predict(deep) / full
    table.metadata["calibration"] = [{"ratio": 0.25, "widths": shallow, "relative": exact, "measured_ms": 1.0},
                                     {"ratio": 0.75, "widths": deep, "relative": faster, "measured_ms": 1.0}]
    line = calibration_report(table)
    shallow_part, deep_part = line.split(": ", 1)[1].split("; ")
    assert shallow_part.startswith("uniform 0.25") and shallow_part.endswith("(+0.0%)"), line
    assert deep_part.startswith("uniform 0.75") and deep_part.endswith("(+25.0%)"), line
    assert calibration_report(toy_table()) == ""  # no copies, nothing to say
