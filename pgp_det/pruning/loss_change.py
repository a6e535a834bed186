"""What removing a channel would cost in training loss: per-channel values that compare across
groups, for the ``knapsack`` allocation (``PRUNING.KNAPSACK_VALUE``).

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
from torch import nn

from ..utils.modules import unwrap_model
from .groups import ROLE_INPUT, ChannelGroup, PruningRequestError

__all__ = ["KNAPSACK_VALUES", "LossChangeEstimate"]

# PRUNING.KNAPSACK_VALUE: "scores" values channels by the criterion's own (normalised) scores
KNAPSACK_VALUES = ("taylor", "taylor_squared", "scores")


def _distributed_world() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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
        self._signed: Dict[str, torch.Tensor] = OrderedDict()  # sum_t d_t, (C,) per group
        self._squared: Dict[str, torch.Tensor] = OrderedDict()  # sum_t d_t^2
        self.num_updates = 0

    def attach(self, model: nn.Module, groups: Mapping[str, ChannelGroup]) -> None:
        """Start from zero on ``groups`` (the prunable ones are kept) of ``model``."""
        self._model = unwrap_model(model)
        self._groups = OrderedDict((n, g) for n, g in groups.items() if g.prunable)
        self._signed = OrderedDict((n, torch.zeros(g.size, dtype=torch.float64)) for n, g in self._groups.items())
        self._squared = OrderedDict((n, torch.zeros(g.size, dtype=torch.float64)) for n, g in self._groups.items())
        self.num_updates = 0

    def _change(self, group: ChannelGroup) -> torch.Tensor:
        """This iteration's ``d[c]`` of ``group``, float64 ``(C,)`` on the CPU."""
        change = torch.zeros(group.size, dtype=torch.float64)
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
            product = piece.per_channel(tensor.detach() * tensor.grad.detach())
            change -= product.sum(dim=1).double().cpu()
        return change

    def update(self, model: nn.Module = None) -> None:
        """Add this iteration's estimate (call after the optimizer step, before ``.grad`` is
        cleared). An iteration with a non-finite estimate (a skipped AMP step) adds nothing."""
        if self._model is None:
            raise PruningRequestError("loss-change estimate is not attached; call attach(model, groups) first")
        changes = OrderedDict((name, self._change(group)) for name, group in self._groups.items())
        if not all(torch.isfinite(c).all() for c in changes.values()):
            return
        for name, change in changes.items():
            self._signed[name] += change
            self._squared[name] += change * change
        self.num_updates += 1

    def values(self) -> Dict[str, torch.Tensor]:
        """``{group: float32 (C,)}`` value of each channel (``kind``), >= 0, summed over
        processes under distributed training (every process must call it). All zero before the
        first update."""
        sums = self._signed if self.kind == "taylor" else self._squared
        names = list(sums)
        if not names:
            return OrderedDict()
        flat = torch.cat([sums[n] for n in names])
        updates = torch.tensor([float(self.num_updates)], dtype=torch.float64)
        if _distributed_world():
            both = torch.cat([flat, updates])
            dist.all_reduce(both)
            flat, updates = both[:-1], both[-1:]
        count = max(float(updates), 1.0)
        if self.kind == "taylor":
            flat = flat.abs()
        flat = (flat / count).float()
        return OrderedDict(zip(names, flat.split([sums[n].numel() for n in names])))

    def state_dict(self) -> dict:
        return {"kind": self.kind, "num_updates": self.num_updates,
                "signed": {n: t.clone() for n, t in self._signed.items()},
                "squared": {n: t.clone() for n, t in self._squared.items()}}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict` (after :meth:`attach` to groups of the saved sizes)."""
        if state.get("kind") != self.kind:
            raise PruningRequestError(f"cannot load a {state.get('kind')!r} loss-change estimate into a {self.kind!r} one")
        for key, target in (("signed", self._signed), ("squared", self._squared)):
            saved = state[key]
            if set(saved) != set(target):
                raise PruningRequestError("loss-change estimate: the saved groups are not the attached ones")
            for name, tensor in saved.items():
                if tensor.shape != target[name].shape:
                    raise PruningRequestError(f"loss-change estimate: group {name} was saved with {tensor.numel()} "
                                              f"channels, the model has {target[name].numel()}")
                target[name].copy_(tensor)
        self.num_updates = int(state["num_updates"])
