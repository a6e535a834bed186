"""FRS as the paper defines it: alpha-beta LRP relevance from the true class.

On small plain networks relevance is conserved layer to layer (bias-free layers, norms folded)
and split in proportion at sums; a channel whose large gradient x activation comes through a
negative weight ranks lower by relevance. On the synthetic R18-FPN detector the ``frs``
criterion scores every group, L2-normalised per producer layer, dead channels get none, the
model is left as it was, and the ``global`` allocation ranks the scores as they are.
"""
import copy
import os

import pytest
import torch
from torch import nn

from detectron2.layers import Conv2d, FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from pgp_det.config import get_pgp_cfg
from pgp_det.pruning import derive_channel_groups, soft_prune
from pgp_det.pruning.allocation import allocate
from pgp_det.pruning.criteria import build_criterion, combine_layer_scores
from pgp_det.pruning.hook import plan_pruning_step
from pgp_det.pruning.target import ChannelTarget
from pgp_det.pruning.relevance import AlphaBetaLRP
from test_criteria import tiny_groups

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 128


# ---------------------------------------------------------------------------------------------
# the rule on plain networks


def plain_net(norm):
    """conv (+ folded norm, gammas of both signs) - ReLU - conv - ReLU - max pool - linear, no
    biases and zero norm shifts: alpha-beta conserves relevance exactly through every layer."""
    torch.manual_seed(0)
    if norm == "BN":
        bn = nn.BatchNorm2d(8)
        with torch.no_grad():
            bn.weight.copy_(torch.randn(8))
            bn.bias.zero_()
            bn.running_var.uniform_(0.5, 2.0)
    else:
        bn = FrozenBatchNorm2d(8)
        bn.weight.copy_(torch.randn(8))
        bn.running_var.uniform_(0.5, 2.0)
    return nn.Sequential(
        Conv2d(3, 8, 3, padding=1, bias=False, norm=bn), nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1, bias=False), nn.ReLU(inplace=True),
        nn.MaxPool2d(2), nn.Flatten(), nn.Linear(6 * 4 * 4, 5, bias=False),
    )


@pytest.mark.parametrize("norm", ["BN", "FrozenBN"])
def test_relevance_is_conserved_layer_to_layer(norm):
    net = plain_net(norm).train()
    x = torch.randn(2, 3, 8, 8, requires_grad=True)  # inputs of both signs at the first layer
    totals = {}
    with AlphaBetaLRP(net, on_relevance=lambda name, r: totals.__setitem__(name, r.sum().item())) as lrp:
        logits = net(x)
        start = torch.zeros_like(logits)
        start[:, 2] = 1.0  # the true class of both images
        (at_input,) = lrp.propagate([logits], [start], stop_at=[x])
    # relevance at the output of each layer (= the next one's input) and at the network's input
    assert set(totals) == {"0", "2", "6"}
    for name, total in totals.items():
        assert total == pytest.approx(2.0, rel=1e-4), name
    assert at_input.sum().item() == pytest.approx(2.0, rel=1e-4)
    # the block computed the usual function (BN with its running statistics) and left no trace
    assert torch.allclose(logits, net.eval()(x), atol=1e-5)
    assert all("forward" not in m.__dict__ for m in net.modules())
    assert all(p.grad is None for p in net.parameters()) and x.grad is None


class SumNet(nn.Module):
    """Two conv branches, one at half resolution upsampled (FPN's top-down sum), added, pooled."""

    def __init__(self):
        super().__init__()
        self.fine = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.coarse = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False)
        self.head = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        fine, coarse = self.fine(x), self.coarse(x)
        total = fine + nn.functional.interpolate(coarse, scale_factor=2.0, mode="nearest")
        self.seen = (fine, coarse, total)
        return self.head(torch.relu(total).mean(dim=(2, 3)))


def test_sums_split_relevance_in_proportion_to_their_summands():
    torch.manual_seed(1)
    net = SumNet()
    with AlphaBetaLRP(net) as lrp:
        logits = net(torch.rand(1, 3, 8, 8))
        start = torch.zeros_like(logits)
        start[0, 1] = 1.0
        fine, coarse, total = (t.detach() for t in net.seen)
        r_fine, r_coarse, r_total = lrp.propagate([logits], [start], stop_at=net.seen)
    assert r_total.sum().item() == pytest.approx(1.0, rel=1e-4)
    assert (r_fine.sum() + r_coarse.sum()).item() == pytest.approx(1.0, rel=1e-4)
    # every position's relevance goes to the summands in proportion to their values; a coarse
    # pixel collects the shares of its four upsampled copies
    per_unit = torch.where(total != 0, r_total / total, 0.0)
    assert torch.allclose(r_fine, fine * per_unit, atol=1e-6)
    assert torch.allclose(r_coarse, coarse * nn.functional.avg_pool2d(per_unit, 2) * 4, atol=1e-6)


def test_relevance_ranks_a_negative_evidence_channel_below_where_gradient_x_activation_puts_it():
    """Channel 0 has the largest activation and a large negative weight to the true class: the
    largest |activation x gradient|, but its relevance is beta's share of the negative evidence,
    less than what the channels that speak for the class receive."""
    conv = nn.Conv2d(1, 4, 1, bias=False)
    head = nn.Linear(4, 2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([3.0, 2.5, 1.0, 0.5]).view(4, 1, 1, 1))
        head.weight.copy_(torch.tensor([[-5.0, -5.0, 1.0, 3.0], [1.0, 1.0, 1.0, 1.0]]))
    net = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)
    x = torch.ones(1, 1, 4, 4)

    activation = torch.relu(conv(x))
    logit = head(activation.mean(dim=(2, 3)))[0, 0]
    (gradient,) = torch.autograd.grad(logit, activation)
    grad_x_act = (activation * gradient).mean(dim=(2, 3)).abs()[0].detach()

    captured = {}
    with AlphaBetaLRP(net, on_relevance=lambda name, r: captured.__setitem__(name, r)) as lrp:
        logits = net(x)
        start = torch.zeros_like(logits)
        start[0, 0] = 1.0
        lrp.propagate([logits], [start])
    relevance = captured["0"].sum(dim=(2, 3)).abs()[0]  # summed over positions: the total per channel

    assert grad_x_act.argmax() == 0
    assert relevance[0] < relevance[2] and relevance[0] < relevance[3]
    assert torch.argsort(relevance, descending=True).tolist() != torch.argsort(grad_x_act, descending=True).tolist()
    # alpha = 2 to the positive evidence, beta = 1 (negative) to the negative: z = a w
    z = torch.tensor([-15.0, -12.5, 1.0, 1.5])
    expected = torch.cat([z[:2] / z[:2].sum(), 2 * z[2:] / z[2:].sum()]).abs()
    assert torch.allclose(relevance, expected, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# the frs criterion on the synthetic R18-FPN


def training_item(seed, classes):
    generator = torch.Generator().manual_seed(seed)
    instances = Instances((SIZE, SIZE))
    instances.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 70.0, 90.0], [60.0, 30.0, 120.0, 110.0]]))
    instances.gt_classes = torch.tensor(classes)
    return {"image": torch.rand(3, SIZE, SIZE, generator=generator) * 255, "height": SIZE, "width": SIZE,
            "instances": instances}


def batch():
    return [training_item(1, [0, 2]), training_item(2, [2, 5])]


@pytest.fixture(scope="module")
def detector():
    cfg = get_pgp_cfg()
    cfg.merge_from_file(os.path.join(ROOT, "configs", "synthetic", "faster_rcnn_R_18_FPN_synth.yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    torch.manual_seed(0)
    model = build_model(cfg)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # trained-looking norms: positive scales and shifts, non-trivial statistics
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                channels = module.num_features
                module.weight.copy_(torch.rand(channels, generator=generator) * 0.5 + 0.25)
                module.bias.copy_(torch.rand(channels, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(channels, generator=generator) * 0.1)
                module.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
    return cfg, model


DEAD = ["backbone.bottom_up.res3.stream", "backbone.bottom_up.res4.0.conv1", "backbone.fpn.inner",
        "roi_heads.box_head.fc1"]


def test_frs_scores_every_group_l2_per_layer_and_dead_channels_get_none(detector):
    cfg, model = detector
    model = copy.deepcopy(model)
    groups = derive_channel_groups(model)
    for name in DEAD:
        soft_prune(model, groups[name], [3], mode="zero_path")  # channel 3 outputs exactly 0
    model.eval()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    criterion = build_criterion("frs")
    criterion.attach(model, groups)
    torch.manual_seed(0)
    criterion.run_extra_pass(model, iter([batch()]), 1)
    scores = criterion.scores(model)
    raw = criterion._layer_scores(model)

    prunable = {n for n, g in groups.items() if g.prunable}
    assert set(scores) == prunable
    assert {groups[n].scope for n in prunable} >= {"backbone", "fpn", "roi_heads", "rpn"}
    for name, values in scores.items():
        assert values.shape == (groups[name].size,) and torch.isfinite(values).all(), name
        assert (values >= 0).all() and values.max() > 0, name
        # each producer layer's vector L2-normalised, then averaged over the group's producers
        assert torch.allclose(values, combine_layer_scores(raw[name], "l2"), atol=1e-7), name
        if len(groups[name].producer_layers) == 1:
            assert values.norm().item() == pytest.approx(1.0, abs=1e-5), name
    for name in DEAD:
        assert scores[name][3] < 1e-6 * scores[name].max(), name
    # the RPN head is scored from its objectness (its row); every class-logit row left it alone
    rpn = raw["proposal_generator.rpn_head.conv"][0]
    assert rpn.max() > 0
    counts = criterion.state_dict()["sums"]["frs_proposals_per_class"]["counts"]
    assert counts[[0, 2, 5]].min() > 0 and counts[[1, 3, 4]].sum() == 0 and counts[-1] > 0

    # the model is as it was: weights, statistics, modes, no gradient, no leftover forwards
    assert not model.training
    assert all(torch.equal(p, params[n]) and p.grad is None for n, p in model.named_parameters())
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert "label_and_sample_proposals" not in model.roi_heads.__dict__
    assert not model.roi_heads.box_predictor._forward_hooks


def test_frs_state_round_trip_and_hard_prune_reset(detector):
    cfg, model = detector
    groups = derive_channel_groups(model)
    original = build_criterion("frs")
    original.attach(model, groups)
    torch.manual_seed(0)
    original.run_extra_pass(model, iter([batch()]), 1)
    resumed = build_criterion("frs")
    resumed.load_state_dict(original.state_dict())  # before attach: applied when attached
    resumed.attach(model, groups)
    for name, values in original.scores(model).items():
        assert torch.equal(values, resumed.scores(model)[name]), name
    assert resumed.num_updates == 1
    resumed.after_hard_prune(groups, {})
    assert resumed.num_updates == 0 and not any(v.any() for v in resumed.scores(model).values())


def test_frs_needs_a_detector_and_batches():
    from pgp_det.pruning import PruningRequestError
    from test_criteria import tiny_net

    with pytest.raises(PruningRequestError, match="frs needs a detectron2 R-CNN"):
        build_criterion("frs").attach(tiny_net(), tiny_groups())
    assert build_criterion("frs").needs_extra_pass and not build_criterion("frs").needs_gradients


# ---------------------------------------------------------------------------------------------
# the global allocation ranks FRS scores as they are


def test_global_allocation_keeps_a_criterions_own_normalisation():
    groups = tiny_groups()
    # stem: small but even values; branches: two small, four large. Ranked as they are, the stem's
    # are the lowest; divided by each group's mean, the branches' two small ones come first
    scores = {"stem": torch.linspace(0.20, 0.27, 8), "branches": torch.tensor([0.25, 0.3, 0.9, 1.0, 1.1, 1.2])}
    args = (scores, groups, 0.25, {n: g.size for n, g in groups.items()})
    as_given = allocate("global", *args, multiple=1, floor=1, normalisation="none")
    by_mean = allocate("global", *args, multiple=1, floor=1)
    assert as_given == {"stem": [0, 1, 2, 3], "branches": []}
    assert by_mean == {"stem": [0, 1], "branches": [0, 1]}
    assert build_criterion("frs").global_normalisation == "none"
    assert build_criterion("l1").global_normalisation == "mean"

    cfg = get_pgp_cfg()
    cfg.merge_from_list(["PRUNING.ALLOCATION.NAME", "global", "PRUNING.ROUNDING.MULTIPLE", 1, "PRUNING.ROUNDING.MIN_CHANNELS", 1,
                         "PRUNING.SCHEDULE.NAME", "linear"])
    planned = plan_pruning_step(cfg, None, groups, scores, 1, 1, {n: g.size for n, g in groups.items()},
                                ChannelTarget({g.scope: 0.25 for g in groups.values()}), normalisation="none")
    assert planned == as_given
