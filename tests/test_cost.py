"""Cost accounting: predicted FLOPs/parameters of pruned architectures equal fvcore's count of the
actually pruned model, and the FLOPs-target search reaches its target or says why it cannot."""
import pytest
import torch

from pgp_det.benchmark.flops import count_flops
from pgp_det.pruning import PruningRequestError, derive_channel_groups, hard_prune, kept_count
from pgp_det.pruning.cost import (
    CostModel, format_group_costs, layer_costs, ratio_for_flops_reduction, uniform_sizes,
)
from test_pruning_groups import build_detector
from test_surgery_equivalence import eval_outputs, make_image

HEIGHT, WIDTH = 128, 160
PROPOSALS = 50  # POST_NMS_TOPK_TEST of test_pruning_groups' models: the ROI heads' budget


def random_sizes(groups, seed):
    """A random kept count (1 .. size - 1) for every prunable group."""
    generator = torch.Generator().manual_seed(seed)
    return {
        name: int(torch.randint(1, group.size, (1,), generator=generator))
        for name, group in groups.items()
        if group.prunable and group.size > 1
    }


def prune_to(model, groups, sizes):
    """Hard-prune ``model`` so that each group keeps ``sizes[name]`` channels (random ones)."""
    generator = torch.Generator().manual_seed(1)
    removals = {
        name: torch.randperm(groups[name].size, generator=generator)[: groups[name].size - kept].tolist()
        for name, kept in sizes.items()
    }
    hard_prune(model, removals, allow_frozen=True, groups=groups)


@pytest.fixture(scope="module")
def r18():
    model = build_detector("R18-FPN").eval()
    return model, CostModel(model, HEIGHT, WIDTH)


@pytest.mark.parametrize("name", ["R18-FPN", "R50-FPN"])
def test_prediction_matches_fvcore_on_pruned_model(name):
    model = build_detector(name).eval()
    costs = CostModel(model, HEIGHT, WIDTH)
    dense = count_flops(model, HEIGHT, WIDTH)
    assert costs.flops / 1e9 == pytest.approx(dense["gflops"], rel=1e-9)
    assert costs.params == dense["params"]

    groups = derive_channel_groups(model, allow_frozen=True)
    sizes = random_sizes(groups, seed=3)
    assert len(sizes) == len(groups)  # every group changes, frozen ones included
    predicted = costs.predict(sizes)
    prune_to(model, groups, sizes)
    measured = count_flops(model, HEIGHT, WIDTH)

    assert measured["gflops"] < 0.8 * dense["gflops"]  # the pruning is substantial
    assert predicted["gflops"] == pytest.approx(measured["gflops"], rel=0.01)
    for family, gflops in measured["gflops_per_family"].items():
        assert predicted["flops_per_family"][family] / 1e9 == pytest.approx(gflops, rel=0.01, abs=1e-6), family
    assert predicted["params"] == measured["params"]
    assert predicted["params_per_family"] == measured["params_per_family"]


def test_a_cost_model_measured_after_pruning_refers_to_the_original_widths():
    model = build_detector("R18-FPN").eval()
    original = CostModel(model, HEIGHT, WIDTH)
    groups = derive_channel_groups(model, allow_frozen=True)
    sizes = random_sizes(groups, seed=5)
    prune_to(model, groups, sizes)
    rescaled = CostModel(model, HEIGHT, WIDTH).rescaled(original.sizes)  # what a resumed run measures
    assert rescaled.sizes == original.sizes
    assert rescaled.flops == pytest.approx(original.flops, rel=1e-9)
    assert rescaled.params == original.params
    halved = {name: max(1, kept // 2) for name, kept in sizes.items()}
    assert rescaled.predict(halved)["flops"] == pytest.approx(original.predict(halved)["flops"], rel=1e-9)
    with pytest.raises(PruningRequestError, match="cannot rescale to 0 channels"):
        original.rescaled({"backbone.fpn.out": 0})


def test_layer_costs_follow_the_layer_formulas(r18):
    model, _ = r18
    layers = layer_costs(model, HEIGHT, WIDTH)
    stem = layers["backbone.bottom_up.stem.conv1"]  # 7x7 stride 2 on the 128x160 image
    assert (stem.in_channels, stem.out_channels, stem.params) == (3, 64, 64 * 3 * 49)
    assert stem.flops == 64 * 3 * 49 * (HEIGHT // 2) * (WIDTH // 2)
    fc1 = layers["roi_heads.box_head.fc1"]  # every proposal's 256 x 7 x 7 pooled features
    assert (fc1.in_channels, fc1.out_channels) == (256 * 49, 1024)
    assert fc1.flops == PROPOSALS * 256 * 49 * 1024
    assert fc1.params == 256 * 49 * 1024 + 1024


def test_flops_target_is_reached_with_the_smallest_ratio(r18):
    model, costs = r18
    groups = derive_channel_groups(model, allow_frozen=True)
    target = 0.4
    ratio = ratio_for_flops_reduction(costs, groups, target, multiple=8, floor=8)
    assert 0.0 < ratio < 1.0

    def reduction(r):
        return 1.0 - costs.predict(uniform_sizes(groups, r, 8, 8))["flops"] / costs.flops

    assert reduction(ratio) >= target
    assert reduction(ratio - 1e-3) < target  # any smaller ratio misses the target
    sizes = uniform_sizes(groups, ratio, 8, 8)
    assert sizes["backbone.fpn.out"] == kept_count(256, ratio, 8, 8)

    pruned = build_detector("R18-FPN").eval()
    prune_to(pruned, derive_channel_groups(pruned, allow_frozen=True), {n: k for n, k in sizes.items() if k < groups[n].size})
    measured = count_flops(pruned, HEIGHT, WIDTH)["gflops"]
    assert 1.0 - measured / (costs.flops / 1e9) >= target - 1e-9


def test_scopes_limit_the_search_and_unreachable_targets_fail(r18):
    model, costs = r18
    groups = derive_channel_groups(model, allow_frozen=True)
    ratio = ratio_for_flops_reduction(costs, groups, 0.05, scopes=("rpn",))
    sizes = uniform_sizes(groups, ratio, scopes=("rpn",))
    assert {n for n, k in sizes.items() if k < groups[n].size} == {"proposal_generator.rpn_head.conv"}

    with pytest.raises(PruningRequestError, match=r"unreachable: .*scopes rpn.*floor of 8 channels saves \d+\.\d%"):
        ratio_for_flops_reduction(costs, groups, 0.5, scopes=("rpn",))
    with pytest.raises(PruningRequestError, match="must be a fraction in"):
        ratio_for_flops_reduction(costs, groups, 1.0)
    with pytest.raises(PruningRequestError, match="unknown pruning scope 'heads'"):
        ratio_for_flops_reduction(costs, groups, 0.5, scopes=("heads",))


def test_bad_predictions_are_refused_and_groups_are_tabulated(r18):
    model, costs = r18
    with pytest.raises(PruningRequestError, match="unknown channel group 'backbone.nothing'"):
        costs.predict({"backbone.nothing": 3})
    with pytest.raises(PruningRequestError, match=r"backbone.fpn.out: .* use an integer in 1..256"):
        costs.predict({"backbone.fpn.out": 300})

    groups = derive_channel_groups(model, allow_frozen=True)
    per_group = costs.group_costs()
    fc1 = per_group["roi_heads.box_head.fc1"]
    # fc1's FLOPs and fc2's both scale with fc1's outputs
    layers = layer_costs(model, HEIGHT, WIDTH)
    assert fc1.flops == layers["roi_heads.box_head.fc1"].flops + layers["roi_heads.box_head.fc2"].flops
    assert fc1.flops_share == pytest.approx(fc1.flops / costs.flops)
    table = format_group_costs(groups, per_group).splitlines()
    assert len(table) == len(groups) + 1
    assert table[0].split() == ["group", "scope", "size", "GFLOPs", "share", "params"]
    row = next(line for line in table if line.startswith("roi_heads.box_head.fc1 "))
    assert row.split()[1:3] == ["roi_heads", "1024"] and row.split()[4] == f"{100 * fc1.flops_share:.1f}%"


def test_roi_heads_are_counted_at_the_full_budget_even_when_proposals_collapse():
    """A random R50 without norm statistics predicts huge box deltas: clipped to the image, most
    proposals are empty boxes. The count must not depend on that."""
    model = build_detector("R18-FPN").eval()
    with torch.no_grad():
        model.proposal_generator.rpn_head.anchor_deltas.bias.fill_(-30.0)  # width/height ~ 0
    assert len(eval_outputs(model, make_image())["proposal_boxes"]) == 0  # inference filters them all
    layers = layer_costs(model, HEIGHT, WIDTH)
    assert layers["roi_heads.box_head.fc1"].flops == PROPOSALS * 256 * 49 * 1024
