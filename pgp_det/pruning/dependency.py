"""Derive the channel groups of a built detectron2 ``GeneralizedRCNN`` by walking its modules.

Every feature tensor the model computes gets a *channel space*; layers write into spaces
(producers) and read from them (consumers). Two spaces become one group when their channels must
share an index set:

* an identity shortcut adds a block's input to its output (``x + f(x)``);
* FPN sums lateral outputs top-down, so all lateral outputs and output-conv inputs are one space;
  its output convs feed heads that are shared across levels, so all levels are one space too
  (P6 is a max-pool of P5 and has P5's channels);
* a layer applied to several features (the RPN head on every level, the ROI pooler) needs one
  index set for its input.

Along the way each consuming layer gets a :class:`~pgp_det.pruning.groups.ChannelSource` per
feature map it reads: which producers' outputs are summed (with identity shortcuts and FPN's
top-down path), which activation follows (ReLU in ResNet blocks, the stem, the RPN conv and the
box head; none after FPN convs), and whether ROIAlign lies in between.

Supported: ``ResNet`` (``BasicStem``, ``BasicBlock``, ``BottleneckBlock``), ``FPN`` with
``LastLevelMaxPool`` or no top block, ``RPN`` with ``StandardRPNHead``, ``StandardROIHeads`` with
``FastRCNNConvFCHead`` and ``Res5ROIHeads``, each with ``FastRCNNOutputLayers``, and the domain
classifiers of ``pgp_det.modeling.DomainAdaptiveRCNN`` (consumers of the backbone's outputs and of
the box head's). Anything else
holding parameters raises ``ValueError`` rather than being silently left out of a group.
"""
import dataclasses
import math
from collections import OrderedDict
from typing import Dict, Iterable, List, NamedTuple, Optional, Tuple

import torch.nn.functional as F
from torch import nn

from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling.backbone.fpn import FPN, LastLevelMaxPool
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, BottleneckBlock, ResNet
from detectron2.modeling.meta_arch import GeneralizedRCNN
from detectron2.modeling.proposal_generator.rpn import RPN, StandardRPNHead
from detectron2.modeling.roi_heads import Res5ROIHeads, StandardROIHeads
from detectron2.modeling.roi_heads.box_head import FastRCNNConvFCHead
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers

from .groups import (
    ROLE_BIAS, ROLE_FILTER, ROLE_INPUT, ROLE_NORM, ChannelCount, ChannelGroup, ChannelSlice, ChannelSource,
)

__all__ = ["derive_channel_groups", "prediction_layers"]

_BATCH_NORMS = (nn.modules.batchnorm._BatchNorm,)  # BatchNorm2d, SyncBatchNorm, NaiveSyncBatchNorm


class _Space:
    """A channel space under construction; spaces merge union-find style."""

    def __init__(self, name: str, scope: Optional[str], order: int):
        self.name = name
        self.scope = scope
        self.order = order
        self.parent: Optional["_Space"] = None
        self.producers: List[ChannelSlice] = []
        self.consumers: List[ChannelSlice] = []
        self.counts: List[ChannelCount] = []
        self.producer_layers: List[str] = []
        self.consumer_layers: List[str] = []
        self.channel_multiple = 1
        self.blockers: List[str] = []  # structural reasons the space cannot be pruned
        self.sources: Dict[str, Tuple[ChannelSource, ...]] = {}  # consumer layer -> what it reads


class _Feature(NamedTuple):
    """A feature map during the walk: its channel space and how its values arise."""

    space: _Space
    sources: Tuple[ChannelSource, ...]  # one per way the map's values arise (usually one)


class _ChannelGraph:
    """Records which layers write and read which channel spaces of one model."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._names = {module: name for name, module in model.named_modules()}
        self.spaces: List[_Space] = []
        self.visited = set()  # names of modules whose tensors are accounted for
        self.prediction_layers: List[str] = []

    def name(self, module: nn.Module) -> str:
        return self._names[module]

    def new_space(self, name: str, scope: Optional[str]) -> _Space:
        space = _Space(name, scope, len(self.spaces))
        self.spaces.append(space)
        return space

    @staticmethod
    def find(space: _Space) -> _Space:
        while space.parent is not None:
            space = space.parent
        return space

    def merge(self, keep: _Space, other: _Space) -> _Space:
        """Make ``other`` part of ``keep``'s space (``keep`` gives the name and scope)."""
        keep, other = self.find(keep), self.find(other)
        if keep is other:
            return keep
        for attr in ("producers", "consumers", "counts", "producer_layers", "consumer_layers", "blockers"):
            getattr(keep, attr).extend(getattr(other, attr))
        keep.sources.update(other.sources)
        keep.channel_multiple = math.lcm(keep.channel_multiple, other.channel_multiple)
        keep.order = min(keep.order, other.order)
        other.parent = keep
        return keep

    def merge_all(self, spaces: Iterable[_Space]) -> _Space:
        spaces = list(spaces)
        for other in spaces[1:]:
            self.merge(spaces[0], other)
        return self.find(spaces[0])

    def produce(self, space: _Space, layer: nn.Module) -> None:
        """``layer`` (a conv, with its ``.norm`` if any, or a linear) writes ``space``'s channels."""
        space = self.find(space)
        name = self.name(layer)
        self.visited.add(name)
        space.producer_layers.append(name)
        space.producers.append(ChannelSlice(name, "weight", 0, role=ROLE_FILTER))
        if layer.bias is not None:
            space.producers.append(ChannelSlice(name, "bias", 0, role=ROLE_BIAS))
        if isinstance(layer, nn.Conv2d):
            space.counts.append(ChannelCount(name, "out_channels"))
            self._check_groups(space, name, layer)
            norm = getattr(layer, "norm", None)  # detectron2's Conv2d applies its norm itself
            if norm is not None:
                self._produce_norm(space, f"{name}.norm", norm)
        else:
            space.counts.append(ChannelCount(name, "out_features"))

    def _produce_norm(self, space: _Space, name: str, norm: nn.Module) -> None:
        self.visited.add(name)
        if isinstance(norm, FrozenBatchNorm2d):
            tensors, count = ("weight", "bias", "running_mean", "running_var"), "num_features"
        elif isinstance(norm, _BATCH_NORMS):
            tensors = ("weight", "bias") if norm.affine else ()
            if norm.track_running_stats:
                tensors += ("running_mean", "running_var")
            count = "num_features"
        elif isinstance(norm, nn.GroupNorm):
            tensors, count = (("weight", "bias") if norm.affine else ()), "num_channels"
            # GroupNorm keeps num_groups; the kept count must stay divisible by it
            space.channel_multiple = math.lcm(space.channel_multiple, norm.num_groups)
        else:
            raise ValueError(f"cannot prune channels through norm {name} ({type(norm).__name__}); supported: BN, SyncBN, FrozenBN, GN")
        for tensor in tensors:
            pruned_value = 1.0 if tensor == "running_var" else 0.0
            space.producers.append(ChannelSlice(name, tensor, 0, pruned_value=pruned_value, role=ROLE_NORM))
        space.counts.append(ChannelCount(name, count))

    def consume(self, feature: _Feature, layer: nn.Module, expand: int = 1) -> None:
        """``layer`` reads ``feature``'s channels (``expand`` input columns each for a linear)."""
        space = self.find(feature.space)
        name = self.name(layer)
        self.visited.add(name)
        space.consumer_layers.append(name)
        space.consumers.append(ChannelSlice(name, "weight", 1, expand=expand, role=ROLE_INPUT))
        space.sources[name] = tuple(dict.fromkeys(feature.sources))  # distinct, in order
        if isinstance(layer, nn.Conv2d):
            space.counts.append(ChannelCount(name, "in_channels"))
            self._check_groups(space, name, layer)
        else:
            space.counts.append(ChannelCount(name, "in_features", expand=expand))

    def count(self, space: _Space, module: nn.Module, attribute: str, key=None) -> None:
        """``module.attribute[key]`` stores the channel count of ``space``."""
        self.find(space).counts.append(ChannelCount(self.name(module), attribute, key))

    def predicts(self, feature: _Feature, layer: nn.Module, expand: int = 1) -> None:
        """``layer`` reads ``feature``; its own outputs are predictions and never pruned."""
        self.consume(feature, layer, expand)
        self.prediction_layers.append(self.name(layer))

    @staticmethod
    def _check_groups(space: _Space, name: str, conv: nn.Conv2d) -> None:
        if conv.groups != 1:
            space.blockers.append(f"{name} is a grouped convolution (groups={conv.groups})")

    def groups(self, allow_frozen: bool) -> "OrderedDict[str, ChannelGroup]":
        """One group per space that some layer produces, ordered by first appearance."""
        roots, seen = [], set()
        for space in self.spaces:
            root = self.find(space)
            if root.producers and id(root) not in seen:
                seen.add(id(root))
                roots.append(root)
        roots.sort(key=lambda r: r.order)
        result = OrderedDict()
        for root in roots:
            if root.name in result:
                raise AssertionError(f"two channel groups are named {root.name}")
            result[root.name] = self._to_group(root, allow_frozen)
        return result

    def _to_group(self, space: _Space, allow_frozen: bool) -> ChannelGroup:
        first = space.producers[0]
        size = first.get(self.model).shape[first.dim]
        _check_consistent(self.model, space, size)
        reasons = list(space.blockers)
        if not allow_frozen:
            frozen = _frozen_tensors(self.model, space.producers + space.consumers)
            if frozen:
                reasons.append(
                    f"touches frozen parameter {frozen[0]} (MODEL.BACKBONE.FREEZE_AT); pass allow_frozen=True to prune it"
                )
        return ChannelGroup(
            name=space.name,
            scope=space.scope,
            size=size,
            producers=tuple(space.producers),
            consumers=tuple(space.consumers),
            counts=tuple(space.counts),
            producer_layers=tuple(space.producer_layers),
            consumer_layers=tuple(space.consumer_layers),
            channel_multiple=space.channel_multiple,
            prunable=not reasons,
            reason="; ".join(reasons),
            sources=dict(space.sources),
        )

    def check_coverage(self) -> None:
        """Every module holding weights must have been placed in the graph."""
        missed = [
            f"{name} ({type(module).__name__})"
            for name, module in self.model.named_modules()
            if name not in self.visited and _holds_weights(module)
        ]
        if missed:
            raise ValueError(
                "cannot derive channel groups: pgp_det does not know how channels flow through "
                + ", ".join(missed[:5])
                + (f" and {len(missed) - 5} more" if len(missed) > 5 else "")
            )


def _holds_weights(module: nn.Module) -> bool:
    return (
        any(True for _ in module.parameters(recurse=False))
        or isinstance(module, (FrozenBatchNorm2d, nn.Conv2d, nn.Linear) + _BATCH_NORMS)
    )


def _check_consistent(model: nn.Module, space: _Space, size: int) -> None:
    """Every slice and count must agree on the channel count (catches stale metadata)."""
    for piece in space.producers + space.consumers:
        length = piece.get(model).shape[piece.dim]
        expected = size * piece.expand
        module = model.get_submodule(piece.module)
        if piece.dim == 1 and isinstance(module, nn.Conv2d):
            expected //= module.groups  # a grouped conv's filters see in_channels / groups inputs
        if length != expected:
            raise AssertionError(f"{space.name}: {piece} has {length} entries, expected {expected}")
    for count in space.counts:
        value = count.read(model)
        if value != size * count.expand:
            raise AssertionError(f"{space.name}: {count} is {value}, expected {size} x {count.expand}")


def _frozen_tensors(model: nn.Module, slices: Iterable[ChannelSlice]) -> List[str]:
    frozen = []
    for piece in slices:
        tensor = piece.get(model)
        if isinstance(tensor, nn.Parameter) and not tensor.requires_grad:
            frozen.append(f"{piece.module}.{piece.tensor}")
    return frozen


# ---------------------------------------------------------------------------------------------
# Walkers: one per supported module type. Each takes the features its input lives in (channel
# space and sources) and returns the features of its outputs.


def _activation(module: nn.Module) -> Optional[str]:
    """The activation a detectron2 ``Conv2d`` applies after its norm: None, "relu" or "other"."""
    activation = getattr(module, "activation", None)
    if activation is None:
        return None
    if isinstance(activation, nn.ReLU) or activation in (F.relu, F.relu_):
        return "relu"
    return "other"


def _source(layers, activation: Optional[str] = None, plus: Optional[ChannelSource] = None, scale: float = 1.0):
    return ChannelSource(tuple(layers), plus=plus, scale=scale, activation=activation)


def _walk_backbone(graph: _ChannelGraph, backbone: nn.Module, image: _Feature) -> Dict[str, _Feature]:
    if isinstance(backbone, FPN):
        return _walk_fpn(graph, backbone, image)
    if isinstance(backbone, ResNet):
        return _walk_resnet(graph, backbone, image)
    raise ValueError(f"cannot derive channel groups for backbone {type(backbone).__name__}; supported: ResNet, FPN over ResNet")


def _walk_resnet(graph: _ChannelGraph, resnet: ResNet, image: _Feature) -> Dict[str, _Feature]:
    if not isinstance(resnet.stem, BasicStem):
        raise ValueError(f"cannot derive channel groups for stem {type(resnet.stem).__name__}")
    if resnet.num_classes is not None:
        raise ValueError("cannot derive channel groups for a ResNet with a classification layer")
    conv = resnet.stem.conv1
    graph.consume(image, conv)
    stem = graph.new_space(graph.name(resnet.stem), "backbone")
    graph.produce(stem, conv)
    graph.count(stem, resnet.stem, "out_channels")
    graph.count(stem, resnet, "_out_feature_channels", "stem")
    # BasicStem: conv (+ norm), relu, then a max-pool (which keeps a constant map constant)
    x = _Feature(stem, (_source([graph.name(conv)], activation="relu"),))
    features = {"stem": x}
    for stage_name, stage in zip(resnet.stage_names, resnet.stages):
        x = _walk_stage(graph, stage, x, "backbone")
        graph.count(x.space, resnet, "_out_feature_channels", stage_name)
        features[stage_name] = x
    return features


def _walk_stage(graph: _ChannelGraph, stage: nn.Sequential, x: _Feature, scope: str) -> _Feature:
    """A sequence of residual blocks; all block outputs of a stage form its residual stream.

    In detectron2's blocks every conv but the last is followed by a ReLU; the last conv's output
    is added to the shortcut (a projection conv, or the block's input) and the sum is ReLU'd.
    """
    stream_name = f"{graph.name(stage)}.stream"
    for block in stage:
        if type(block) not in (BasicBlock, BottleneckBlock):
            raise ValueError(f"cannot derive channel groups for block {graph.name(block)} ({type(block).__name__})")
        convs = [block.conv1, block.conv2] + ([block.conv3] if isinstance(block, BottleneckBlock) else [])
        graph.count(x.space, block, "in_channels")
        inner = x
        for conv in convs[:-1]:
            graph.consume(inner, conv)
            inner = _Feature(graph.new_space(graph.name(conv), scope), (_source([graph.name(conv)], "relu"),))
            graph.produce(inner.space, conv)
        graph.consume(inner, convs[-1])
        out = graph.new_space(stream_name, scope)
        graph.produce(out, convs[-1])
        graph.count(out, block, "out_channels")
        last = graph.name(convs[-1])
        if block.shortcut is not None:
            graph.consume(x, block.shortcut)
            graph.produce(out, block.shortcut)
            sources = (_source([last, graph.name(block.shortcut)], activation="relu"),)
        else:
            out = graph.merge(out, x.space)  # identity shortcut: input and output channels are the same
            sources = tuple(_source([last], plus=s, activation="relu") for s in x.sources)
        x = _Feature(out, sources)
    return _Feature(graph.find(x.space), x.sources)


def _walk_fpn(graph: _ChannelGraph, fpn: FPN, image: _Feature) -> Dict[str, _Feature]:
    bottom_up = _walk_backbone(graph, fpn.bottom_up, image)
    prefix = graph.name(fpn)
    inner = graph.new_space(f"{prefix}.fpn.inner", "fpn")
    out = graph.new_space(f"{prefix}.fpn.out", "fpn")
    # lateral_convs / output_convs are stored coarse-to-fine; in_features fine-to-coarse. The
    # top-down path adds each lateral output to the (nearest-)upsampled coarser sum.
    summed: Dict[str, ChannelSource] = {}  # output conv -> the top-down sum it reads
    top_down: Optional[ChannelSource] = None
    scale = 0.5 if getattr(fpn, "_fuse_type", "sum") == "avg" else 1.0
    for lateral, output in zip(fpn.lateral_convs, fpn.output_convs):
        if top_down is None:
            top_down = _source([graph.name(lateral)], activation=_activation(lateral))
        else:
            top_down = _source([graph.name(lateral)], plus=top_down, scale=scale)
        summed[graph.name(output)] = top_down
    level_sources: Dict[str, ChannelSource] = {}
    for feature, lateral, output in zip(fpn.in_features, fpn.lateral_convs[::-1], fpn.output_convs[::-1]):
        graph.consume(bottom_up[feature], lateral)
        graph.produce(inner, lateral)
        graph.consume(_Feature(inner, (summed[graph.name(output)],)), output)
        graph.produce(out, output)
        level_sources[graph.name(output)] = _source([graph.name(output)], activation=_activation(output))
    if fpn.top_block is not None and not isinstance(fpn.top_block, LastLevelMaxPool):
        raise ValueError(f"cannot derive channel groups for FPN top block {type(fpn.top_block).__name__}")
    # FPN's outputs, fine to coarse, are the output convs' results (then the top block's)
    by_level = [level_sources[graph.name(conv)] for conv in fpn.output_convs[::-1]]
    features = {}
    for index, name in enumerate(fpn._out_features):
        graph.count(out, fpn, "_out_feature_channels", name)
        if index >= len(by_level):  # LastLevelMaxPool: a stride-2 max-pool of its input level
            source = by_level[fpn._out_features.index(fpn.top_block.in_feature)]
        else:
            source = by_level[index]
        features[name] = _Feature(out, (source,))
    return features


def _walk_rpn(graph: _ChannelGraph, rpn: nn.Module, features: Dict[str, _Feature]) -> None:
    if not isinstance(rpn, RPN) or not isinstance(rpn.rpn_head, StandardRPNHead):
        raise ValueError(f"cannot derive channel groups for proposal generator {type(rpn).__name__}")
    head = rpn.rpn_head
    # the head is shared by all levels: one space, one source per level
    space = graph.merge_all(features[f].space for f in rpn.in_features)
    x = _Feature(space, tuple(s for f in rpn.in_features for s in features[f].sources))
    convs = list(head.conv) if isinstance(head.conv, nn.Sequential) else [head.conv]
    for conv in convs:
        graph.consume(x, conv)
        x = _Feature(graph.new_space(graph.name(conv), "rpn"), (_source([graph.name(conv)], _activation(conv)),))
        graph.produce(x.space, conv)
    graph.predicts(x, head.objectness_logits)
    graph.predicts(x, head.anchor_deltas)


def _pooled(graph: _ChannelGraph, features: Dict[str, _Feature], names) -> _Feature:
    """What a ROI pooler over levels ``names`` outputs: one space, ROIAlign samples of each level."""
    space = graph.merge_all(features[f].space for f in names)  # pooler mixes levels
    sources = tuple(dataclasses.replace(s, path="roi_align") for f in names for s in features[f].sources)
    return _Feature(space, sources)


def _walk_roi_heads(graph: _ChannelGraph, roi_heads: nn.Module, features: Dict[str, _Feature]) -> None:
    if isinstance(roi_heads, StandardROIHeads):
        if not isinstance(roi_heads.box_head, FastRCNNConvFCHead):
            raise ValueError(f"cannot derive channel groups for box head {type(roi_heads.box_head).__name__}")
        pooled = _pooled(graph, features, roi_heads.box_in_features)
        spatial = math.prod(roi_heads.box_pooler.output_size)
        x, per_channel = _walk_box_head(graph, roi_heads.box_head, pooled, spatial)
        _walk_box_predictor(graph, roi_heads.box_predictor, x, per_channel)
        # mask / keypoint heads (if any) hold weights that no walker visited: check_coverage reports them
        return x, per_channel
    if isinstance(roi_heads, Res5ROIHeads):
        pooled = _pooled(graph, features, roi_heads.in_features)
        x = _walk_stage(graph, roi_heads.res5, pooled, "roi_heads")
        # the predictor reads res5's output averaged over H, W: one input column per channel
        _walk_box_predictor(graph, roi_heads.box_predictor, x, 1)
        return None
    raise ValueError(f"cannot derive channel groups for ROI heads {type(roi_heads).__name__}")


def _walk_domain_classifiers(graph: _ChannelGraph, model: nn.Module, features: Dict[str, _Feature], box) -> None:
    """Domain-adaptive Faster R-CNN's classifiers (``model.domain_classifiers``, training only):
    the image-level one reads the backbone's output features (every level it is given: one
    space), the instance-level one the box head's output; their hidden layers are groups of scope
    ``"domain"``, which no pruning scope names."""
    heads = model.domain_classifiers
    if box is None:
        raise ValueError("cannot derive channel groups for domain classifiers without a box head (StandardROIHeads)")
    names = model.domain_image_in_features
    x = _Feature(graph.merge_all(features[f].space for f in names), tuple(s for f in names for s in features[f].sources))
    for first, logits, read, expand in ((heads.image_conv, heads.image_logits, x, 1),
                                        (heads.instance_fc, heads.instance_logits, box[0], box[1])):
        graph.consume(read, first, expand=expand)
        hidden = _Feature(graph.new_space(graph.name(first), "domain"), (_source([graph.name(first)], "relu"),))
        graph.produce(hidden.space, first)
        graph.predicts(hidden, logits)


def _walk_box_head(graph: _ChannelGraph, head: FastRCNNConvFCHead, x: _Feature, spatial: int):
    """Convs keep the pooled ``H x W``; the first linear reads ``C * H * W`` flattened inputs.

    Returns the output feature and the input columns per channel a reader of it sees
    (``H * W`` when the head ends with a conv, 1 after a linear).
    """
    per_channel = spatial
    children = list(head.children())
    for index, layer in enumerate(children):
        if isinstance(layer, nn.Conv2d):
            graph.consume(x, layer)
            activation = _activation(layer)  # detectron2 Conv2d: norm, then its activation
        elif isinstance(layer, nn.Linear):
            graph.consume(x, layer, expand=per_channel)
            per_channel = 1
            following = children[index + 1] if index + 1 < len(children) else None
            activation = "relu" if isinstance(following, nn.ReLU) else None  # fc, then fc_relu
        else:
            continue  # flatten, relu
        x = _Feature(graph.new_space(graph.name(layer), "roi_heads"), (_source([graph.name(layer)], activation),))
        graph.produce(x.space, layer)
    graph.count(x.space, head, "_output_size", 0 if isinstance(head._output_size, tuple) else None)
    return x, per_channel


def _walk_box_predictor(graph: _ChannelGraph, predictor: nn.Module, x: _Feature, per_channel: int) -> None:
    if type(predictor) is not FastRCNNOutputLayers:
        raise ValueError(f"cannot derive channel groups for box predictor {type(predictor).__name__}")
    graph.predicts(x, predictor.cls_score, per_channel)
    graph.predicts(x, predictor.bbox_pred, per_channel)


def _trace(model: nn.Module) -> _ChannelGraph:
    if not isinstance(model, GeneralizedRCNN):
        raise ValueError(
            f"derive_channel_groups expects a detectron2 GeneralizedRCNN (unwrap DistributedDataParallel first), got {type(model).__name__}"
        )
    graph = _ChannelGraph(model)
    image = graph.new_space("input", None)  # read by the stem, produced by no layer: never a group
    features = _walk_backbone(graph, model.backbone, _Feature(image, ()))
    if model.proposal_generator is not None:
        _walk_rpn(graph, model.proposal_generator, features)
    box = _walk_roi_heads(graph, model.roi_heads, features)
    if getattr(model, "domain_classifiers", None) is not None:
        _walk_domain_classifiers(graph, model, features, box)
    graph.check_coverage()
    return graph


def derive_channel_groups(model: nn.Module, allow_frozen: bool = False) -> "OrderedDict[str, ChannelGroup]":
    """All channel groups of ``model``, keyed by group name, in forward order.

    Args:
        model: a built detectron2 ``GeneralizedRCNN`` (Faster R-CNN, ResNet or ResNet-FPN).
        allow_frozen: when False, groups touching parameters with ``requires_grad=False``
            (stages frozen by ``MODEL.BACKBONE.FREEZE_AT``) are marked not prunable.

    The result reflects the model as it is now: after a hard prune, deriving again gives the
    same names with the new sizes.
    """
    return _trace(model).groups(allow_frozen)


def prediction_layers(model: nn.Module) -> List[str]:
    """Names of the layers whose outputs are the detector's predictions (never pruned):
    RPN objectness/anchor-delta convs and the box predictor's ``cls_score``/``bbox_pred``."""
    return list(_trace(model).prediction_layers)
