"""Allocation of a pruning step's budget over groups, protection and the hard/soft split, on
hand-built scores whose right answers are known by construction."""
import pytest
import torch
from torch import nn

from pgp_det.pruning import ChannelGroup, ChannelSlice, PruningRequestError, kept_count
from pgp_det.pruning.allocation import (
    ALLOCATION_REGISTRY, adaptive_ratios, allocate, allowed_kept_counts, protect_by_gradient, split_hard_soft,
    weight_sparsity,
)


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


def test_adaptive_ratios_follow_sparsity_with_the_right_mean():
    sizes = {"a": 64, "b": 128, "c": 256}
    ratios = adaptive_ratios({"a": 0.1, "b": 0.2, "c": 0.4}, sizes, 0.3)
    assert ratios == pytest.approx({"a": 0.1, "b": 0.2, "c": 0.4})  # scale 1: 134.4 / 134.4
    # clipping at 0.95 moves the excess to the other groups, keeping the mean
    clipped = adaptive_ratios({"a": 0.01, "b": 0.9}, {"a": 100, "b": 100}, 0.5)
    assert clipped == pytest.approx({"a": 0.05, "b": 0.95})
    # no sparsity anywhere: uniform
    assert adaptive_ratios({"a": 0.0, "b": 0.0}, {"a": 10, "b": 30}, 0.4) == pytest.approx({"a": 0.4, "b": 0.4})
    with pytest.raises(PruningRequestError, match="sparsity of a must be in"):
        adaptive_ratios({"a": 1.5}, {"a": 10}, 0.4)


def test_adaptive_allocation_gives_sparser_groups_higher_ratios():
    groups = [group("a", 64), group("b", 128), group("c", 256)]
    scores = {g.name: shuffled_scores(g.size, i) for i, g in enumerate(groups)}
    original = {g.name: g.size for g in groups}
    weak = allocate("adaptive", scores, groups, 0.3, original, weight_sparsity={"a": 0.1, "b": 0.2, "c": 0.4})
    # 64 * 0.9 = 57.6 -> 56; 128 * 0.8 = 102.4 -> 104; 256 * 0.6 = 153.6 -> 152
    assert {n: len(w) for n, w in weak.items()} == {"a": 8, "b": 24, "c": 104}
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


@pytest.mark.parametrize("method", ["uniform", "global"])
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
    assert remove["g"] == weakest(scores["g"], 8)  # 64 - 8 = 56 channels remain: a multiple of 8
    assert sorted(remove["g"] + zero["g"]) == weak["g"] and not set(remove["g"]) & set(zero["g"])
    remove, zero = split_hard_soft(weak, scores, 1.0)
    assert remove["g"] == weak["g"] and zero["g"] == []
    remove, zero = split_hard_soft(weak, scores, 0.0)
    assert remove["g"] == [] and zero["g"] == weak["g"]


def test_split_hard_soft_rounds_the_remaining_width():
    scores = {"g": torch.arange(64.0), "gn": torch.arange(64.0), "odd": torch.arange(60.0)}
    weak = {"g": list(range(12)), "gn": list(range(24)), "odd": [0, 1, 2]}
    remove, zero = split_hard_soft(weak, scores, 0.5, groups=[group("gn", 64, channel_multiple=16)])
    assert remove["g"] == list(range(8))  # ideal 6; 64 - 8 = 56 is the nearest multiple of 8
    assert remove["gn"] == list(range(16))  # GroupNorm of 16: 64 - 16 = 48
    assert remove["odd"] == [0, 1]  # no multiple of 8 reachable: ideal 1.5, a tie removes more
    assert zero == {"g": list(range(8, 12)), "gn": list(range(16, 24)), "odd": [2]}


def test_split_hard_soft_bad_requests():
    with pytest.raises(PruningRequestError, match="remove_ratio"):
        split_hard_soft({"g": [0]}, {"g": torch.zeros(8)}, 1.5)
    with pytest.raises(PruningRequestError, match="distinct indices in 0..7"):
        split_hard_soft({"g": [8]}, {"g": torch.zeros(8)}, 0.5)
    with pytest.raises(PruningRequestError, match="no scores"):
        split_hard_soft({"g": [0]}, {}, 0.5)


# ---------------------------------------------------------------------------------------------
# bad requests


def test_allocate_bad_requests_fail_clearly():
    g = group("g", 16)
    scores, original = {"g": torch.arange(16.0)}, {"g": 16}
    assert sorted(n for n, _ in ALLOCATION_REGISTRY) == ["adaptive", "global", "uniform"]
    cases = [
        (("greedy", scores, [g], 0.5, original), {},
         "unknown allocation method 'greedy'; known: adaptive, global, uniform"),
        (("uniform", scores, [g], 1.0, original), {}, r"fraction must be in \[0, 1\)"),
        (("uniform", scores, [g], {"h": 0.5}, original), {}, "no pruning fraction for channel group g"),
        (("uniform", {}, [g], 0.5, original), {}, "no scores for channel group g"),
        (("uniform", {"g": torch.arange(8.0)}, [g], 0.5, original), {}, "8 scores for 16 channels"),
        (("uniform", scores, [g], 0.5, {"g": 8}), {}, "original size must be"),
        (("uniform", scores, [group("f", 16, prunable=False)], 0.5, {"f": 16}), {}, "cannot be pruned: frozen"),
        (("uniform", scores, [g], 0.5, original), {"multiple": 0}, "multiple must be an integer >= 1"),
        (("uniform", scores, [g], 0.5, original), {"protected": {"g": torch.zeros(16)}}, "bool tensor of 16"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(PruningRequestError, match=message):
            allocate(*args, **kwargs)
