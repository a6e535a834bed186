"""An RPN that decodes only the anchors its test-time selection can keep.

detectron2's ``RPN`` decodes the predicted deltas of every anchor of every level (about 16k
anchors at 256x256, 160k at 800x800) and then keeps, per level, the ``PRE_NMS_TOPK_TEST``
highest objectness scores (at most 500 to 1000): most of the decoding is thrown away. On a
2-core CPU, decoding only the kept anchors saves about 2 ms of the RPN of a synthetic R18-FPN at
800x800 (1-3% of the model); at 256x256 the saving is within timing noise. :class:`SelectThenDecodeRPN` picks the
same anchors (the same descending sort of each level's scores), decodes only those and hands
them to detectron2's own ``find_top_rpn_proposals`` (clip, small boxes dropped, per-level NMS,
``POST_NMS_TOPK_TEST`` kept).
Training is unchanged. Select it with ``MODEL.PROPOSAL_GENERATOR.NAME SelectThenDecodeRPN``: it
has the same parameters as ``RPN``, so checkpoints load either way.

Detections equal ``RPN``'s: the same boxes, scores and classes in the same order. Decoding a
subset runs the same arithmetic per anchor, but torch's vectorised ``exp`` may round the last
bit of a few values differently from its scalar tail, so coordinates can differ in the last
bit (the tests compare to 1e-4 pixels).
"""
from typing import List, Tuple

import torch
from detectron2.modeling.proposal_generator import PROPOSAL_GENERATOR_REGISTRY, RPN
from detectron2.modeling.proposal_generator.proposal_utils import find_top_rpn_proposals
from detectron2.structures import Boxes

__all__ = ["SelectThenDecodeRPN"]


@PROPOSAL_GENERATOR_REGISTRY.register()
class SelectThenDecodeRPN(RPN):
    """detectron2's ``RPN``; at test time only the anchors selected for NMS are decoded."""

    def predict_proposals(self, anchors: List[Boxes], pred_objectness_logits: List[torch.Tensor],
                          pred_anchor_deltas: List[torch.Tensor], image_sizes: List[Tuple[int, int]]):
        """Args as ``RPN.predict_proposals``: per level, anchors ``(Hi*Wi*A, 4)``, logits
        ``(N, Hi*Wi*A)`` and deltas ``(N, Hi*Wi*A, 4)``. Returns N ``Instances`` with
        ``proposal_boxes`` and ``objectness_logits``, highest score first."""
        if self.training or torch.jit.is_scripting() or torch.jit.is_tracing():
            return super().predict_proposals(anchors, pred_objectness_logits, pred_anchor_deltas, image_sizes)
        with torch.no_grad():
            boxes, scores = self._select_and_decode(anchors, pred_objectness_logits, pred_anchor_deltas)
            # the selected anchors, decoded, go through detectron2's own selection: it keeps them all
            # (each level holds at most pre_nms_topk) in the order given, then clips, drops small
            # boxes, runs per-level NMS and keeps post_nms_topk
            return find_top_rpn_proposals(boxes, scores, image_sizes, self.nms_thresh, self.pre_nms_topk[False],
                                          self.post_nms_topk[False], self.min_box_size, False)

    def _select_and_decode(self, anchors, logits, deltas):
        """``([boxes (N, k_l, 4)], [scores (N, k_l)])`` per level: its ``pre_nms_topk``
        best-scored anchors (``k_l`` of them), decoded, highest score first."""
        limit = self.pre_nms_topk[False]
        boxes, scores = [], []
        for anchors_l, logits_l, deltas_l in zip(anchors, logits, deltas):
            count = min(logits_l.shape[1], limit)
            # a full descending sort, as detectron2 does: the same anchors, in the same order
            ranked, order = logits_l.sort(descending=True, dim=1)
            chosen = order[:, :count]  # (N, count)
            images, box_dim = deltas_l.shape[0], deltas_l.shape[2]
            chosen_deltas = torch.gather(deltas_l, 1, chosen.unsqueeze(2).expand(-1, -1, box_dim))
            chosen_anchors = anchors_l.tensor[chosen]  # (N, count, box_dim)
            decoded = self.box2box_transform.apply_deltas(
                chosen_deltas.reshape(-1, box_dim), chosen_anchors.reshape(-1, box_dim))
            boxes.append(decoded.view(images, count, box_dim))
            scores.append(ranked[:, :count])
        return boxes, scores
