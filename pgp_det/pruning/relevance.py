"""Layer-wise relevance propagation (LRP) with the alpha-beta rule, for the ``frs`` criterion.

FRS (Aketi et al., "Gradual Channel Pruning while Training using Feature Relevance Scores for
Convolutional Neural Networks", arXiv 2002.09958) scores a channel by the LRP relevance that the
true class's output assigns to its feature map. :class:`AlphaBetaLRP` makes a model's backward
pass carry that relevance: inside its ``with`` block every ``nn.Conv2d`` / ``nn.Linear`` computes
its usual output, and ``propagate`` runs a modified backward pass from chosen outputs.

Convention: what flows backward through autograd is not the relevance ``R`` itself but
``g = R / a`` at every tensor ``a``, so that ``R = a * g``. With it every op without weights
(residual and FPN additions, nearest upsampling, max pooling, ROIAlign, flatten, index_put,
spatial means) needs no rule of its own: its ordinary gradient is the LRP z-rule. For a linear op
``z_j = sum_i w_ij x_i`` (fixed ``w``: the bilinear weights of ROIAlign, the 0/1 of a sum or an
upsample) the ordinary backward gives ``g_i = sum_j w_ij g_j``, hence::

    R_i = x_i * g_i = sum_j (w_ij x_i / z_j) R_j

relevance split in proportion to each input's contribution: a residual sum ``z = a + b`` gives
``a * R / z`` to ``a`` and ``b * R / z`` to ``b``; max pooling, whose contribution is the selected
input, gives all of ``R`` to it (winner takes all). ReLU passes relevance unchanged where it is
positive (where it is 0 the layer above gave no relevance anyway), in place or not.

Conv / linear layers (the alpha-beta rule, Bach et al. 2015; alpha = 2, beta = 1 as in the FRS
paper). For an output ``j`` with input contributions ``z_ij = x_i w_ij`` and bias ``b_j``::

    Z+_j = sum_i (z_ij)^+ + b_j^+          Z-_j = sum_i (z_ij)^- + b_j^-
    R_i  = sum_j ( alpha * (z_ij)^+ / Z+_j - beta * (z_ij)^- / Z-_j ) R_j

computed without materialising ``z_ij``: inputs and weights are split by sign
(``(z_ij)^+ = x+ w+ + x- w-``), ``Z+`` and ``Z-`` are two (or, with inputs of both signs, four)
convolutions, and ``R_i`` two (four) transposed convolutions of ``alpha R / Z+`` and
``beta R / Z-`` (``torch.nn.grad.conv2d_input``). Relevance is conserved layer to layer,
``sum_i R_i = (alpha - beta) sum_j R_j = sum_j R_j``, except for what the biases absorb (the
``b^+`` / ``b^-`` terms of the denominators) and for outputs with contributions of one sign only
(``Z+`` or ``Z-`` is 0: that share is dropped).

Norms. detectron2's ``Conv2d`` applies its ``norm`` (and ``activation``) inside its own forward,
so a per-module rule sees conv + norm as one layer. The norm is folded into the conv as the
affine map it is with its statistics held constant, ``y = s * conv(x) + t`` per output channel
(per image and channel for GroupNorm), i.e. weights ``s * W`` and bias ``s * b + t``, before the
rule is applied; a negative scale swaps the positive and negative contributions. Inside the
``with`` block BatchNorm / SyncBatchNorm run in eval mode (running statistics, as at inference):
then BN and FrozenBN are fixed affine maps, no running statistic moves and SyncBN needs no
collective. GroupNorm is folded with the statistics of the current input. A norm of another type
is passed through unchanged (``R`` at the conv output = ``R`` at the norm output, the rule
applied to the conv alone). An activation inside the module passes relevance through like ReLU.
Norm modules standalone in the graph (none in detectron2's R-CNNs) get their ordinary gradient,
which for a BN in eval mode is the z-rule of its affine map.

Why not the LRP library zennit: its rules are per-module hooks that re-run a module's forward with
modified parameters, which for detectron2's ``Conv2d`` would re-normalise the modified
convolution; its BN merging expects the norm as a separate module after the conv; and its
relevance-as-gradient convention duplicates relevance at residual sums unless the model is
rewritten with its own sum modules. The convention above needs none of that.
"""
import functools
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import FrozenBatchNorm2d

__all__ = ["AlphaBetaLRP"]

# R / Z is taken as 0 where |Z| is below this (no contribution of that sign)
_EPS = 1e-9

Recorder = Callable[[str, torch.Tensor], None]


def _norm_affine(norm: nn.Module, z: torch.Tensor):
    """``(scale, shift)`` with ``norm(z) = scale * z + shift`` (statistics held constant),
    broadcastable to ``z`` of shape ``(N, C, H, W)``; None for a norm of unknown type."""
    channels = z.shape[1]
    if isinstance(norm, FrozenBatchNorm2d) or (
        isinstance(norm, nn.modules.batchnorm._BatchNorm) and not norm.training and norm.running_mean is not None
    ):
        scale = (norm.running_var.float() + norm.eps).rsqrt()
        if getattr(norm, "weight", None) is not None:
            scale = scale * norm.weight.float()
        shift = -norm.running_mean.float() * scale
        if getattr(norm, "bias", None) is not None:
            shift = shift + norm.bias.float()
        return scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1)
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):  # no running statistics: batch statistics
        mean = z.mean(dim=(0, 2, 3))
        scale = (z.var(dim=(0, 2, 3), unbiased=False) + norm.eps).rsqrt()
        if norm.weight is not None:
            scale = scale * norm.weight
        shift = -mean * scale + (norm.bias if norm.bias is not None else 0.0)
        return scale.view(1, -1, 1, 1), shift.view(1, -1, 1, 1)
    if isinstance(norm, nn.GroupNorm):
        grouped = z.reshape(z.shape[0], norm.num_groups, -1)
        per_group = channels // norm.num_groups
        mean = grouped.mean(dim=2).repeat_interleave(per_group, dim=1)  # (N, C)
        inv = (grouped.var(dim=2, unbiased=False) + norm.eps).rsqrt().repeat_interleave(per_group, dim=1)
        scale = inv * norm.weight if norm.affine else inv
        shift = -mean * scale + (norm.bias if norm.affine else 0.0)
        return scale[:, :, None, None], shift[:, :, None, None]
    return None


class _Layer:
    """One conv / linear module under the rule: how to compute its pieces and its transposes."""

    def __init__(self, name: str, module: nn.Module, lrp: "AlphaBetaLRP") -> None:
        self.name = name
        self.module = module
        self.lrp = lrp
        self.is_conv = isinstance(module, nn.Conv2d)
        if self.is_conv and module.padding_mode != "zeros":
            raise ValueError(f"LRP: {name} uses padding_mode {module.padding_mode!r}; only 'zeros' is supported")

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        m = self.module
        if self.is_conv:
            return F.conv2d(x, weight, None, m.stride, m.padding, m.dilation, m.groups)
        return F.linear(x, weight)

    def transposed(self, shape: torch.Size, weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        m = self.module
        if self.is_conv:
            return torch.nn.grad.conv2d_input(shape, weight, grad, m.stride, m.padding, m.dilation, m.groups)
        return grad @ weight

    def forward(self, x: torch.Tensor):
        """``(output, fold)``: the module's usual output and ``(scale, shift, y_lin)`` of the
        affine map after the bare linear op (``scale`` None: 1; ``y_lin`` kept only when the norm
        is passed through unfolded)."""
        m = self.module
        bias = m.bias
        z = self.linear(x, m.weight)
        if bias is not None:
            z = z + (bias.view(1, -1, 1, 1) if self.is_conv else bias)
        norm = getattr(m, "norm", None) if self.is_conv else None
        activation = getattr(m, "activation", None) if self.is_conv else None
        scale, y_lin = None, None
        shift = None if bias is None else (bias.view(1, -1, 1, 1) if self.is_conv else bias)
        out = z
        if norm is not None:
            out = norm(z)
            affine = _norm_affine(norm, z)
            if affine is None:
                y_lin = out.clone()  # passed through: the rule sees the conv alone
            else:
                scale, norm_shift = affine
                shift = norm_shift if bias is None else scale * bias.view(1, -1, 1, 1) + norm_shift
        if activation is not None:
            out = activation(out)
        return out, (scale, shift, y_lin)


class _AlphaBeta(torch.autograd.Function):
    """Forward: the module's output. Backward: ``g_out`` (= R / output) -> ``g_in`` (= R_in / x)."""

    @staticmethod
    def forward(ctx, x, anchor, layer: _Layer):
        out, (scale, shift, y_lin) = layer.forward(x)
        ctx.layer = layer
        ctx.fold = (scale, shift, y_lin)
        ctx.cache = None
        ctx.save_for_backward(x)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        layer, lrp = ctx.layer, ctx.layer.lrp
        if ctx.cache is None:  # once per forward; further passes over the same graph reuse it
            ctx.cache = _AlphaBeta._prepare(ctx)
            ctx.fold = None
        output, up, vp, nonneg, w_pos, w_neg = ctx.cache
        if output is not None:
            lrp._record(layer.name, output * grad_out)
        if up is None:
            return None, None, None
        (x,) = ctx.saved_tensors
        u, v = grad_out * up, grad_out * vp
        grad_pos = layer.transposed(x.shape, w_pos, u) + layer.transposed(x.shape, w_neg, v)
        if nonneg:
            return grad_pos, None, None
        grad_neg = layer.transposed(x.shape, w_neg, u) + layer.transposed(x.shape, w_pos, v)
        return torch.where(x >= 0, grad_pos, grad_neg), None, None

    @staticmethod
    def _prepare(ctx):
        """``(output or None, U * output, V * output, input >= 0 everywhere, W+, W-)``, where the
        rule's transposed-convolution inputs are ``u = g * U * output`` (to ``W+``) and
        ``v = g * V * output`` (to ``W-``) for the incoming ``g = R / output``::

            U = s+ alpha / Z+ - s- beta / Z-      V = s- alpha / Z+ - s+ beta / Z-

        ``s+`` / ``s-`` the positive / negative part of the folded norm's scale (1 / 0 without
        one). The output is kept only for a layer whose relevance is reported."""
        (x,) = ctx.saved_tensors
        layer, lrp = ctx.layer, ctx.layer.lrp
        scale, shift, y_lin = ctx.fold
        weight = layer.module.weight.detach()
        w_pos, w_neg = weight.clamp(min=0), weight.clamp(max=0)
        need_input = ctx.needs_input_grad[0]
        nonneg = bool((x >= 0).all())
        if nonneg:
            pos, neg = layer.linear(x, w_pos), layer.linear(x, w_neg)
        else:
            xp, xn = x.clamp(min=0), x.clamp(max=0)
            pos = layer.linear(xp, w_pos) + layer.linear(xn, w_neg)
            neg = layer.linear(xp, w_neg) + layer.linear(xn, w_pos)
        if scale is not None:  # folded norm: a negative scale swaps the two
            s_pos, s_neg = scale.clamp(min=0), scale.clamp(max=0)
            pos, neg = s_pos * pos + s_neg * neg, s_pos * neg + s_neg * pos
        if shift is not None:
            pos, neg = pos + shift.clamp(min=0), neg + shift.clamp(max=0)
        output = pos + neg if y_lin is None else y_lin
        activation = getattr(layer.module, "activation", None) if layer.is_conv else None
        if activation is not None:
            output = activation(output)
        up = vp = None
        if need_input:
            inv_pos = torch.where(pos > _EPS, lrp.alpha / pos.clamp(min=_EPS), 0.0)
            inv_neg = torch.where(neg < -_EPS, lrp.beta / neg.clamp(max=-_EPS), 0.0)
            if scale is None:
                up, vp = inv_pos, -inv_neg
            else:
                up, vp = s_pos * inv_pos - s_neg * inv_neg, s_neg * inv_pos - s_pos * inv_neg
            up, vp = up * output, vp * output
        return (output if lrp._reports(layer.name) else None), up, vp, nonneg, w_pos, w_neg


class AlphaBetaLRP:
    """Run a model so that its backward pass carries alpha-beta LRP relevance (module docstring).

    Inside ``with AlphaBetaLRP(model) as lrp:`` every ``nn.Conv2d`` / ``nn.Linear`` of ``model``
    (detectron2's ``Conv2d`` with its norm and activation included) computes its usual output
    through a function whose backward applies the rule, BatchNorms run in eval mode, and nothing
    is accumulated into any parameter's ``.grad``. Forward the model (with grad enabled), then call
    :meth:`propagate` once per explanation; each call reports the relevance at the output of every
    rule layer it reaches to ``on_relevance(name, R)``, ``R`` of the layer's output shape
    (``(N, C, H, W)`` for convs, ``(rows, C)`` for linear layers; a layer called several times,
    e.g. once per FPN level, reports each call). Leaving the block restores the modules.

    Args:
        model: the network (not a DDP wrapper).
        alpha, beta: the rule's weights; ``alpha - beta = 1`` conserves relevance.
        on_relevance: callback ``(module name, relevance at its output)``.
        report: the module names ``on_relevance`` is called for (None: every rule layer); the
            others keep less in memory.
    """

    def __init__(self, model: nn.Module, alpha: float = 2.0, beta: float = 1.0,
                 on_relevance: Optional[Recorder] = None, report: Optional[Iterable[str]] = None) -> None:
        if not alpha - beta == 1.0 or beta < 0:
            raise ValueError(f"LRP alpha-beta needs alpha - beta = 1 and beta >= 0, got alpha={alpha}, beta={beta}")
        self.model = model
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.on_relevance = on_relevance
        self.report = None if report is None else set(report)
        self._layers: Dict[str, _Layer] = {}
        self._modes: List = []
        self._anchor: Optional[torch.Tensor] = None

    def __enter__(self) -> "AlphaBetaLRP":
        try:
            for name, module in self.model.named_modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    if "forward" in module.__dict__:
                        raise ValueError(f"LRP: {name} already has an instance-level forward")
                    layer = _Layer(name, module, self)
                    module.forward = functools.partial(self._forward, layer)
                    self._layers[name] = layer
                elif isinstance(module, nn.modules.batchnorm._BatchNorm):
                    self._modes.append((module, module.training))
                    module.eval()
        except Exception:
            self.__exit__()
            raise
        # every rule output depends on this leaf, so relevance also flows from layers whose
        # input needs no gradient (the first conv), and propagate() has a target to ask for
        self._anchor = torch.zeros((), requires_grad=True)
        return self

    def __exit__(self, *exc) -> None:
        for layer in self._layers.values():
            del layer.module.forward
        for module, training in self._modes:
            module.train(training)
        self._layers, self._modes, self._anchor = {}, [], None

    def _forward(self, layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        return _AlphaBeta.apply(x, self._anchor, layer)

    def _reports(self, name: str) -> bool:
        return self.on_relevance is not None and (self.report is None or name in self.report)

    def _record(self, name: str, relevance: torch.Tensor) -> None:
        self.on_relevance(name, relevance.detach())

    def propagate(self, outputs: Sequence[torch.Tensor], relevance: Sequence[torch.Tensor],
                  stop_at: Optional[Sequence[torch.Tensor]] = None) -> Optional[List[torch.Tensor]]:
        """One backward pass from ``outputs`` (tensors computed inside the block) that start with
        relevance ``relevance`` (same shapes; e.g. 1 at the true class's logit, 0 elsewhere).

        A start where the output is exactly 0 carries no relevance (``R = a * g`` with ``a = 0``).
        The graph is kept, so several explanations can be propagated from one forward pass.

        Args:
            stop_at: tensors at which to stop (nothing before them is visited; layers between
                them and ``outputs`` still report); their relevance is returned. None: go back
                to the model's input.

        Returns:
            the relevance at each ``stop_at`` tensor (``a * g``), or None.
        """
        if self._anchor is None:
            raise RuntimeError("AlphaBetaLRP.propagate must be called inside its with block")
        grads = []
        for out, rel in zip(outputs, relevance):
            rel = rel.to(out.dtype)
            grads.append(torch.where(out != 0, rel / torch.where(out != 0, out, 1.0), 0.0).detach())
        targets = list(stop_at) if stop_at is not None else [self._anchor]
        found = torch.autograd.grad(list(outputs), targets, grads, retain_graph=True, allow_unused=True)
        if stop_at is None:
            return None
        return [t.detach() * (g if g is not None else 0.0) for t, g in zip(targets, found)]
