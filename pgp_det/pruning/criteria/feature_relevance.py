"""FRS's criterion: alpha-beta LRP relevance of every channel from the true class, over an
extra pass (:mod:`pgp_det.pruning.relevance` propagates it)."""
from collections import OrderedDict
from typing import Any, Dict, Iterable

import torch
from torch import nn

from detectron2.utils.events import EventStorage

from ...utils.modules import unwrap_model
from ..groups import PruningRequestError
from ..relevance import AlphaBetaLRP
from .base import _AccumulatingCriterion, _Key, _Sums
from .gradient import _extra_pass_batches


class FeatureRelevanceCriterion(_AccumulatingCriterion):
    """FRS (Aketi et al., arXiv 2002.09958): alpha-beta LRP relevance from the true class.

    :meth:`run_extra_pass` runs ``N`` training batches (``PRUNING.CRITERION.EXTRA_PASS_BATCHES``) right
    before each pruning step, without optimizer steps and without touching ``.grad``. Per batch:

    1. one training-mode forward of the detector under :class:`~.relevance.AlphaBetaLRP` (RPN
       proposals, ``label_and_sample_proposals`` and the losses as in training; BatchNorms with
       their running statistics, which are left unchanged);
    2. per ground-truth class ``k`` present among the sampled foreground proposals
       (``gt_classes < num_classes``), one backward pass starting with relevance 1 at the class-k
       logit (``box_predictor.cls_score``) of each class-k foreground proposal, 0 elsewhere.
       Relevance is linear in its start, so a backward pass per class is what separates the
       classes in the backbone and FPN maps, which every proposal of an image shares;
    3. the relevance at each producer layer's output, ``(N, C, H, W)`` -> spatial mean -> summed
       over images (convs; once per FPN level a layer runs on) or ``(proposals, C)`` summed over
       proposals (fc layers), is added to that layer's class-k row, and ``n_k`` counts class-k
       proposals.

    Scores: ``s_l[c] = | mean_{k: n_k > 0} sum_k[c] / n_k |`` (every class counts equally,
    whatever its frequency), L2-normalised per producer layer; groups are compared as they are by
    the ``global`` allocation. The relevance starts at 1 rather than at the logit's value (the
    LRP convention of Bach et al.): early in training a true-class logit may be negative, which
    would flip the sign of that proposal's whole explanation and cancel others in the class mean.

    Where relevance cannot pass exactly, and what is done instead:

    * the RPN head is not on the path from the class logit: proposals are boxes, decoded from the
      anchor deltas and filtered by NMS without gradient (anchors, box decoding, top-k and NMS
      pass nothing). The RPN head's producers are scored by the same rule from the RPN's own
      true class: one more backward pass starting with 1 at the objectness logit of every
      foreground anchor (label 1 from ``label_and_sample_anchors``), stopped at the RPN head's
      input so that the backbone and FPN scores stay those of the class logit. Its row (the
      last, ``k = num_classes``) is added to the class mean of the other rows
      (``s_l = |mean_k| + |R_obj / n_obj|``); only RPN-head layers have one;
    * the box regression branch (``bbox_pred``) and the losses pass nothing: relevance is
      explained from the class logit only;
    * proposals sampled as background (``gt_classes == num_classes``) start no relevance;
    * a FPN level (or any layer) that no proposal of the batch reaches gets no relevance there,
      a group with none at all scores 0 everywhere (its channels tie);
    * norms: folded into their conv (BN, SyncBN, FrozenBN with running statistics, GN with the
      input's statistics); a norm of another type is passed through unchanged. Non-ReLU
      activations inside a conv are passed through as ReLU is. See :mod:`~.relevance`.

    Cost per batch: one forward; in the first backward pass, two convolutions per layer for
    ``Z+`` / ``Z-``; per class present, one backward pass with two transposed convolutions per
    layer (four for each where a layer's input has both signs: FPN output convs, ``fc1``), about
    the FLOPs of an ordinary backward; plus the small RPN pass. On R18-FPN (synthetic, 4 images
    at 256x352, 6 classes present, one CPU thread) 5 to 7 s per batch against about 1 s for a
    training step. Memory: each layer's input, and from the first backward on two tensors of its
    output's size (three for producer layers) until the batch is done.

    Only detectron2 R-CNNs with one ``box_predictor`` (``StandardROIHeads``, ``Res5ROIHeads``)
    are supported; :meth:`attach` fails clearly on other models. The state (sums and counts) is
    saved like the other accumulators; a hard prune resets it (the extra pass runs right before
    each pruning step, which consumes it).
    """

    name = "frs"
    needs_extra_pass = True
    layer_normalisation = "l2"
    global_normalisation = "none"
    _COUNTS = ("frs_proposals_per_class", "counts")  # key of the (num_classes + 1,) counts in the sums

    def __init__(self, alpha: float = 2.0, beta: float = 1.0) -> None:
        super().__init__()
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.num_classes = 0
        self._layer_keys: Dict[str, _Key] = {}
        self._source = 0

    def _on_attach(self) -> None:
        roi_heads = getattr(self._model, "roi_heads", None)
        if not (hasattr(roi_heads, "box_predictor") and hasattr(roi_heads, "label_and_sample_proposals")):
            raise PruningRequestError(
                "criterion frs needs a detectron2 R-CNN (roi_heads with a box_predictor); got "
                f"{type(self._model).__name__}"
            )
        self.num_classes = int(roi_heads.num_classes)
        pending, self._pending_state = self._pending_state, None
        super()._on_attach()
        shapes = OrderedDict(self._sums.shapes)
        shapes[self._COUNTS] = torch.Size([self.num_classes + 1])
        self._sums = _Sums(shapes, self._sums.flat.device)
        self._layer_keys = {key[1]: key for key in self._modules}
        if pending is not None:
            self.load_state_dict(pending)

    def _sum_shape(self, module):
        return torch.Size([self.num_classes + 1, module.weight.shape[0]])

    def _layer_scores(self, model):
        summed = self._sums.summed_over_processes()
        counts = summed[self._COUNTS]
        seen = counts[: self.num_classes] > 0
        result = OrderedDict()
        for name, group in self._groups.items():
            vectors = []
            for layer in group.producer_layers:
                rows = summed[(name, layer)]
                score = torch.zeros(rows.shape[1], dtype=torch.float32, device=rows.device)
                if seen.any():
                    per_class = rows[: self.num_classes][seen] / counts[: self.num_classes][seen, None]
                    score = per_class.mean(dim=0).abs()
                if counts[-1] > 0:
                    score = score + (rows[-1] / counts[-1]).abs()
                vectors.append(score)
            result[name] = vectors
        return result

    def after_hard_prune(self, groups, removals):
        """Resets instead of slicing, as ``pgp_pass`` does."""
        self._require_attached()
        self.attach(self._model, groups)

    def _record(self, layer: str, relevance: torch.Tensor) -> None:
        """``on_relevance`` of the LRP pass: add a producer layer's relevance to the current row."""
        key = self._layer_keys.get(layer)
        if key is None:
            return
        values = relevance.float()
        if values.dim() > 2:
            values = values.flatten(2).mean(dim=2)  # (N, C): spatial mean per image
        values = values.sum(dim=0)
        row = self._sums.views[key][self._source]
        row.add_(torch.where(torch.isfinite(values).all(), values, 0.0))

    def run_extra_pass(self, model: nn.Module, data_iter: Iterable, num_batches: int) -> None:
        """Add the relevance of ``num_batches`` training batches (see the class docstring).

        Weights, buffers, ``.grad`` and train/eval modes are as before afterwards. Each batch is
        what a detectron2 training data loader yields (its images without ``instances`` are left
        out: they have no true class); losses are logged into a private
        ``EventStorage``. With a DDP-wrapped ``model`` every process must run the same number of
        batches (the passes themselves communicate nothing).
        """
        self._require_attached()
        batches = _extra_pass_batches(data_iter, num_batches)
        inner = unwrap_model(model)
        saved_buffers = [(b, b.detach().clone()) for b in inner.buffers()]
        modes = [(m, m.training) for m in inner.modules()]
        try:
            inner.train()
            for batch in batches:
                # relevance flows from each image's true classes: images without labels (the
                # target domain's, in domain adaptation) have none to explain
                batch = [inputs for inputs in batch if "instances" in inputs]
                if not batch:
                    continue
                lrp = AlphaBetaLRP(inner, self.alpha, self.beta, on_relevance=self._record, report=self._layer_keys)
                with torch.enable_grad(), lrp:
                    self._explain_batch(inner, batch, lrp)
                self.num_updates += 1
        finally:
            with torch.no_grad():
                for buffer, value in saved_buffers:
                    buffer.copy_(value)
            for module, training in modes:
                module.training = training

    def _explain_batch(self, model: nn.Module, batch, lrp) -> None:
        """Forward ``batch`` once, then the per-class backward passes and the RPN's."""
        roi_heads = model.roi_heads
        rpn = getattr(model, "proposal_generator", None)
        captured: Dict[str, Any] = {}

        def capturing(name, method):
            def run(*args, **kwargs):
                captured[name] = method(*args, **kwargs)
                return captured[name]
            return run

        # what training computes anyway: the sampled proposals (with gt_classes) and the logits;
        # the RPN's anchor labels, its head's input and objectness logits
        wrapped = [(roi_heads, "label_and_sample_proposals")]
        handles = [roi_heads.box_predictor.register_forward_hook(
            lambda module, inputs, out: captured.update(logits=out[0]))]
        if hasattr(rpn, "rpn_head") and hasattr(rpn, "label_and_sample_anchors"):
            wrapped.append((rpn, "label_and_sample_anchors"))
            handles.append(rpn.rpn_head.register_forward_hook(
                lambda module, inputs, out: captured.update(rpn_input=list(inputs[0]), objectness=list(out[0]))))
        for owner, name in wrapped:
            setattr(owner, name, capturing(name, getattr(owner, name)))  # shadows the method
        try:
            with EventStorage(0):
                model(batch)
        finally:
            for handle in handles:
                handle.remove()
            for owner, name in wrapped:
                delattr(owner, name)

        counts = self._sums.views[self._COUNTS]
        logits = captured["logits"]
        classes = torch.cat([p.gt_classes for p in captured["label_and_sample_proposals"]]).to(logits.device)
        foreground = (classes >= 0) & (classes < self.num_classes)
        for k in torch.unique(classes[foreground]).tolist():
            rows = torch.nonzero(foreground & (classes == k)).squeeze(1)
            start = torch.zeros_like(logits)
            start[rows, k] = 1.0
            self._source = k
            lrp.propagate([logits], [start])
            counts[k] += rows.numel()

        if "label_and_sample_anchors" in captured:
            labels = torch.stack(captured["label_and_sample_anchors"][0])  # (N, anchors over levels)
            starts, offset = [], 0
            for level in captured["objectness"]:  # (N, A, H, W); labels are ordered (H, W, A)
                n, a, h, w = level.shape
                part = labels[:, offset: offset + h * w * a].reshape(n, h, w, a).permute(0, 3, 1, 2)
                starts.append((part == 1).to(level.dtype))
                offset += h * w * a
            positives = int(sum(s.sum() for s in starts))
            if positives:
                self._source = self.num_classes
                lrp.propagate(captured["objectness"], starts, stop_at=captured["rpn_input"])
                counts[self.num_classes] += positives
