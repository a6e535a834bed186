"""What removing a channel would cost in training loss: per-channel values that compare across
groups, for the ``knapsack`` allocation (``PRUNING.ALLOCATION.KNAPSACK_VALUE``).

Removing channel ``c`` of a group sets every parameter that produces it to zero: the filter rows
of each producing conv/linear, their biases, and the scale and shift of the norms after them
(the ``"zero_path"`` soft mode does exactly that). To first order the training loss then changes
by ``d[c] = - sum_p sum_(entries e of c in p) p_e * dL/dp_e`` over those parameters ``p`` (the
group's producer slices of role filter, bias and norm that are trainable parameters; running
statistics and FrozenBN buffers have no gradient). Under a BatchNorm in training mode the filter
term vanishes (the norm makes the loss invariant to the filter's scale) and the norm's scale and
shift carry the estimate, as in Molchanov et al. (CVPR 2019), whose Taylor importance HALP uses.

:class:`LossChangeEstimate` accumulates ``d_t[c]`` over the training iterations ``t`` since the
last pruning step and gives, per channel:

``taylor``
    ``| sum_t d_t[c] | / T``: the first-order loss change, averaged over the ``T`` iterations
    (signed terms of different iterations cancel).
``taylor_squared``
    ``sum_t d_t[c]^2 / T``: the squared per-iteration estimate, averaged (Molchanov et al.'s
    importance, HALP's value): a variance-like measure that does not cancel.

Both are in one unit for every group (loss, or loss squared), so sums over channels of different
layers compare: a group that matters little to the loss is cheap to cut, one that matters much is
not, whatever the criterion that ranks channels inside each group.
"""
from collections import OrderedDict
from typing import Dict, Mapping, Optional

import torch
import torch.distributed as dist
from detectron2.utils import comm
from torch import nn

from ..utils.modules import unwrap_model
from .groups import ROLE_INPUT, ChannelGroup, PruningRequestError

__all__ = ["KNAPSACK_VALUES", "LossChangeEstimate"]

# PRUNING.ALLOCATION.KNAPSACK_VALUE: "scores" values channels by the criterion's own (normalised) scores
KNAPSACK_VALUES = ("taylor", "taylor_squared", "scores")


class LossChangeEstimate:
    """Accumulates the first-order loss change of removing each channel (module docstring).

    Life cycle, as a criterion's: :meth:`attach` at the start of training and after every pruning
    step (which restarts the sums), :meth:`update` after every optimizer step (reads ``.grad``),
    :meth:`values` at a pruning step, :meth:`state_dict` / :meth:`load_state_dict` for resuming.

    Args:
        kind: ``"taylor"`` or ``"taylor_squared"``.
    """

    def __init__(self, kind: str = "taylor") -> None:
        if kind not in ("taylor", "taylor_squared"):
            raise PruningRequestError(f"loss-change value must be 'taylor' or 'taylor_squared', got {kind!r}")
        self.kind = kind
        self._model: Optional[nn.Module] = None
        self._groups: "OrderedDict[str, ChannelGroup]" = OrderedDict()
        # flat over the groups' channels, on the model's device: sum_t d_t and sum_t d_t^2, and
        # the iterations added (a tensor, so that an update never waits for the device)
        self._signed = self._squared = self._count = torch.zeros(0)

    def attach(self, model: nn.Module, groups: Mapping[str, ChannelGroup]) -> None:
        """Start from zero on ``groups`` (the prunable ones are kept) of ``model``."""
        self._model = unwrap_model(model)
        self._groups = OrderedDict((n, g) for n, g in groups.items() if g.prunable)
        device = next(self._model.parameters()).device
        size = sum(g.size for g in self._groups.values())
        self._signed = torch.zeros(size, device=device)
        self._squared = torch.zeros(size, device=device)
        self._count = torch.zeros((), device=device)

    @property
    def num_updates(self) -> int:
        """Iterations added since :meth:`attach` (reading it waits for the device)."""
        return int(self._count.item())

    def _split(self, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        return OrderedDict(zip(self._groups, flat.split([g.size for g in self._groups.values()])))

    def _change(self, group: ChannelGroup) -> torch.Tensor:
        """This iteration's ``d[c]`` of ``group``, float32 ``(C,)`` on the model's device."""
        change = torch.zeros(group.size, device=self._signed.device)
        for piece in group.producers:
            if piece.role == ROLE_INPUT:
                continue
            tensor = piece.get(self._model)
            if not isinstance(tensor, nn.Parameter) or tensor.grad is None:
                continue  # running statistics, frozen norms, unused layers
            if tensor.shape[piece.dim] != group.size * piece.expand:
                raise PruningRequestError(
                    f"loss-change estimate: {piece} has {tensor.shape[piece.dim]} entries for a group of {group.size} "
                    "channels; attach again after pruning")
            # a row-wise dot product: no weight-sized temporary on the training step's path
            weights, grads = piece.per_channel(tensor.detach()), piece.per_channel(tensor.grad.detach())
            change -= torch.einsum("ck,ck->c", weights, grads).float()
        return change

    def update(self, model: nn.Module = None) -> None:
        """Add this iteration's estimate (call after the optimizer step, before ``.grad`` is
        cleared). An iteration with a non-finite estimate (a skipped AMP step) adds nothing;
        nothing here waits for the device."""
        if self._model is None:
            raise PruningRequestError("loss-change estimate is not attached; call attach(model, groups) first")
        if not self._groups:
            return
        change = torch.cat([self._change(group) for group in self._groups.values()])
        finite = torch.isfinite(change).all()
        change = torch.where(finite, change, 0.0)
        self._signed += change
        self._squared += change * change
        self._count += finite

    def values(self) -> Dict[str, torch.Tensor]:
        """``{group: float32 CPU (C,)}`` value of each channel (``kind``), >= 0, summed over
        processes under distributed training (every process must call it). All zero before the
        first update."""
        if not self._groups:
            return OrderedDict()
        both = torch.cat([self._signed if self.kind == "taylor" else self._squared, self._count.reshape(1)])
        if comm.get_world_size() > 1:
            both = both.clone()
            dist.all_reduce(both)
        flat, count = both[:-1], max(float(both[-1]), 1.0)
        if self.kind == "taylor":
            flat = flat.abs()
        return self._split((flat / count).cpu())

    def state_dict(self) -> dict:
        return {"kind": self.kind, "num_updates": self.num_updates,
                "signed": {n: t.cpu().clone() for n, t in self._split(self._signed).items()},
                "squared": {n: t.cpu().clone() for n, t in self._split(self._squared).items()}}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict` (after :meth:`attach` to groups of the saved sizes)."""
        if state.get("kind") != self.kind:
            raise PruningRequestError(f"cannot load a {state.get('kind')!r} loss-change estimate into a {self.kind!r} one")
        for key, flat in (("signed", self._signed), ("squared", self._squared)):
            saved, target = state[key], self._split(flat)
            if set(saved) != set(target):
                raise PruningRequestError("loss-change estimate: the saved groups are not the attached ones")
            for name, tensor in saved.items():
                if tensor.shape != target[name].shape:
                    raise PruningRequestError(f"loss-change estimate: group {name} was saved with {tensor.numel()} "
                                              f"channels, the model has {target[name].numel()}")
                target[name].copy_(tensor)
        self._count.fill_(int(state["num_updates"]))
