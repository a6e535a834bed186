"""Folding frozen and evaluated batch norms into their convolutions for deployment
(:func:`pgp_det.modeling.fold_norms`): same detections, no norm left where one could be folded."""
import os

import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from torch import nn

from pgp_det.config import load_config
from pgp_det.modeling import fold_norms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "synthetic", "faster_rcnn_R_18_FPN_synth.yaml")


def detector(norm):
    cfg = load_config(CONFIG, ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.RESNETS.NORM", norm,
                               "MODEL.BACKBONE.FREEZE_AT", "0"])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():  # statistics as training leaves them, not the identity
        if isinstance(module, (FrozenBatchNorm2d, nn.BatchNorm2d)):
            size = module.num_features
            module.weight.data = torch.rand(size, generator=generator) + 0.5
            module.bias.data = torch.randn(size, generator=generator) * 0.2
            module.running_mean.data = torch.randn(size, generator=generator) * 0.2
            module.running_var.data = torch.rand(size, generator=generator) + 0.5
    return model


def detections(model, image):
    with torch.no_grad():
        instances = model([{"image": image, "height": 128, "width": 160}])[0]["instances"]
    return instances.pred_boxes.tensor, instances.scores, instances.pred_classes


@pytest.mark.parametrize("norm", ["FrozenBN", "BN"])
def test_folded_detector_detects_the_same_boxes(norm):
    model = detector(norm)
    image = torch.rand(3, 128, 160, generator=torch.Generator().manual_seed(2)) * 255
    before = detections(model, image)
    convs_with_norm = [n for n, m in model.named_modules()
                       if isinstance(getattr(m, "norm", None), (FrozenBatchNorm2d, nn.BatchNorm2d))]
    folded = fold_norms(model)
    assert folded == convs_with_norm and len(folded) == 20  # R18: stem + 8 blocks x 2 + 3 shortcuts
    assert not any(isinstance(m, (FrozenBatchNorm2d, nn.BatchNorm2d)) for m in model.modules())
    after = detections(model, image)
    assert len(before[1]) > 0 and len(after[1]) == len(before[1])
    # float32 rounding through 20 convolutions: hundredths of a pixel, scores to 1e-4
    for (b, a), tolerance in zip(zip(before, after), (0.02, 1e-4, 0)):
        assert (a.float() - b.float()).abs().max() <= tolerance


def test_batch_norms_in_training_mode_stay():
    model = detector("BN").train()
    assert fold_norms(model) == []
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 20
