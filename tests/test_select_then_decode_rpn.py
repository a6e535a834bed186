"""SelectThenDecodeRPN: the same detections as detectron2's RPN, from the same weights, at test
time (it only decodes fewer anchors); checkpoints load into either."""
import os

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model

import pgp_det.modeling  # noqa: F401  (registers SelectThenDecodeRPN)
from pgp_det.config import get_pgp_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def detector(name, *extra):
    cfg = get_pgp_cfg()
    cfg.merge_from_file(os.path.join(ROOT, "configs", "synthetic", "faster_rcnn_R_18_FPN_synth.yaml"))
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.PROPOSAL_GENERATOR.NAME", name,
                         "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", *extra])
    torch.manual_seed(0)
    return build_model(cfg).eval()


def images(count, height, width):
    generator = np.random.default_rng(3)
    result = []
    for _ in range(count):
        image = generator.integers(0, 256, size=(3, height, width), dtype=np.uint8)
        image[:, height // 4: height // 2, width // 3: width // 2] = 255  # a bright object
        result.append({"image": torch.as_tensor(image), "height": height, "width": width})
    return result


@pytest.mark.parametrize("extra", [[], ["MODEL.RPN.PRE_NMS_TOPK_TEST", "40", "MODEL.RPN.POST_NMS_TOPK_TEST", "30"]])
def test_detections_equal_detectron2_rpn(extra):
    reference = detector("RPN", *extra)
    fast = detector("SelectThenDecodeRPN", *extra)
    fast.load_state_dict(reference.state_dict())  # the same parameters, the same names
    assert type(fast.proposal_generator).__name__ == "SelectThenDecodeRPN"
    with torch.no_grad():
        for inputs in images(3, 160, 224):
            expected_proposals = reference.proposal_generator(
                reference.preprocess_image([inputs]), reference.backbone(reference.preprocess_image([inputs]).tensor))[0]
            got_proposals = fast.proposal_generator(
                fast.preprocess_image([inputs]), fast.backbone(fast.preprocess_image([inputs]).tensor))[0]
            assert len(got_proposals[0]) == len(expected_proposals[0]) > 0
            torch.testing.assert_close(got_proposals[0].proposal_boxes.tensor,
                                       expected_proposals[0].proposal_boxes.tensor, rtol=0, atol=1e-4)
            torch.testing.assert_close(got_proposals[0].objectness_logits, expected_proposals[0].objectness_logits,
                                       rtol=0, atol=0)
            expected = reference([inputs])[0]["instances"]
            got = fast([inputs])[0]["instances"]
            assert len(got) == len(expected) > 0
            assert torch.equal(got.pred_classes, expected.pred_classes)
            torch.testing.assert_close(got.pred_boxes.tensor, expected.pred_boxes.tensor, rtol=0, atol=1e-4)
            torch.testing.assert_close(got.scores, expected.scores, rtol=0, atol=1e-6)


def test_training_is_detectron2s():
    """In training the proposals (and so the losses' inputs) come from detectron2's own path."""
    reference = detector("RPN")
    fast = detector("SelectThenDecodeRPN")
    fast.load_state_dict(reference.state_dict())
    reference.train()
    fast.train()
    inputs = images(1, 160, 224)[0]
    with torch.no_grad():
        for model in (reference, fast):
            model.proposal_generator.training = True
        features = reference.backbone(reference.preprocess_image([inputs]).tensor)
        image_list = reference.preprocess_image([inputs])
        from detectron2.structures import Boxes, Instances
        from detectron2.utils.events import EventStorage

        gt = Instances((160, 224), gt_boxes=Boxes(torch.tensor([[56.0, 40.0, 112.0, 80.0]])),
                       gt_classes=torch.tensor([0]))
        with EventStorage(0):
            torch.manual_seed(1)  # the anchors sampled for the losses
            expected, expected_losses = reference.proposal_generator(image_list, features, [gt])
            torch.manual_seed(1)
            got, got_losses = fast.proposal_generator(image_list, features, [gt])
    assert torch.equal(got[0].proposal_boxes.tensor, expected[0].proposal_boxes.tensor)
    assert got_losses.keys() == expected_losses.keys()
    for key in expected_losses:
        assert torch.equal(got_losses[key], expected_losses[key]), key
