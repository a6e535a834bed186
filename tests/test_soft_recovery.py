"""Soft pruning lets channels come back: a zeroed channel still receives gradient through the
norm and bias it keeps, and grows back after an optimizer step, in every group of R18-FPN,
R50-FPN and R50-C4 with BatchNorm, FrozenBatchNorm or GroupNorm (and the norm-free layers: FPN,
RPN conv, box-head fcs). The two soft modes differ only in the zeroed filters' momentum; masks
hold filters at zero; and removing a zeroed channel later leaves the detector's outputs unchanged
where its consumers are linear layers or 1x1 convs.

Models are random, but with norm shifts and layer biases positive, as in a trained detector
(with a zero or negative shift the ReLU after a zeroed channel blocks its gradient, which is the
arithmetic, not the pruning).
"""
import copy
import os

import pytest
import torch
from torch import nn

from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads import Res5ROIHeads
from detectron2.structures import Boxes
from detectron2.utils.events import EventStorage

from pgp_det.config import get_pgp_cfg
from pgp_det.errors import UserInputError
from pgp_det.pruning import (
    ChannelMasks, derive_channel_groups, fold_zeroed_channels, hard_prune, soft_prune, zeroed_channels,
)
from pgp_det.pruning.settings import check_pruning_config
from test_pruning_groups import SMALL, detector_cfg
from test_surgery_equivalence import HEIGHT, WIDTH, make_image, make_training_input

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the project's own configs where it has one (no C4 config there: detectron2's model zoo)
CONFIGS = {
    "R18-FPN": os.path.join(ROOT, "configs", "synthetic", "faster_rcnn_R_18_FPN_synth.yaml"),
    "R50-FPN": os.path.join(ROOT, "configs", "faster_rcnn_R_50_FPN_voc.yaml"),
    "R50-C4": None,
}
NORMS = ["BN", "FrozenBN", "GN"]
CHANNEL = 1  # the channel zeroed in every group


@torch.no_grad()
def trained_like(model, seed=0):
    """Norm scales in [0.25, 0.75], shifts and layer biases in [0.2, 0.5], running statistics
    near (0, 1): what a trained detector's norms look like, not what a fresh one has."""
    generator = torch.Generator().manual_seed(seed)

    def uniform(tensor, low, high):
        tensor.copy_(torch.rand(tensor.shape, generator=generator) * (high - low) + low)

    for module in model.modules():
        if isinstance(module, (FrozenBatchNorm2d, nn.BatchNorm2d, nn.GroupNorm)):
            uniform(module.weight, 0.25, 0.75)
            uniform(module.bias, 0.2, 0.5)
            if getattr(module, "running_mean", None) is not None:
                module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
                uniform(module.running_var, 0.5, 1.5)
        elif isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
            uniform(module.bias, 0.2, 0.5)
    return model


def build(arch, norm="FrozenBN", *overrides):
    """``arch`` with ``norm`` in the ResNet (and GN in the FPN when ``norm`` is GN; FPN, RPN conv
    and box-head fcs otherwise norm-free), nothing frozen, small heads, trained-like norms."""
    options = ["MODEL.RESNETS.NORM", norm, "MODEL.BACKBONE.FREEZE_AT", 0, "MODEL.FPN.NORM", "GN" if norm == "GN" else "",
               *overrides]
    if CONFIGS[arch] is None:
        cfg = detector_cfg(arch, *options)
    else:
        cfg = get_pgp_cfg()
        cfg.merge_from_file(CONFIGS[arch])
        cfg.merge_from_list(SMALL + ["MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 16] + options)
    torch.manual_seed(0)
    return trained_like(build_model(cfg))


def training_loss(model, seed=0):
    model.train()
    torch.manual_seed(seed)  # detectron2 samples anchors and proposals at random
    with EventStorage(0):
        losses = model([make_training_input()])
    return sum(losses.values())


def filter_slices(group):
    return [piece for piece in group.producers if piece.role == "filter"]


def row_norm(model, piece, channel, gradient=False):
    tensor = piece.get(model)
    tensor = tensor.grad if gradient else tensor.detach()
    return 0.0 if tensor is None else piece.per_channel(tensor)[channel].abs().sum().item()


# ---------------------------------------------------------------------------------------------
# recovery


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("arch", list(CONFIGS))
def test_zeroed_channel_gets_gradient_and_regrows_in_every_group(arch, norm):
    model = build(arch, norm)
    groups = derive_channel_groups(model)
    assert all(g.prunable for g in groups.values())
    assert any(not any(p.role == "norm" for p in g.producers) for g in groups.values())  # norm-free ones too
    for group in groups.values():
        soft_prune(model, group, [CHANNEL])
        assert zeroed_channels(model, group)[CHANNEL]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    optimizer.zero_grad()
    training_loss(model).backward()

    # every producing layer of every group, not a sum over the model
    no_gradient = [(name, piece.module) for name, group in groups.items() for piece in filter_slices(group)
                   if not row_norm(model, piece, CHANNEL, gradient=True) > 0]
    assert not no_gradient, f"zeroed filters without gradient: {no_gradient}"
    optimizer.step()
    still_zero = [(name, piece.module) for name, group in groups.items() for piece in filter_slices(group)
                  if not row_norm(model, piece, CHANNEL) > 0]
    assert not still_zero, f"zeroed filters that did not regrow: {still_zero}"
    assert not any(zeroed_channels(model, group)[CHANNEL] for group in groups.values())


def test_zeroing_the_whole_output_stops_recovery():
    """The control: with the norm's scale and shift zeroed too (mode "zero_path"), BatchNorm and
    FrozenBN channels get no gradient at all."""
    model = build("R18-FPN", "FrozenBN")
    groups = derive_channel_groups(model)
    for group in groups.values():
        soft_prune(model, group, [CHANNEL], mode="zero_path")
    training_loss(model).backward()
    stream = groups["backbone.bottom_up.res3.stream"]
    assert all(row_norm(model, piece, CHANNEL, gradient=True) == 0 for piece in filter_slices(stream))


# ---------------------------------------------------------------------------------------------
# modes and masks


def snapshot_state(optimizer, param):
    return optimizer.state[param]["momentum_buffer"].clone()


@pytest.mark.parametrize("mode", ["pgp", "sfp"])
def test_soft_modes_differ_only_in_the_zeroed_filters_momentum(mode):
    model = build("R18-FPN", "BN")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    training_loss(model).backward()
    optimizer.step()
    groups = derive_channel_groups(model)
    params = dict(model.named_parameters())
    before = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    momentum = {name: snapshot_state(optimizer, p) for name, p in params.items()}
    channels = [2, 5]
    for group in groups.values():
        soft_prune(model, group, channels, optimizer, mode=mode)

    zeroed_rows = {}  # parameter name -> rows zeroed
    for group in groups.values():
        for piece in filter_slices(group):
            zeroed_rows[f"{piece.module}.{piece.tensor}"] = piece
    for name, tensor in model.state_dict().items():
        if name not in zeroed_rows:  # biases, norm scale / shift / statistics: kept
            assert torch.equal(tensor, before[name]), name
    kept_momentum = 0.0
    for name, piece in zeroed_rows.items():
        weight, state = params[name], optimizer.state[params[name]]["momentum_buffer"]
        rows = piece.per_channel(weight.detach())
        assert rows[channels].abs().sum() == 0 and rows.abs().sum() > 0, name
        kept = [c for c in range(rows.shape[0]) if c not in channels]
        assert torch.equal(piece.per_channel(state)[kept], piece.per_channel(momentum[name])[kept]), name
        zeroed_momentum = piece.per_channel(state)[channels]
        if mode == "pgp":
            assert zeroed_momentum.abs().sum() == 0, name
        else:
            assert torch.equal(zeroed_momentum, piece.per_channel(momentum[name])[channels]), name
            kept_momentum += zeroed_momentum.abs().sum().item()
    assert (kept_momentum == 0) if mode == "pgp" else (kept_momentum > 0)
    for name, param in params.items():
        if name not in zeroed_rows:
            assert torch.equal(optimizer.state[param]["momentum_buffer"], momentum[name]), name


@pytest.mark.parametrize("mode", ["pgp", "sfp"])
def test_masks_hold_filters_at_zero_and_keep_the_norm(mode):
    model = build("R18-FPN", "BN")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    group = derive_channel_groups(model)["backbone.bottom_up.res4.0.conv1"]
    masks = ChannelMasks(mode=mode)
    masks.add(group, [3])
    masks.apply(model, optimizer)
    conv = model.backbone.bottom_up.res4[0].conv1
    training_loss(model).backward()
    optimizer.step()
    assert conv.weight[3].abs().sum() > 0  # it received gradient ...
    gamma = conv.norm.weight[3].item()
    masks.apply(model, optimizer)
    assert conv.weight[3].abs().sum() == 0  # ... and the mask re-zeroes the filter only
    assert conv.norm.weight[3].item() == gamma != 0
    held = optimizer.state[conv.weight]["momentum_buffer"][3].abs().sum()
    assert (held == 0) if mode == "pgp" else (held > 0)


def producer_parts(model, group):
    """``{(layer, part): slice}`` of a group's producers: ``filter``, ``bias`` (the layer's own),
    ``scale`` and ``shift`` (its norm's weight and bias; running statistics left out)."""
    parts = {}
    for piece in group.producers:
        if piece.role == "filter":
            parts[(piece.module, "filter")] = piece
        elif piece.role == "bias":
            parts[(piece.module, "bias")] = piece
        elif piece.role == "norm" and piece.tensor in ("weight", "bias"):
            parts[(piece.module.rsplit(".norm", 1)[0], "scale" if piece.tensor == "weight" else "shift")] = piece
    return parts


def gradient_rows(model, piece, channel):
    """(gradient of ``channel``'s entries, median over the other channels), L1 per channel."""
    grad = piece.get(model).grad
    rows = piece.per_channel(grad).abs().sum(dim=1)
    others = torch.cat([rows[:channel], rows[channel + 1:]])
    return rows[channel].item(), others.median().item()


@pytest.mark.parametrize("mode", ["pgp", "sfp", "zero_path"])
def test_soft_modes_gradients_per_parameter_after_one_step(mode):
    """R18-FPN with BatchNorm in training mode, one channel zeroed in every group, one SGD step
    with momentum. Per producer layer of every group:

    * ``pgp`` / ``sfp``: the filter gets gradient, and under BatchNorm a large one (the zeroed
      channel's batch variance is 0, so the norm scales it by gamma / sqrt(eps)): its row's
      gradient is over 10 times the median live row's; the norm's scale and shift, and the
      layer's bias, are kept and get gradient; the filter is non-zero after the step.
    * ``zero_path``: filter, bias, scale and shift are 0; behind a norm (scale 0) the filter
      and scale get exactly no gradient; with the mask held, all four are 0 after the step.
    """
    model = build("R18-FPN", "BN")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    training_loss(model, seed=1).backward()
    optimizer.step()  # momentum everywhere, so only the mode's clearing can stop a zeroed row
    optimizer.zero_grad()
    groups = derive_channel_groups(model)
    masks = ChannelMasks(mode=mode)
    for group in groups.values():
        masks.add(group, [CHANNEL])
    masks.apply(model, optimizer)
    training_loss(model, seed=2).backward()
    amplified = []
    for name, group in groups.items():
        parts = producer_parts(model, group)
        for (layer, part), piece in parts.items():
            value = row_norm(model, piece, CHANNEL)
            zeroed, live = gradient_rows(model, piece, CHANNEL)
            behind_norm = (layer, "scale") in parts
            if mode == "zero_path":
                assert value == 0, (name, layer, part)
                if behind_norm and part in ("filter", "scale"):
                    assert zeroed == 0, (name, layer, part)
            else:
                assert (value == 0) == (part == "filter"), (name, layer, part)
                if part == "filter":
                    assert zeroed > 0, (name, layer)
                    if behind_norm:
                        amplified.append((zeroed / live, name, layer))
    if mode != "zero_path":
        assert amplified and all(ratio > 10 for ratio, *_ in amplified), sorted(amplified)[:3]
    optimizer.step()
    if mode == "zero_path":
        masks.apply(model, optimizer)  # the hook holds zero_path channels until the next step
    for name, group in groups.items():
        for (layer, part), piece in producer_parts(model, group).items():
            # zero_path: dead until removed; pgp / sfp: the filter grew back, the rest was kept
            assert (row_norm(model, piece, CHANNEL) == 0) == (mode == "zero_path"), (name, layer, part)


def test_soft_mode_config_key():
    from pgp_det.pruning.hook import PGPHook

    cfg = get_pgp_cfg()
    assert cfg.PRUNING.SOFT.MODE == "pgp"
    cfg.merge_from_list(["PRUNING.ENABLED", True, "SOLVER.MAX_ITER", 100, "PRUNING.SOFT.MODE", "sfp"])
    check_pruning_config(cfg)
    assert PGPHook(cfg).masks.mode == "sfp"
    cfg.merge_from_list(["PRUNING.SOFT.MODE", "zero_path"])
    check_pruning_config(cfg)
    assert PGPHook(cfg).masks.mode == "zero_path"
    cfg.merge_from_list(["PRUNING.SOFT.MODE", "zero"])
    with pytest.raises(UserInputError, match="PRUNING.SOFT.MODE = 'zero' is invalid"):
        check_pruning_config(cfg)


# ---------------------------------------------------------------------------------------------
# removal of zeroed channels

# boxes inside the image and across its border
BOXES = torch.tensor([[10.0, 12.0, 70.0, 90.0], [60.0, 30.0, 150.0, 120.0], [0.0, 0.0, 40.0, 40.0],
                      [100.0, 80.0, 160.0, 128.0], [30.0, 40.0, 90.0, 100.0], [70.0, 5.0, 155.0, 60.0]])


@torch.no_grad()
def head_outputs(model, image):
    """Eval mode: RPN objectness and anchor deltas at every anchor, and the box predictor's class
    logits and box deltas for the fixed ``BOXES`` (no sampling, sorting or NMS in between)."""
    model.eval()
    images = model.preprocess_image([{"image": image, "height": HEIGHT, "width": WIDTH}])
    features = model.backbone(images.tensor)
    rpn = model.proposal_generator
    logits, deltas = rpn.rpn_head([features[f] for f in rpn.in_features])
    heads = model.roi_heads
    if isinstance(heads, Res5ROIHeads):
        pooled = heads._shared_roi_transform([features[f] for f in heads.in_features], [Boxes(BOXES)])
        box_features = pooled.mean(dim=[2, 3])
    else:
        box_features = heads.box_head(heads.box_pooler([features[f] for f in heads.box_in_features], [Boxes(BOXES)]))
    class_logits, box_deltas = heads.box_predictor(box_features)
    return {
        "objectness": torch.cat([x.flatten() for x in logits]),
        "anchor_deltas": torch.cat([x.flatten() for x in deltas]),
        "class_logits": class_logits,
        "box_deltas": box_deltas,
    }


def changed(expected, actual):
    return max((expected[k] - actual[k]).abs().max().item() for k in expected)


# groups whose every consumer is a linear layer or an unpadded (1x1) conv
EXACT = {
    "R18-FPN": ["roi_heads.box_head.fc1", "roi_heads.box_head.fc2", "proposal_generator.rpn_head.conv"],
    "R50-FPN": ["backbone.bottom_up.res3.stream", "backbone.bottom_up.res5.stream", "backbone.bottom_up.res4.2.conv2",
                "roi_heads.box_head.fc1", "roi_heads.box_head.fc2"],
    "R50-C4": ["roi_heads.res5.stream", "roi_heads.res5.1.conv2", "backbone.res3.stream"],
}


@pytest.mark.parametrize("arch, norm", [("R18-FPN", "BN"), ("R50-FPN", "FrozenBN"), ("R50-C4", "FrozenBN")])
def test_removing_zeroed_channels_is_exact_for_linear_and_1x1_consumers(arch, norm):
    model = build(arch, norm)
    groups = derive_channel_groups(model)
    removals = {name: [0, 3, 7] for name in EXACT[arch]}
    for name, channels in removals.items():
        soft_prune(model, groups[name], channels)
    image = make_image()
    expected = head_outputs(model, image)

    unfolded = copy.deepcopy(model)
    hard_prune(unfolded, removals, fold=False)
    assert changed(expected, head_outputs(unfolded, image)) > 1e-2  # the zeroed channels were not silent

    folds = fold_zeroed_channels(copy.deepcopy(model), groups, removals)
    assert {f.group for f in folds} == set(removals) and all(f.exact and f.target for f in folds), folds
    hard_prune(model, removals)
    actual = head_outputs(model, image)
    for key, value in expected.items():
        torch.testing.assert_close(actual[key], value, rtol=1e-5, atol=1e-5, msg=key)
    assert all(derive_channel_groups(model)[name].size == groups[name].size - 3 for name in removals)


def test_only_zeroed_channels_are_folded_and_inexact_folds_say_why():
    model = build("R18-FPN", "BN")
    groups = derive_channel_groups(model)
    soft_prune(model, groups["roi_heads.box_head.fc1"], [4])
    soft_prune(model, groups["backbone.fpn.out"], [4])
    bias = model.roi_heads.box_head.fc2.bias.detach().clone()
    folds = fold_zeroed_channels(model, groups, {"roi_heads.box_head.fc1": [5, 6]})  # alive channels
    assert folds == [] and torch.equal(model.roi_heads.box_head.fc2.bias, bias)

    folds = {f.consumer: f for f in fold_zeroed_channels(model, groups, {"backbone.fpn.out": [4, 5]})}
    assert set(folds) == {"proposal_generator.rpn_head.conv", "roi_heads.box_head.fc1"}
    assert all(f.channels == 1 and f.target == "bias" and not f.exact for f in folds.values())
    assert "padding" in folds["proposal_generator.rpn_head.conv"].note
    assert "ROIAlign" in folds["roi_heads.box_head.fc1"].note
