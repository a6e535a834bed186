"""Soft pruning followed by hard pruning of the same channels must not change what the detector
computes: proposals, boxes and scores in eval mode, losses in training mode (fixed seeds).

Here channels are zeroed in soft-pruning mode ``"zero_path"`` (the whole output held at 0), which
makes removal exact through every layer kind: these tests check that hard pruning slices every
tensor consistently. The default modes keep norms and biases so channels can recover; what they
leave behind, and how removal folds it, is tested in ``test_soft_recovery.py``.

GroupNorm models are left out of the equivalence checks on purpose: GN normalises each channel
with statistics of its whole GN group, so a zeroed channel still shifts the mean and variance its
group-mates see, and removing it re-partitions the kept channels into ``num_groups`` groups.
Pruning through GN is well defined (the kept count stays a multiple of ``num_groups``) but not
function-preserving; ``test_group_norm_hard_prune_runs`` covers it.
"""
import pytest
import torch

from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from pgp_det.pruning import derive_channel_groups, hard_prune, soft_prune
from test_pruning_groups import build_detector

HEIGHT, WIDTH = 128, 160
ARCHS = ["R18-FPN", "R50-FPN", "R101-FPN", "R50-C4"]


def make_image(seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(3, HEIGHT, WIDTH, generator=generator) * 255


def make_training_input(seed=1):
    instances = Instances((HEIGHT, WIDTH))
    instances.gt_boxes = Boxes(torch.tensor([[10.0, 12.0, 70.0, 90.0], [60.0, 30.0, 150.0, 120.0]]))
    instances.gt_classes = torch.tensor([0, 2])
    return {"image": make_image(seed), "height": HEIGHT, "width": WIDTH, "instances": instances}


@torch.no_grad()
def eval_outputs(model, image):
    """Proposals (boxes, objectness) and final detections (boxes, scores, classes) for one image."""
    captured = {}
    hook = model.proposal_generator.register_forward_hook(lambda m, i, out: captured.update(proposals=out[0][0]))
    model.eval()
    try:
        instances = model([{"image": image, "height": HEIGHT, "width": WIDTH}])[0]["instances"]
    finally:
        hook.remove()
    proposals = captured["proposals"]
    return {
        "proposal_boxes": proposals.proposal_boxes.tensor,
        "objectness": proposals.objectness_logits,
        "boxes": instances.pred_boxes.tensor,
        "scores": instances.scores,
        "classes": instances.pred_classes,
    }


@torch.no_grad()
def training_losses(model, seed=7):
    """Training-mode losses; the seed fixes detectron2's random sampling of anchors and proposals.
    Norm running statistics are restored afterwards so later eval forwards are unaffected."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    model.train()
    torch.manual_seed(seed)
    with EventStorage(0):  # detectron2 logs training statistics into the current storage
        losses = model([make_training_input()])
    for name, b in model.named_buffers():
        b.copy_(buffers[name])
    model.eval()
    return {k: v.item() for k, v in losses.items()}


def assert_same_outputs(expected, actual):
    assert expected["boxes"].shape[0] > 0, "no detections to compare"
    for key, value in expected.items():
        assert actual[key].shape == value.shape, key
        if key == "classes":
            assert torch.equal(actual[key], value)
        else:
            torch.testing.assert_close(actual[key], value, rtol=1e-4, atol=1e-4 * max(1.0, value.abs().max().item()))


def assert_same_losses(expected, actual):
    assert expected.keys() == actual.keys()
    for key, value in expected.items():
        assert actual[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def random_removals(groups, fraction, seed):
    """A random index set for every prunable group (about ``fraction`` of its channels)."""
    generator = torch.Generator().manual_seed(seed)
    removals = {}
    for name, group in groups.items():
        if group.prunable:
            count = max(1, int(group.size * fraction))
            removals[name] = torch.randperm(group.size, generator=generator)[:count].tolist()
    return removals


def soft_then_hard(model, removals, check_losses):
    """Zero the outputs of ``removals``, record outputs, hard-prune them, compare."""
    groups = derive_channel_groups(model, allow_frozen=True)
    for name, indices in removals.items():
        soft_prune(model, groups[name], indices, mode="zero_path")
    image = make_image()
    soft_outputs = eval_outputs(model, image)
    soft_losses = training_losses(model) if check_losses else None
    hard_prune(model, removals, allow_frozen=True)
    assert_same_outputs(soft_outputs, eval_outputs(model, image))
    if check_losses:
        assert_same_losses(soft_losses, training_losses(model))
    after = derive_channel_groups(model, allow_frozen=True)
    assert list(after) == list(groups)  # names are stable under pruning
    for name, group in groups.items():
        assert after[name].size == group.size - len(removals.get(name, ()))


@pytest.mark.parametrize("arch", ARCHS)
def test_soft_then_hard_prune_is_equivalent(arch):
    """Two rounds (soft A -> hard A -> soft B -> hard B) over every prunable group, including
    frozen ones; training-mode losses are compared in the first round."""
    model = build_detector(arch)
    groups = derive_channel_groups(model, allow_frozen=True)
    assert all(g.prunable for g in groups.values())
    soft_then_hard(model, random_removals(groups, 0.25, seed=11), check_losses=True)
    groups = derive_channel_groups(model, allow_frozen=True)
    soft_then_hard(model, random_removals(groups, 0.2, seed=12), check_losses=False)
    shapes = model.backbone.output_shape()
    for feature, spec in shapes.items():
        assert spec.channels == model.backbone._out_feature_channels[feature]


def test_batch_norm_training_mode_is_equivalent():
    """With BatchNorm in training mode a zeroed channel has batch mean and variance 0, and
    gamma = beta = 0 keeps its output at exactly 0."""
    norm = ["MODEL.RESNETS.NORM", "BN", "MODEL.FPN.NORM", "BN", "MODEL.BACKBONE.FREEZE_AT", 0]
    model = build_detector("R18-FPN", *norm)
    groups = derive_channel_groups(model)
    soft_then_hard(model, random_removals(groups, 0.3, seed=5), check_losses=True)


def test_kept_counts_reapply_to_a_fresh_model():
    """The checkpoint path: a freshly built model shrunk with ``range(kept, size)`` per group
    takes the pruned model's state_dict and computes the same outputs."""
    pruned = build_detector("R18-FPN")
    groups = derive_channel_groups(pruned, allow_frozen=True)
    hard_prune(pruned, random_removals(groups, 0.4, seed=3), allow_frozen=True)
    kept = {name: g.size for name, g in derive_channel_groups(pruned, allow_frozen=True).items()}

    fresh = build_detector("R18-FPN", seed=99)
    original = derive_channel_groups(fresh, allow_frozen=True)
    hard_prune(fresh, {name: range(kept[name], g.size) for name, g in original.items()}, None, allow_frozen=True)
    fresh.load_state_dict(pruned.state_dict())
    assert fresh.backbone.output_shape() == pruned.backbone.output_shape()
    assert fresh.roi_heads.box_head.output_shape == pruned.roi_heads.box_head.output_shape
    image = make_image()
    assert_same_outputs(eval_outputs(pruned, image), eval_outputs(fresh, image))


def test_group_norm_hard_prune_runs():
    """GN groups prune in multiples of ``num_groups`` (here 32) and the model still runs."""
    gn = ["MODEL.RESNETS.NORM", "GN", "MODEL.FPN.NORM", "GN", "MODEL.BACKBONE.FREEZE_AT", 0]
    model = build_detector("R18-FPN", *gn)
    groups = derive_channel_groups(model)
    stream = groups["backbone.bottom_up.res3.stream"]
    assert stream.channel_multiple == 32 and stream.size == 128
    hard_prune(model, {stream.name: list(range(0, 128, 2))[:32], "backbone.fpn.out": list(range(64))})
    norm = model.backbone.bottom_up.res3[0].conv2.norm
    assert norm.num_channels == 96 and norm.weight.shape == (96,) and norm.num_groups == 32
    assert model.backbone.output_shape()["p2"].channels == 192
    outputs = eval_outputs(model, make_image())
    assert torch.isfinite(outputs["scores"]).all()
