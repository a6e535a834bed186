"""Channel groups derived from real detectron2 Faster R-CNN models (random init, CPU)."""
import pytest
import torch
from torch import nn

from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model

from pgp_det.pruning import SCOPES, derive_channel_groups, format_groups, kept_count, prediction_layers

FPN_BASE = "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml"
C4_BASE = "COCO-Detection/faster_rcnn_R_50_C4_1x.yaml"
R18 = ["MODEL.RESNETS.DEPTH", 18, "MODEL.RESNETS.RES2_OUT_CHANNELS", 64]
MODELS = {
    "R18-FPN": (FPN_BASE, R18),
    "R50-FPN": (FPN_BASE, []),
    "R101-FPN": (FPN_BASE, ["MODEL.RESNETS.DEPTH", 101]),
    "R50-C4": (C4_BASE, []),
}
# few classes and proposals keep CPU forwards short; score threshold 0 keeps many detections
SMALL = [
    "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.ROI_HEADS.NUM_CLASSES", 3,
    "MODEL.RPN.PRE_NMS_TOPK_TEST", 200, "MODEL.RPN.POST_NMS_TOPK_TEST", 50,
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", 200, "MODEL.RPN.POST_NMS_TOPK_TRAIN", 50,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
    # unit-scale inputs keep a randomly initialised deep ResNet out of saturation
    "MODEL.PIXEL_STD", [57.0, 57.0, 57.0],
]


def detector_cfg(name, *overrides):
    base, extra = MODELS[name]
    cfg = get_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(base))
    cfg.merge_from_list(SMALL + list(extra) + list(overrides))
    return cfg


@torch.no_grad()
def build_detector(name, *overrides, seed=0):
    """A detectron2 model from model-zoo keys plus ``overrides``; norms get random statistics
    (the defaults, mean 0 / variance 1, would hide a mis-sliced statistic)."""
    cfg = detector_cfg(name, *overrides)
    torch.manual_seed(seed)
    model = build_model(cfg)
    generator = torch.Generator().manual_seed(seed + 1)
    for module in model.modules():
        if isinstance(module, (FrozenBatchNorm2d, nn.BatchNorm2d, nn.GroupNorm)):
            channels = module.weight.shape[0]
            module.weight.copy_(torch.rand(channels, generator=generator) * 0.5 + 0.25)
            module.bias.copy_(torch.randn(channels, generator=generator) * 0.1)
        if isinstance(module, (FrozenBatchNorm2d, nn.BatchNorm2d)):
            module.running_mean.copy_(torch.randn(channels, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(channels, generator=generator) + 0.5)
    return model


def layers(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@pytest.mark.parametrize("name", list(MODELS))
def test_every_layer_output_belongs_to_exactly_one_group(name):
    model = build_detector(name)
    groups = derive_channel_groups(model)
    predictions = set(prediction_layers(model))
    assert predictions == {
        "proposal_generator.rpn_head.objectness_logits", "proposal_generator.rpn_head.anchor_deltas",
        "roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred",
    }
    produced, consumed = {}, {}
    for group in groups.values():
        assert group.scope in SCOPES and group.size >= 1 and group.consumers, group.name
        for piece in group.producers:
            assert piece.get(model).shape[piece.dim] == group.size, (group.name, str(piece))
            if piece.tensor == "weight" and not piece.module.endswith(".norm"):
                produced.setdefault(piece.module, []).append(group.name)
        for piece in group.consumers:
            assert piece.get(model).shape[piece.dim] == group.size * piece.expand, (group.name, str(piece))
            consumed.setdefault(piece.module, []).append(group.name)
    for layer_name, layer in layers(model).items():
        expected = 0 if layer_name in predictions else 1
        assert len(produced.get(layer_name, [])) == expected, (layer_name, produced.get(layer_name))
        reads_image = layer_name.endswith("stem.conv1")
        assert len(consumed.get(layer_name, [])) == (0 if reads_image else 1), (layer_name, consumed.get(layer_name))


def test_r50_fpn_group_names_and_couplings():
    model = build_detector("R50-FPN")
    groups = derive_channel_groups(model)
    for name in ("backbone.bottom_up.stem", "backbone.bottom_up.res2.stream", "backbone.bottom_up.res3.0.conv1",
                 "backbone.bottom_up.res3.0.conv2", "backbone.fpn.inner", "backbone.fpn.out",
                 "proposal_generator.rpn_head.conv", "roi_heads.box_head.fc1", "roi_heads.box_head.fc2"):
        assert name in groups
    assert len(groups) == 1 + 2 * (3 + 4 + 6 + 3) + 4 + 2 + 1 + 2
    stream = groups["backbone.bottom_up.res3.stream"]
    assert set(stream.producer_layers) == {f"backbone.bottom_up.res3.{i}.conv3" for i in range(4)} | {
        "backbone.bottom_up.res3.0.shortcut"}
    assert set(stream.consumer_layers) == {f"backbone.bottom_up.res3.{i}.conv1" for i in range(1, 4)} | {
        "backbone.bottom_up.res4.0.conv1", "backbone.bottom_up.res4.0.shortcut", "backbone.fpn_lateral3"}
    assert stream.size == 512
    inner, out = groups["backbone.fpn.inner"], groups["backbone.fpn.out"]
    assert set(inner.producer_layers) == {f"backbone.fpn_lateral{i}" for i in range(2, 6)}
    assert set(inner.consumer_layers) == {f"backbone.fpn_output{i}" for i in range(2, 6)}
    assert set(out.consumer_layers) == {"proposal_generator.rpn_head.conv", "roi_heads.box_head.fc1"}
    fc1_input = [p for p in out.consumers if p.module == "roi_heads.box_head.fc1"]
    assert [(p.dim, p.expand) for p in fc1_input] == [(1, 49)]
    assert set(groups["roi_heads.box_head.fc2"].consumer_layers) == {
        "roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"}
    assert groups["backbone.bottom_up.stem"].consumer_layers == (
        "backbone.bottom_up.res2.0.conv1", "backbone.bottom_up.res2.0.shortcut")


def test_identity_shortcut_joins_stem_and_res2_stream():
    """R18's first res2 block has no projection (64 -> 64): the stem output is the res2 stream."""
    groups = derive_channel_groups(build_detector("R18-FPN"))
    assert "backbone.bottom_up.stem" not in groups
    stream = groups["backbone.bottom_up.res2.stream"]
    assert set(stream.producer_layers) == {"backbone.bottom_up.stem.conv1", "backbone.bottom_up.res2.0.conv2",
                                           "backbone.bottom_up.res2.1.conv2"}
    assert {"backbone.bottom_up.res3.0.conv1", "backbone.bottom_up.res3.0.shortcut",
            "backbone.fpn_lateral2"} <= set(stream.consumer_layers)
    assert "backbone.bottom_up.res2.0.conv1" in groups  # one free group per BasicBlock
    assert "backbone.bottom_up.res2.0.conv2" not in groups


def test_c4_res4_feeds_rpn_and_res5_head():
    groups = derive_channel_groups(build_detector("R50-C4"))
    res4 = groups["backbone.res4.stream"]
    assert {"proposal_generator.rpn_head.conv", "roi_heads.res5.0.conv1", "roi_heads.res5.0.shortcut"} <= set(
        res4.consumer_layers)
    res5 = groups["roi_heads.res5.stream"]
    assert res5.scope == "roi_heads" and res5.size == 2048
    assert set(res5.consumer_layers) == {"roi_heads.res5.1.conv1", "roi_heads.res5.2.conv1",
                                         "roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred"}
    assert all(p.expand == 1 for p in res5.consumers)  # the predictor reads the spatial mean


def test_freeze_at_marks_stem_and_res2_unless_allowed():
    model = build_detector("R50-FPN", "MODEL.BACKBONE.FREEZE_AT", 2)
    frozen = {n for n, g in derive_channel_groups(model).items() if not g.prunable}
    expected = {n for n in derive_channel_groups(model) if n.startswith(("backbone.bottom_up.stem", "backbone.bottom_up.res2."))}
    assert frozen == expected and "backbone.bottom_up.res2.stream" in frozen
    assert "allow_frozen=True" in derive_channel_groups(model)["backbone.bottom_up.stem"].reason
    assert all(g.prunable for g in derive_channel_groups(model, allow_frozen=True).values())
    unfrozen = build_detector("R50-FPN", "MODEL.BACKBONE.FREEZE_AT", 0)
    assert all(g.prunable for g in derive_channel_groups(unfrozen).values())


@pytest.mark.parametrize("norm", ["BN", "SyncBN", "FrozenBN", "GN", ""])
def test_norm_variants(norm):
    model = build_detector(
        "R18-FPN", "MODEL.RESNETS.NORM", norm, "MODEL.FPN.NORM", norm, "MODEL.BACKBONE.FREEZE_AT", 0,
        "MODEL.ROI_BOX_HEAD.NUM_CONV", 1, "MODEL.ROI_BOX_HEAD.CONV_DIM", 64, "MODEL.ROI_BOX_HEAD.NORM", norm,
    )
    groups = derive_channel_groups(model)
    norm_tensors = {p.tensor for g in groups.values() for p in g.producers if p.module.endswith(".norm")}
    expected = {"BN": {"weight", "bias", "running_mean", "running_var"}, "GN": {"weight", "bias"}, "": set()}
    assert norm_tensors == expected.get(norm, expected["BN"])
    with_norm = [g for n, g in groups.items() if not n.startswith(("proposal_generator", "roi_heads.box_head.fc"))]
    assert all(g.channel_multiple == (32 if norm == "GN" else 1) for g in with_norm)
    assert groups["proposal_generator.rpn_head.conv"].channel_multiple == 1
    stem_norm = {p.tensor for p in groups["backbone.bottom_up.res2.stream"].producers
                 if p.module == "backbone.bottom_up.stem.conv1.norm"}
    assert stem_norm == expected.get(norm, expected["BN"])
    if norm in ("BN", "FrozenBN"):
        var = [p for p in groups["backbone.fpn.out"].producers if p.tensor == "running_var"]
        assert var and all(p.pruned_value == 1.0 for p in var)


def test_box_head_convs_and_pooler_resolution():
    model = build_detector(
        "R18-FPN", "MODEL.ROI_BOX_HEAD.NUM_CONV", 2, "MODEL.ROI_BOX_HEAD.CONV_DIM", 32,
        "MODEL.ROI_BOX_HEAD.NUM_FC", 1, "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 5,
        "MODEL.RPN.CONV_DIMS", [64, 48],
    )
    groups = derive_channel_groups(model)
    out = groups["backbone.fpn.out"]
    assert set(out.consumer_layers) == {"proposal_generator.rpn_head.conv.conv0", "roi_heads.box_head.conv1"}
    assert groups["proposal_generator.rpn_head.conv.conv0"].consumer_layers == ("proposal_generator.rpn_head.conv.conv1",)
    assert groups["proposal_generator.rpn_head.conv.conv1"].size == 48
    assert groups["roi_heads.box_head.conv1"].consumer_layers == ("roi_heads.box_head.conv2",)
    conv2 = groups["roi_heads.box_head.conv2"]
    assert [(p.module, p.expand) for p in conv2.consumers] == [("roi_heads.box_head.fc1", 25)]
    assert {str(c) for c in groups["roi_heads.box_head.fc1"].counts} >= {"roi_heads.box_head._output_size"}

    conv_only = build_detector("R18-FPN", "MODEL.ROI_BOX_HEAD.NUM_CONV", 1, "MODEL.ROI_BOX_HEAD.CONV_DIM", 32,
                               "MODEL.ROI_BOX_HEAD.NUM_FC", 0)
    conv1 = derive_channel_groups(conv_only)["roi_heads.box_head.conv1"]
    assert {(p.module, p.expand) for p in conv1.consumers} == {
        ("roi_heads.box_predictor.cls_score", 49), ("roi_heads.box_predictor.bbox_pred", 49)}
    assert "roi_heads.box_head._output_size[0]" in {str(c) for c in conv1.counts}


def test_unsupported_models_fail_clearly():
    with pytest.raises(ValueError, match="roi_heads.mask_head"):
        derive_channel_groups(build_detector("R18-FPN", "MODEL.MASK_ON", True))
    with pytest.raises(ValueError, match="GeneralizedRCNN"):
        derive_channel_groups(nn.Sequential(nn.Conv2d(3, 8, 3)))


def test_grouped_convolutions_are_not_prunable():
    model = build_detector("R50-FPN", "MODEL.RESNETS.NUM_GROUPS", 4, "MODEL.RESNETS.WIDTH_PER_GROUP", 8)
    groups = derive_channel_groups(model, allow_frozen=True)
    assert not groups["backbone.bottom_up.res3.0.conv1"].prunable
    assert "grouped convolution (groups=4)" in groups["backbone.bottom_up.res3.0.conv2"].reason
    assert groups["backbone.bottom_up.res3.stream"].prunable


@pytest.mark.parametrize(
    "args, expected",
    [
        ((256, 0.5), 128),
        ((256, 0.7), 80),  # keep 76.8 -> nearest multiple of 8
        ((100, 0.5), 48),  # 50 -> 48
        ((256, 0.0), 256),
        ((256, 1.0), 8),  # floor
        ((12, 0.5), 8),  # 6 -> floor 8
        ((6, 0.8), 6),  # fewer than the floor: nothing to prune
        ((256, 0.7, 8, 8, 32), 64),  # GroupNorm(32): nearest multiple of lcm(8, 32)
        ((64, 0.9, 8, 8, 32), 32),  # floor rounds up to the channel multiple
    ],
)
def test_kept_count(args, expected):
    """``kept_count(current, ratio)``: channels kept when pruning the fraction ``ratio``."""
    assert kept_count(*args) == expected


def test_kept_count_relaxes_multiple_but_not_channel_multiple():
    assert kept_count(20, 0.5, multiple=16, floor=4) == 16
    assert kept_count(12, 0.5, multiple=16, floor=4) == 6  # no multiple of 16 fits: granularity relaxed
    assert kept_count(40, 0.8, multiple=1, floor=1, channel_multiple=4) == 8
    for current in range(1, 300, 7):
        for ratio in (0.0, 0.1, 0.37, 0.5, 0.9, 1.0):
            count = kept_count(current, ratio, multiple=8, floor=8, channel_multiple=1)
            assert min(8, current) <= count <= current
    with pytest.raises(ValueError):
        kept_count(64, 1.5)


def test_format_groups_lists_every_group():
    model = build_detector("R18-FPN")
    groups = derive_channel_groups(model)
    table = format_groups(groups).splitlines()
    assert table[0].split()[:3] == ["group", "scope", "size"]
    assert len(table) == len(groups) + 1
    row = next(line for line in table if line.startswith("backbone.fpn.out "))
    assert row.split()[1:3] == ["fpn", "256"] and row.rstrip().endswith("yes")
    frozen = next(line for line in table if line.startswith("backbone.bottom_up.res2.stream "))
    assert "no: touches frozen parameter" in frozen
