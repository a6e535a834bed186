"""Domain-adaptive Faster R-CNN (Chen et al., "Domain Adaptive Faster R-CNN for Object Detection
in the Wild", CVPR 2018) as a detectron2 meta-architecture.

A training batch holds labelled source images and unlabelled target images (``"domain"`` 0 and 1
in each input dict, :mod:`pgp_det.data.domains`). The detection losses (RPN and box head) are
computed on the source images only. Two domain classifiers learn to tell the domains apart, each
behind a gradient reversal layer (identity forward, gradient times ``-lambda`` backward), so the
features they read are pushed to be domain-invariant:

* image level: a 1x1-conv classifier on every level of the backbone's output features (shared by
  the levels, as the RPN head is), one source/target logit per location, binary cross-entropy
  averaged over locations;
* instance level: a two-layer classifier on the box head's output for each image's first
  ``INSTANCE_ROIS`` proposals (the RPN's, for target images run as at test time), binary
  cross-entropy per ROI;
* consistency: the squared difference between an image's mean image-level probability and each
  of its ROIs' instance-level probabilities. The classifiers descend it. What the features get
  from it is ``DOMAIN_ADAPTATION.CONSISTENCY_GRADIENT``: ``"reversed"``, its gradient times
  ``-lambda`` (it is computed from the reversed features, as the two classifiers' losses are), or
  ``"scaled"``, its gradient times ``+lambda`` (it is computed again from the features behind a
  gradient scale of ``+lambda``), so that the features are pulled towards predictions that agree,
  as the public PyTorch port of the authors' method does it. The paper leaves this open.

The classifiers are training-only: inference is :class:`GeneralizedRCNN`'s, and
:meth:`DomainAdaptiveRCNN.detector` gives the plain detector (same modules) to evaluate, time or
export. Their first layers consume the backbone's output channels and the box head's output
channels, so :func:`pgp_det.pruning.derive_channel_groups` puts them in those channel groups (as
consumers: hard pruning shrinks their inputs); their hidden layers are groups of scope
``"domain"``, which no pruning scope names.
"""
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import Conv2d
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.structures import ImageList

from ..data.domains import CONSISTENCY_GRADIENTS, SOURCE, TARGET

__all__ = ["DomainAdaptiveRCNN", "DomainClassifiers", "GradientScale", "grad_reverse",
           "grad_scale"]


class GradientScale(torch.autograd.Function):
    """Identity forward; the gradient times ``factor`` backward."""

    @staticmethod
    def forward(ctx, x, factor: float):
        ctx.factor = float(factor)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.factor * grad, None


def grad_reverse(x: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
    """``x`` behind a gradient reversal layer of strength ``weight``: the gradient times ``-weight``."""
    return GradientScale.apply(x, -weight)


def grad_scale(x: torch.Tensor, weight: float) -> torch.Tensor:
    """``x`` behind a gradient scale of ``weight`` (the gradient keeps its sign)."""
    return GradientScale.apply(x, weight)


class DomainClassifiers(nn.Module):
    """The image-level and instance-level domain classifiers.

    Args:
        feature_channels: channels of the backbone features the image-level classifier reads.
        instance_dim: width of the box head's output the instance-level classifier reads.
        hidden: width of both classifiers' hidden layer.
    """

    def __init__(self, feature_channels: int, instance_dim: int, hidden: int = 256):
        super().__init__()
        self.image_conv = Conv2d(feature_channels, hidden, kernel_size=1, activation=F.relu)
        self.image_logits = nn.Conv2d(hidden, 1, kernel_size=1)
        self.instance_fc = nn.Linear(instance_dim, hidden)
        self.instance_logits = nn.Linear(hidden, 1)
        # hidden layers keep torch's default (fan-in scaled) init; only the logit layers start small.
        # With every layer at std 0.01 the classifiers' gradients are products of two tiny weights:
        # from scratch they stayed at chance (loss ln 2) for the whole 300-iteration schedule
        for layer in (self.image_logits, self.instance_logits):
            nn.init.normal_(layer.weight, std=0.01)
            nn.init.zeros_(layer.bias)

    def image(self, feature: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) features -> (N, 1, H, W) domain logits (target = 1)."""
        return self.image_logits(self.image_conv(feature))

    def instance(self, features: torch.Tensor) -> torch.Tensor:
        """(R, D) box-head features -> (R,) domain logits."""
        return self.instance_logits(F.relu(self.instance_fc(features))).squeeze(1)


@META_ARCH_REGISTRY.register()
class DomainAdaptiveRCNN(GeneralizedRCNN):
    """:class:`GeneralizedRCNN` trained on source and target images at once (see the module
    docstring); ``MODEL.META_ARCHITECTURE "DomainAdaptiveRCNN"`` with ``DOMAIN_ADAPTATION.*``."""

    @configurable
    def __init__(self, *, domain_classifiers: DomainClassifiers, image_in_features: Sequence[str],
                 reversal_weight: float, image_weight: float, instance_weight: float, consistency_weight: float,
                 instance_rois: int, consistency_gradient: str = "reversed", **kwargs):
        super().__init__(**kwargs)
        if consistency_gradient not in CONSISTENCY_GRADIENTS:
            raise ValueError(f"consistency_gradient {consistency_gradient!r}: one of {CONSISTENCY_GRADIENTS}")
        self.consistency_gradient = consistency_gradient
        self.domain_classifiers = domain_classifiers
        self.domain_image_in_features = list(image_in_features)
        self.reversal_weight = reversal_weight
        self.loss_weights = {"loss_da_image": image_weight, "loss_da_instance": instance_weight,
                             "loss_da_consistency": consistency_weight}
        self.instance_rois = instance_rois

    @classmethod
    def from_config(cls, cfg):
        args = super().from_config(cfg)
        da = cfg.DOMAIN_ADAPTATION
        shapes = args["backbone"].output_shape()
        in_features = list(da.IMAGE_IN_FEATURES) or list(shapes)
        missing = [f for f in in_features if f not in shapes]
        if missing:
            raise ValueError(f"DOMAIN_ADAPTATION.IMAGE_IN_FEATURES names {missing}, which the backbone does not "
                             f"output (it outputs {list(shapes)})")
        channels = {shapes[f].channels for f in in_features}
        if len(channels) != 1:
            raise ValueError(f"DOMAIN_ADAPTATION.IMAGE_IN_FEATURES {in_features} have different channel counts "
                             f"{sorted(channels)}: the image-level classifier is shared by the levels")
        box_head = getattr(args["roi_heads"], "box_head", None)
        if box_head is None:
            raise ValueError("DomainAdaptiveRCNN needs ROI heads with a box head (StandardROIHeads)")
        args.update(
            domain_classifiers=DomainClassifiers(channels.pop(), box_head.output_shape.channels, da.HIDDEN_DIM),
            image_in_features=in_features, reversal_weight=da.REVERSAL_WEIGHT, image_weight=da.IMAGE_WEIGHT,
            instance_weight=da.INSTANCE_WEIGHT, consistency_weight=da.CONSISTENCY_WEIGHT,
            instance_rois=da.INSTANCE_ROIS_PER_IMAGE, consistency_gradient=da.CONSISTENCY_GRADIENT,
        )
        return args

    def detector(self) -> GeneralizedRCNN:
        """The plain detector (the same modules, without the domain classifiers): what is
        evaluated, timed and exported."""
        plain = GeneralizedRCNN(backbone=self.backbone, proposal_generator=self.proposal_generator,
                                roi_heads=self.roi_heads, pixel_mean=self.pixel_mean.flatten().tolist(),
                                pixel_std=self.pixel_std.flatten().tolist(),
                                input_format=self.input_format, vis_period=0)
        return plain.train(self.training)

    def forward(self, batched_inputs: List[Dict]):
        if not self.training:
            return self.inference(batched_inputs)
        source = [x for x in batched_inputs if x.get("domain", SOURCE) == SOURCE]
        target = [x for x in batched_inputs if x.get("domain", SOURCE) == TARGET]
        if not target:
            return super().forward(source)
        if not source:
            raise ValueError("a domain-adaptive batch needs source images (the detection losses are computed on them)")
        images = self.preprocess_image(source + target)
        features = self.backbone(images.tensor)
        n = len(source)
        source_images = ImageList(images.tensor[:n], images.image_sizes[:n])
        target_images = ImageList(images.tensor[n:], images.image_sizes[n:])
        source_features = {k: v[:n] for k, v in features.items()}
        target_features = {k: v[n:] for k, v in features.items()}
        gt_instances = [x["instances"].to(self.device) for x in source]  # target images carry no labels

        proposals, losses = self.proposal_generator(source_images, source_features, gt_instances)
        _, detector_losses = self.roi_heads(source_images, source_features, proposals, gt_instances)
        losses.update(detector_losses)
        with torch.no_grad():  # the target images' proposals, as the RPN makes them at test time
            self.proposal_generator.eval()
            try:
                target_proposals, _ = self.proposal_generator(target_images, target_features, None)
            finally:
                self.proposal_generator.train()
        domains = torch.tensor([SOURCE] * n + [TARGET] * len(target), dtype=torch.float32, device=self.device)
        losses.update(self._domain_losses(features, proposals + target_proposals, domains))
        return losses

    def _domain_losses(self, features: Dict[str, torch.Tensor], proposals, domains: torch.Tensor):
        """The three adaptation losses, weighted; ``proposals`` per image in batch order,
        ``domains``: (N,) 0 (source) or 1 (target)."""
        heads, weight = self.domain_classifiers, self.reversal_weight
        levels = [features[name] for name in self.domain_image_in_features]
        image_logits = [heads.image(grad_reverse(level, weight)) for level in levels]  # each (N, 1, H, W)
        image_loss = torch.stack([F.binary_cross_entropy_with_logits(logits, domains.view(-1, 1, 1, 1).expand_as(logits))
                                  for logits in image_logits]).mean()

        boxes = [p.proposal_boxes[: self.instance_rois] for p in proposals]
        counts = [len(b) for b in boxes]
        pooled = self.roi_heads.box_pooler([features[f] for f in self.roi_heads.box_in_features], boxes)
        instance = self.roi_heads.box_head(pooled)
        instance_logits = heads.instance(grad_reverse(instance, weight))  # (R,)
        per_roi = torch.repeat_interleave(torch.arange(len(counts), device=instance_logits.device),
                                          torch.tensor(counts, device=instance_logits.device))
        if self.consistency_gradient == "scaled":  # the same classifiers, on features that keep the gradient's sign
            image_logits = [heads.image(grad_scale(level, weight)) for level in levels]
            consistency_logits = heads.instance(grad_scale(instance, weight))
        else:
            consistency_logits = instance_logits
        # (N,): each image's image-level probability, over levels and locations
        image_prob = torch.stack([torch.sigmoid(logits).flatten(1).mean(1) for logits in image_logits]).mean(0)
        losses = {
            "loss_da_image": image_loss,
            "loss_da_instance": F.binary_cross_entropy_with_logits(instance_logits, domains[per_roi])
            if len(instance_logits) else instance_logits.sum(),
            "loss_da_consistency": ((image_prob[per_roi] - torch.sigmoid(consistency_logits)) ** 2).mean()
            if len(instance_logits) else instance_logits.sum(),
        }
        return {k: v * self.loss_weights[k] for k, v in losses.items()}
