"""Allocation of a pruning step's budget over groups, protection and the hard/soft split: on
hand-built scores whose right answers are known by construction, and on the synthetic R18-FPN,
where every allocation meets each step's channel or FLOPs target through the hook's planning."""
import os

import pytest
import torch
from detectron2.modeling import build_model
from torch import nn

from pgp_det.benchmark.flops import count_flops
from pgp_det.config import get_pgp_cfg
from pgp_det.pruning import ChannelGroup, ChannelSlice, PruningRequestError, derive_channel_groups, hard_prune, kept_count
from pgp_det.pruning.allocation import ALLOCATION_REGISTRY, Budget, allocate, allowed_kept_counts
from pgp_det.pruning.channel_stats import protect_by_gradient, weight_sparsity
from pgp_det.pruning.weak_sets import split_hard_soft, whole_widths
from pgp_det.pruning.cost import CostModel
from pgp_det.pruning.criteria import build_criterion
from pgp_det.pruning.hook import PGPHook, plan_pruning_step
from pgp_det.pruning.schedules import pruned_fraction
from pgp_det.pruning.target import ChannelTarget, build_target, flops_budget

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COST_SIZE = (128, 160)  # small: the cost model and fvcore's count stay fast


def group(name, size, channel_multiple=1, producer_layers=(), prunable=True):
    producers = tuple(ChannelSlice(layer, "weight", 0) for layer in producer_layers)
    return ChannelGroup(name=name, scope="backbone", size=size, producers=producers, consumers=(), counts=(),
                        producer_layers=tuple(producer_layers), consumer_layers=(),
                        channel_multiple=channel_multiple, prunable=prunable, reason="" if prunable else "frozen")


def shuffled_scores(size, seed):
    """A random permutation of 0..size-1: the weak set of k channels is {i : score[i] < k}."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed)).float()


def weakest(scores, count):
    return sorted(torch.nonzero(scores < count).reshape(-1).tolist())


# ---------------------------------------------------------------------------------------------
# rounding


@pytest.mark.parametrize("current,multiple,floor,channel_multiple", [
    (256, 8, 8, 1), (100, 8, 8, 1), (64, 8, 8, 16), (6, 8, 8, 1), (20, 8, 8, 1), (48, 1, 1, 1), (96, 8, 16, 32),
])
def test_allowed_counts_are_exactly_what_kept_count_returns(current, multiple, floor, channel_multiple):
    allowed = allowed_kept_counts(current, multiple, floor, channel_multiple)
    returned = {kept_count(current, r / 1000, multiple, floor, channel_multiple) for r in range(1001)}
    assert returned == set(allowed)


# ---------------------------------------------------------------------------------------------
# uniform


def test_uniform_prunes_every_group_to_its_rounded_target_with_the_lowest_scores():
    groups = [group("a", 256), group("b", 64), group("c", 100), group("gn", 64, channel_multiple=16)]
    original = {"a": 256, "b": 128, "c": 100, "gn": 64}
    scores = {g.name: shuffled_scores(g.size, i) for i, g in enumerate(groups)}
    weak = allocate("uniform", scores, groups, 0.3, original)
    # a: 179.2 -> 176; b: 89.6 of C0 128 is more than its 64 -> nothing; c: 70 -> 72; gn: 44.8 -> 48 (lcm 16)
    kept = {"a": 176, "b": 64, "c": 72, "gn": 48}
    for g in groups:
        assert weak[g.name] == weakest(scores[g.name], g.size - kept[g.name]), g.name
    per_group = allocate("uniform", scores, groups, {"a": 0.5, "b": 0.5, "c": 0.1, "gn": 0.6}, original)
    assert {n: groups[i].size - len(w) for i, (n, w) in enumerate(per_group.items())} == {
        "a": 128, "b": 64, "c": 88, "gn": 32}


def test_uniform_respects_the_floor_and_never_keeps_more_than_it_has():
    groups = [group("small", 6), group("tiny", 16)]
    weak = allocate("uniform", {"small": torch.arange(6.0), "tiny": torch.arange(16.0)}, groups, 0.9,
                    {"small": 6, "tiny": 16})
    assert weak == {"small": [], "tiny": list(range(8))}


# ---------------------------------------------------------------------------------------------
# global


def test_global_ranks_channels_of_all_groups_on_one_scale():
    # a: 48 channels at 0.25 x mean, 16 at 3.25 x mean; b: all at its mean. Scale is irrelevant.
    a = torch.cat([torch.full((48,), 0.25), torch.full((16,), 3.25)]) * 1000
    b = torch.ones(64) * 0.001
    groups = [group("a", 64), group("b", 64)]
    weak = allocate("global", {"a": a, "b": b}, groups, 0.5, {"a": 64, "b": 64})
    assert weak["a"] == list(range(48))  # the 48 weakest overall
    assert len(weak["b"]) == 16  # the rest of the 64 from b (ties broken by index)
    assert weak["b"] == list(range(16))


def test_global_keeps_the_floor_and_the_total():
    # "low" has the 15 weakest normalised channels of all, but must keep 8
    low = torch.cat([torch.full((15,), 0.01), torch.tensor([15.85])])
    groups = [group("low", 16), group("x", 64), group("y", 128)]
    scores = {"low": low, "x": shuffled_scores(64, 1) + 1, "y": shuffled_scores(128, 2) + 1}
    weak = allocate("global", scores, groups, 0.5, {"low": 16, "x": 64, "y": 128})
    kept = {g.name: g.size - len(weak[g.name]) for g in groups}
    assert kept["low"] == 8 and weak["low"] == list(range(8))
    assert sum(kept.values()) == 104  # (16 + 64 + 128) / 2


@pytest.mark.parametrize("seed", range(5))
def test_global_rounds_counts_to_multiples_and_stays_near_the_target(seed):
    generator = torch.Generator().manual_seed(seed)
    groups = [group("a", 64), group("b", 128), group("c", 256), group("d", 40)]
    scores = {g.name: torch.rand(g.size, generator=generator) * (i + 1) for i, g in enumerate(groups)}
    original = {g.name: g.size for g in groups}
    weak = allocate("global", scores, groups, 0.37, original)
    kept = {g.name: g.size - len(weak[g.name]) for g in groups}
    assert all(k % 8 == 0 and 8 <= k for k in kept.values()), kept
    # target: 488 * 0.63 = 307.4 -> 307 kept; with steps of 8 the best reachable is within 4
    assert abs(sum(kept.values()) - 307) <= 4, kept
    # inside a group the weak set is the lowest-scored channels
    for g in groups:
        assert weak[g.name] == sorted(torch.argsort(scores[g.name])[: len(weak[g.name])].tolist())


# ---------------------------------------------------------------------------------------------
# adaptive


def test_adaptive_allocation_gives_sparser_groups_higher_ratios_within_the_budget():
    groups = [group("a", 64), group("b", 128), group("c", 256)]
    scores = {g.name: shuffled_scores(g.size, i) for i, g in enumerate(groups)}
    original = {g.name: g.size for g in groups}
    weak = allocate("adaptive", scores, groups, 0.3, original, weight_sparsity={"a": 0.1, "b": 0.2, "c": 0.4})
    ratio = {g.name: len(weak[g.name]) / g.size for g in groups}
    assert 0 < ratio["a"] < ratio["b"] < ratio["c"]
    kept = sum(g.size - len(weak[g.name]) for g in groups)
    assert 448 * 0.7 - 8 < kept <= 448 * 0.7  # the channel budget, to one rounding step of 8
    assert all(weak[g.name] == weakest(scores[g.name], len(weak[g.name])) for g in groups)
    with pytest.raises(PruningRequestError, match="adaptive allocation needs weight_sparsity"):
        allocate("adaptive", scores, groups, 0.3, original)


@torch.no_grad()
def test_weight_sparsity_counts_entries_near_zero_relative_to_each_layer():
    model = nn.Module()
    model.big = nn.Linear(2, 2, bias=False)
    model.small = nn.Linear(2, 2, bias=False)
    model.other = nn.Linear(4, 1, bias=False)
    model.big.weight.copy_(torch.tensor([[100.0, 0.5], [0.0, -2.0]]))  # 0.5 and 0 are <= 1% of 100
    model.small.weight.copy_(torch.tensor([[1e-3, 0.01], [0.02, -1.0]]))  # 1e-3 and 0.01 are <= 0.01
    model.other.weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0]]))
    groups = [group("two", 2, producer_layers=("big", "small")), group("one", 1, producer_layers=("other",)),
              group("frozen", 1, producer_layers=("other",), prunable=False)]
    assert weight_sparsity(model, groups) == {"two": 0.5, "one": 0.0}
    assert weight_sparsity(model, groups, threshold=0.5)["two"] == 0.75


# ---------------------------------------------------------------------------------------------
# protection


def test_protect_by_gradient_marks_the_top_quantile():
    marks = protect_by_gradient({"g": torch.arange(10.0), "flat": torch.ones(5)}, quantile=0.8)
    assert marks["g"].tolist() == [False] * 8 + [True] * 2
    assert not marks["flat"].any()  # equal scores protect nothing
    with pytest.raises(PruningRequestError, match="quantile"):
        protect_by_gradient({"g": torch.arange(3.0)}, quantile=1.0)


@pytest.mark.parametrize("method", ["uniform", "global", "knapsack"])
def test_protected_channels_are_never_chosen(method):
    scores = {"g": torch.arange(32.0) + 1}
    protected = {"g": torch.zeros(32, dtype=torch.bool)}
    protected["g"][[0, 1, 5]] = True
    weak = allocate(method, scores, [group("g", 32)], 0.5, {"g": 32}, protected=protected)
    assert weak["g"] == [2, 3, 4] + list(range(6, 19))  # the next-weakest 16 instead


def test_protection_prunes_less_when_too_few_candidates_are_left():
    protected = {"g": torch.arange(32) < 20}  # only 12 candidates for a weak set of 24
    weak = allocate("uniform", {"g": torch.arange(32.0)}, [group("g", 32)], 0.75, {"g": 32}, protected=protected)
    # keeping 20 is not a multiple of 8: keep 24, prune the 8 weakest unprotected
    assert weak["g"] == list(range(20, 28))


# ---------------------------------------------------------------------------------------------
# hard / soft split


def test_split_hard_soft_removes_the_lowest_share():
    scores = {"g": shuffled_scores(64, 3)}
    weak = {"g": weakest(scores["g"], 16)}
    remove, zero = split_hard_soft(weak, scores, 0.5)
    assert remove["g"] == weakest(scores["g"], 8)
    assert sorted(remove["g"] + zero["g"]) == weak["g"] and not set(remove["g"]) & set(zero["g"])
    remove, zero = split_hard_soft(weak, scores, 1.0)
    assert remove["g"] == weak["g"] and zero["g"] == []
    remove, zero = split_hard_soft(weak, scores, 0.0)
    assert remove["g"] == [] and zero["g"] == weak["g"]


@pytest.mark.parametrize("weak_count", [1, 2, 3, 5, 6, 7, 12, 19, 40])
@pytest.mark.parametrize("remove_ratio", [0.25, 0.5, 0.75])
def test_split_hard_soft_removes_the_share_asked_for_small_weak_sets_too(weak_count, remove_ratio):
    """The removed share is REMOVE_RATIO up to whole channels: within half a channel of it,
    also for weak sets under 8 channels (which rounding widths to multiples of 8 would not remove)."""
    scores = {"g": shuffled_scores(64, weak_count)}
    weak = {"g": weakest(scores["g"], weak_count)}
    remove, zero = split_hard_soft(weak, scores, remove_ratio)
    assert abs(len(remove["g"]) - remove_ratio * weak_count) <= 0.5
    assert remove["g"] == weakest(scores["g"], len(remove["g"]))  # the lowest scores go first
    assert sorted(remove["g"] + zero["g"]) == weak["g"]


def test_the_last_step_leaves_whole_widths():
    """A width left between steps by zeroed channels (60 = 56 kept + 4 zeroed) is not kept for
    good: the lowest-scored channels go down to the largest multiple of 8."""
    scores = {"g": shuffled_scores(60, 1), "whole": shuffled_scores(64, 2), "gn": shuffled_scores(40, 3)}
    groups = [group("g", 60), group("whole", 64), group("gn", 40, channel_multiple=20)]
    weak = {"g": [], "whole": [], "gn": []}
    settled = whole_widths(weak, scores, groups)
    assert settled["g"] == weakest(scores["g"], 4)
    assert settled["whole"] == [] and settled["gn"] == []  # already allowed widths: untouched
    # a group that already gives channels up keeps its weak set (its kept count is an allowed one)
    assert whole_widths({"g": weakest(scores["g"], 12)}, scores, groups)["g"] == weakest(scores["g"], 12)


def test_split_hard_soft_keeps_groupnorm_widths_whole():
    scores = {"g": torch.arange(64.0), "gn": torch.arange(64.0), "odd": torch.arange(60.0)}
    weak = {"g": list(range(12)), "gn": list(range(24)), "odd": [0, 1, 2]}
    remove, zero = split_hard_soft(weak, scores, 0.5, groups=[group("gn", 64, channel_multiple=16)])
    assert remove["g"] == list(range(6))  # exactly half
    assert remove["gn"] == list(range(16))  # GroupNorm of 16 channels per norm group: 64 - 16 = 48
    assert remove["odd"] == [0, 1]  # ideal 1.5: a tie removes more
    assert zero == {"g": list(range(6, 12)), "gn": list(range(16, 24)), "odd": [2]}


def test_split_hard_soft_bad_requests():
    with pytest.raises(PruningRequestError, match="remove_ratio"):
        split_hard_soft({"g": [0]}, {"g": torch.zeros(8)}, 1.5)
    with pytest.raises(PruningRequestError, match="distinct indices in 0..7"):
        split_hard_soft({"g": [8]}, {"g": torch.zeros(8)}, 0.5)
    with pytest.raises(PruningRequestError, match="no scores"):
        split_hard_soft({"g": [0]}, {}, 0.5)


# ---------------------------------------------------------------------------------------------
# knapsack values: one scale for all groups


def knapsack_kept(scores, fraction=0.5, values=None, normalisation="mean", sizes=None):
    """Kept counts of the knapsack under a channel budget (every channel costs 1)."""
    groups = {name: group(name, scores[name].numel()) for name in scores}
    weak = allocate("knapsack", scores, groups, fraction, {n: g.size for n, g in groups.items()}, multiple=8,
                    floor=8, normalisation=normalisation, values=values)
    return {name: groups[name].size - len(channels) for name, channels in weak.items()}


def three_groups(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.rand(64, generator=generator) + 0.5 for name in ("a", "b", "c")}


@pytest.mark.parametrize("factor", [1000.0, 0.001])
def test_knapsack_follows_a_group_whose_values_are_scaled(factor):
    """Values on one scale (loss changes) decide which group pays: scaling one group's values
    moves channels to or from it; scaling only its scores under mean normalisation does not."""
    scores = three_groups()
    even = knapsack_kept(scores, values=scores)
    scaled = knapsack_kept(scores, values=dict(scores, b=scores["b"] * factor))
    assert sum(scaled.values()) == sum(even.values()) == 96
    if factor > 1:
        assert scaled["b"] == 64 > even["b"], (even, scaled)  # worth 1000x more: kept whole
    else:
        assert scaled["b"] == 8 < even["b"], (even, scaled)  # worth almost nothing: cut to the floor
    # raw scores as values (normalisation none): the same; mean normalisation removes the scale
    assert knapsack_kept(dict(scores, b=scores["b"] * factor), normalisation="none") == scaled
    assert knapsack_kept(dict(scores, b=scores["b"] * factor), normalisation="mean") == knapsack_kept(scores)


@pytest.mark.parametrize("given", ["values", "scores"])
def test_knapsack_never_cuts_a_group_without_evidence_for_free(given):
    """A group whose values are all zero (no proposal reached it, no gradient yet) is valued at
    the others' mean channel: it loses about its share, not everything."""
    scores = three_groups(1)
    zero = dict(scores, c=torch.zeros(64))
    kept = knapsack_kept(zero, values=zero) if given == "values" else knapsack_kept(zero)
    assert sum(kept.values()) == 96
    assert kept["c"] > 8, kept
    assert 16 <= kept["c"] <= 48, kept  # near a third of the budget, as a group of average channels
    # a group missing from the values counts as one without evidence
    if given == "values":
        assert knapsack_kept(zero, values={"a": scores["a"], "b": scores["b"]}) == kept


def costly_and_cheap(objective, limit):
    """Kept counts of the knapsack for two 64-channel groups: ``costly`` costs 4 a channel and
    each of its channels is worth 4; ``cheap`` costs 1 and each channel is worth 2 (twice the
    value per unit of cost)."""
    scores = {"costly": torch.ones(64), "cheap": torch.ones(64)}
    groups = {name: group(name, 64) for name in scores}
    budget = Budget(lambda kept: 4.0 * kept.get("costly", 64) + kept.get("cheap", 64), limit, str)
    weak = allocate("knapsack", scores, groups, 0.0, {"costly": 64, "cheap": 64}, multiple=8, floor=8, budget=budget,
                    values={"costly": torch.full((64,), 4.0), "cheap": torch.full((64,), 2.0)},
                    knapsack_objective=objective)
    return {name: 64 - len(channels) for name, channels in weak.items()}


def test_log_share_knapsack_keeps_a_costly_group_from_its_floor():
    """Under a deep cut the sum cuts the costly group to its floor (its channels are worth least
    per unit of cost); the log-share objective, whose loss grows without bound as a group loses
    its value, shares the cut."""
    deep = 4 * 8 + 64 + 8  # the costly group at its floor and the cheap one whole just fit
    summed, logged = costly_and_cheap("sum", deep), costly_and_cheap("log_share", deep)
    assert summed == {"costly": 8, "cheap": 64}, summed
    assert logged["costly"] > 8 and logged["cheap"] < 64, logged
    for kept in (summed, logged):
        assert 4 * kept["costly"] + kept["cheap"] <= deep


def test_log_share_knapsack_cuts_a_little_as_the_sum_does():
    """A shallow cut: both objectives take the same first steps (equal first-order terms)."""
    shallow = 4 * 64 + 64 - 32
    assert costly_and_cheap("log_share", shallow) == costly_and_cheap("sum", shallow) == {"costly": 56, "cheap": 64}


def test_knapsack_values_must_fit_the_groups():
    scores = three_groups()
    with pytest.raises(PruningRequestError, match="b: knapsack values must be 64 finite numbers"):
        knapsack_kept(scores, values=dict(scores, b=torch.ones(10)))
    with pytest.raises(PruningRequestError, match="b: knapsack values must be 64 finite numbers"):
        knapsack_kept(scores, values=dict(scores, b=torch.full((64,), float("nan"))))


# ---------------------------------------------------------------------------------------------
# bad requests


def test_allocate_bad_requests_fail_clearly():
    g = group("g", 16)
    scores, original = {"g": torch.arange(16.0)}, {"g": 16}
    known = ", ".join(sorted(n for n, _ in ALLOCATION_REGISTRY))
    cases = [
        (("greedy", scores, [g], 0.5, original), {}, f"unknown allocation method 'greedy'; known: {known}"),
        (("uniform", scores, [g], 1.0, original), {}, r"fraction must be in \[0, 1\)"),
        (("uniform", scores, [g], {"h": 0.5}, original), {}, "no pruning fraction for channel group g"),
        (("uniform", {}, [g], 0.5, original), {}, "no scores for channel group g"),
        (("uniform", {"g": torch.arange(8.0)}, [g], 0.5, original), {}, "8 scores for 16 channels"),
        (("uniform", scores, [g], 0.5, {"g": 8}), {}, "original size must be"),
        (("uniform", scores, [group("f", 16, prunable=False)], 0.5, {"f": 16}), {}, "cannot be pruned: frozen"),
        (("uniform", scores, [g], 0.5, original), {"multiple": 0}, "multiple must be an integer >= 1"),
        (("uniform", scores, [g], 0.5, original), {"protected": {"g": torch.zeros(16)}}, "bool tensor of 16"),
        (("uniform", scores, [g], 0.5, original), {"budget": Budget(sum, -1.0, str)}, "a budget's limit must be"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(PruningRequestError, match=message):
            allocate(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# the synthetic R18-FPN through the hook's planning (plan_pruning_step)


def synthetic_r18(*overrides):
    """The demo's R18-FPN config (random init, CPU) with PRUNING ``overrides``, and its model."""
    cfg = get_pgp_cfg()
    cfg.merge_from_file(os.path.join(ROOT, "configs", "synthetic", "faster_rcnn_R_18_FPN_synth.yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "PRUNING.TARGET.FLOPS.INPUT_SIZE", COST_SIZE, *overrides])
    torch.manual_seed(0)
    return cfg, build_model(cfg).eval()


def prunable_groups(model, names=None):
    return {n: g for n, g in derive_channel_groups(model).items() if g.prunable and (names is None or n in names)}


@pytest.mark.parametrize("target", ["channels", "flops"])
@pytest.mark.parametrize("method", ["uniform", "global", "knapsack", "adaptive"])
def test_every_allocation_meets_each_steps_target(method, target):
    cfg, model = synthetic_r18("PRUNING.ALLOCATION.NAME", method, "PRUNING.TARGET.KIND", target, "PRUNING.TARGET.CHANNELS.RATIO", 0.5,
                               "PRUNING.TARGET.FLOPS.REDUCTION", 0.5, "PRUNING.SCHEDULE.NAME", "pgp_exponential")
    costs = CostModel(model, *COST_SIZE)
    groups = prunable_groups(model)
    original = {n: g.size for n, g in groups.items()}
    criterion = build_criterion("l1")
    num_steps = 3
    pruning_target = build_target(cfg, derive_channel_groups(model), cost_model=lambda: costs)
    for step in range(1, num_steps + 1):
        criterion.attach(model, groups)
        weak = plan_pruning_step(cfg, model, groups, criterion.scores(model), step, num_steps, original,
                                 pruning_target)
        hard_prune(model, {n: w for n, w in weak.items() if w}, groups=groups)
        groups = prunable_groups(model, original)
        kept = {n: g.size for n, g in groups.items()}
        wanted = pruned_fraction("pgp_exponential", step, num_steps, 0.5)
        if target == "flops":
            reached = 1.0 - costs.predict(kept)["flops"] / costs.flops
            assert wanted - 1e-9 <= reached <= wanted + 0.01, (step, reached, wanted)
        else:
            reached = 1.0 - sum(kept.values()) / sum(original.values())
            assert reached == pytest.approx(wanted, abs=0.01), (step, reached, wanted)
    if target == "flops":  # fvcore's count of the pruned model itself
        assert 1.0 - count_flops(model, *COST_SIZE)["gflops"] * 1e9 / costs.flops == pytest.approx(0.5, abs=0.01)


def test_unreachable_flops_budget_fails_clearly():
    _, model = synthetic_r18()
    costs = CostModel(model, *COST_SIZE)
    groups = prunable_groups(model)
    scores = {n: torch.ones(g.size) for n, g in groups.items()}
    with pytest.raises(PruningRequestError, match=r"global allocation cannot meet the budget of .* GFLOPs at 128x160"):
        allocate("global", scores, groups, 0.5, {n: g.size for n, g in groups.items()},
                 budget=flops_budget(costs, 0.01 * costs.flops))


def test_adaptive_sparsity_ignores_channels_pruning_zeroed():
    cfg, model = synthetic_r18("PRUNING.ALLOCATION.NAME", "adaptive", "PRUNING.TARGET.KIND", "flops")
    costs = CostModel(model, *COST_SIZE)
    groups = prunable_groups(model)
    original = {n: g.size for n, g in groups.items()}
    criterion = build_criterion("l1")
    criterion.attach(model, groups)
    scores = criterion.scores(model)

    target = build_target(cfg, derive_channel_groups(model), cost_model=lambda: costs)

    def weak_counts(zeroed=None):
        weak = plan_pruning_step(cfg, model, groups, scores, 1, 1, original, target, zeroed=zeroed)
        return {n: len(w) for n, w in weak.items()}

    name = "backbone.bottom_up.res4.1.conv1"
    weight = model.get_submodule(groups[name].producer_layers[0]).weight
    planted = list(range(0, groups[name].size, 4))  # a quarter of the group's channels
    # what the other three quarters measure before anything is zeroed
    sparsity = weight_sparsity(model, groups, excluded={name: planted})
    counts = weak_counts(zeroed={name: planted})
    with torch.no_grad():
        weight[planted] = 0.0  # zeroed, as a soft-pruning step leaves them
    assert weight_sparsity(model, groups)[name] > sparsity[name] + 0.2  # counted, they would look sparse
    assert weak_counts()[name] > counts[name]  # ... and the group would be pruned harder
    assert weight_sparsity(model, groups, excluded={name: planted}) == pytest.approx(sparsity)
    assert weak_counts(zeroed={name: planted}) == counts
    with torch.no_grad():  # grown back a little since the step that zeroed them
        weight[planted] = 1e-4 * torch.randn_like(weight[planted])
    assert weight_sparsity(model, groups, excluded={name: planted}) == pytest.approx(sparsity)
    assert weak_counts(zeroed={name: planted}) == counts


def test_protection_spares_channels_with_large_recent_gradients_under_pgp():
    cfg = get_pgp_cfg()
    cfg.merge_from_list(["SOLVER.MAX_ITER", 16, "PRUNING.CRITERION.NAME", "pgp", "PRUNING.ALLOCATION.PROTECT_QUANTILE", 0.95,
                         "PRUNING.SCHEDULE.START", 0, "PRUNING.SCHEDULE.INTERVAL", 8, "PRUNING.SCHEDULE.END", 16,
                         "PRUNING.ROUNDING.MULTIPLE", 1, "PRUNING.ROUNDING.MIN_CHANNELS", 1])
    hook = PGPHook(cfg)
    model = nn.Module()
    model.fc = nn.Linear(4, 16)
    groups = {"fc": group("fc", 16, producer_layers=("fc",))}
    for criterion in (hook.criterion, hook.protector):
        criterion.attach(model, groups)
    # channel 0 had no gradient for 6 iterations, then a large one: the smallest sum since the last
    # step, the largest of late; the others have steady gradients of distinct sizes
    steady = (1.0 + 0.02 * torch.arange(16.0)).reshape(16, 1).expand(16, 4)
    for t in range(8):
        grad = steady.clone()
        grad[0] = 0.0 if t < 6 else 3.5
        model.fc.weight.grad = grad
        hook.criterion.update(model)
        hook.protector.update(model)
    scores = hook.criterion.scores(model)
    assert int(scores["fc"].argmin()) == 0
    protected = protect_by_gradient(hook.protector.scores(model), quantile=cfg.PRUNING.ALLOCATION.PROTECT_QUANTILE)
    assert protected["fc"].nonzero().reshape(-1).tolist() == [0]

    def weak(protected=None):
        return plan_pruning_step(cfg, model, groups, scores, 1, 1, {"fc": 16}, ChannelTarget({"backbone": 0.5}),
                                 protected=protected)["fc"]

    assert 0 in weak() and 0 not in weak(protected)
    assert weak(protected) == list(range(1, 9))  # the next-weakest instead
