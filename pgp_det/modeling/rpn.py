"""An RPN that decodes only the anchors its test-time selection can keep.

detectron2's ``RPN`` decodes the predicted deltas of every anchor of every level (about 16k
anchors at 256x256, 160k at 800x800) and then keeps, per level, the ``PRE_NMS_TOPK_TEST``
highest objectness scores (at most 500 to 1000): most of the decoding is thrown away. On a CPU
that is about 1 ms of a 25 ms pruned R18-FPN at 256x256. :class:`SelectThenDecodeRPN` picks the
same anchors (the same descending sort of each level's scores) and decodes only those, then
clips, drops small boxes, runs per-level NMS and keeps ``POST_NMS_TOPK_TEST`` as detectron2 does.
Training is unchanged. Select it with ``MODEL.PROPOSAL_GENERATOR.NAME SelectThenDecodeRPN``: it
has the same parameters as ``RPN``, so checkpoints load either way.

Detections equal ``RPN``'s: the same boxes, scores and classes in the same order. Decoding a
subset runs the same arithmetic per anchor, but torch's vectorised ``exp`` may round the last
bit of a few values differently from its scalar tail, so coordinates can differ in the last
bit (the tests compare to 1e-4 pixels).
"""
from typing import List, Tuple

import torch
from detectron2.layers import batched_nms, cat
from detectron2.modeling.proposal_generator import PROPOSAL_GENERATOR_REGISTRY, RPN
from detectron2.structures import Boxes, Instances

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
            boxes, scores, levels = self._select_and_decode(anchors, pred_objectness_logits, pred_anchor_deltas)
            return [self._proposals_of_image(boxes[i], scores[i], levels, size) for i, size in enumerate(image_sizes)]

    def _select_and_decode(self, anchors, logits, deltas):
        """``(boxes (N, K, 4), scores (N, K), level of each of the K)``: every level's
        ``pre_nms_topk`` best-scored anchors, decoded, levels concatenated."""
        limit = self.pre_nms_topk[False]
        boxes, scores, levels = [], [], []
        for level, (anchors_l, logits_l, deltas_l) in enumerate(zip(anchors, logits, deltas)):
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
            levels.append(torch.full((count,), level, dtype=torch.int64, device=logits_l.device))
        return cat(boxes, dim=1), cat(scores, dim=1), cat(levels, dim=0)

    def _proposals_of_image(self, boxes: torch.Tensor, scores: torch.Tensor, levels: torch.Tensor,
                            image_size: Tuple[int, int]) -> Instances:
        """One image's proposals: finite ones, clipped, above ``min_box_size``, per-level NMS,
        the ``post_nms_topk`` best."""
        finite = torch.isfinite(boxes).all(dim=1) & torch.isfinite(scores)
        if not bool(finite.all()):
            boxes, scores, levels = boxes[finite], scores[finite], levels[finite]
        boxes = Boxes(boxes)
        boxes.clip(image_size)
        large = boxes.nonempty(threshold=self.min_box_size)
        if int(large.sum()) != len(boxes):
            boxes, scores, levels = boxes[large], scores[large], levels[large]
        keep = batched_nms(boxes.tensor, scores, levels, self.nms_thresh)[: self.post_nms_topk[False]]
        result = Instances(image_size)
        result.proposal_boxes = boxes[keep]
        result.objectness_logits = scores[keep]
        return result
