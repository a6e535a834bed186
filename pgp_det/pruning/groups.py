"""Channel groups: sets of coupled channels that are pruned with one shared index set.

A :class:`ChannelGroup` of size ``C`` names every tensor axis that carries its ``C`` channels:

* producers (:class:`ChannelSlice` with the channels on the output axis): conv/linear weight dim 0
  (role ``"filter"``) and bias (``"bias"``), and the tensors of the norm that follows the conv
  (``"norm"``: scale, shift, running statistics);
* consumers (channels on the input axis, role ``"input"``): conv weight dim 1, linear weight dim 1
  (``expand`` columns per channel when the linear reads a flattened ``(C, H, W)`` map);
* counts (:class:`ChannelCount`): module attributes that store the channel count and must follow
  it (``out_channels``, ``num_features``, ``_out_feature_channels[...]``, ...);
* sources (:class:`ChannelSource`): for each consuming layer, how the values it reads arise from
  the producers (sums, identity shortcuts, activation, ROIAlign). Soft pruning decides what to
  zero by slice role; hard pruning uses the sources to fold the constant output of a zeroed
  channel into its consumers (:mod:`pgp_det.pruning.fold`).

Everything is addressed by qualified module name, so the records stay valid while surgery swaps
the tensors they point to. Groups are derived by :func:`pgp_det.pruning.dependency.derive_channel_groups`.
"""
import math
from dataclasses import dataclass, field
from typing import Hashable, Iterable, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from ..errors import PruningRequestError

__all__ = [
    "SCOPES", "ROLE_FILTER", "ROLE_BIAS", "ROLE_NORM", "ROLE_INPUT", "ChannelSlice", "ChannelCount",
    "ChannelSource", "ChannelGroup", "PruningRequestError", "kept_count", "format_groups",
]

SCOPES = ("backbone", "fpn", "rpn", "roi_heads")

# what a ChannelSlice is to its channels
ROLE_FILTER = "filter"  # conv/linear weight rows that compute the channel (output axis)
ROLE_BIAS = "bias"  # the bias of that conv/linear
ROLE_NORM = "norm"  # a tensor of the norm after the conv: scale, shift, running mean or variance
ROLE_INPUT = "input"  # a consumer's weight columns that read the channel (input axis)
_ROLES = (ROLE_FILTER, ROLE_BIAS, ROLE_NORM, ROLE_INPUT)


@dataclass(frozen=True)
class ChannelSlice:
    """One tensor axis that carries a group's channels.

    Attributes:
        module: qualified name of the module owning the tensor (``model.get_submodule(module)``).
        tensor: name of the parameter or buffer on that module (``weight``, ``running_var``, ...).
        dim: the axis indexed by the group's channels.
        expand: consecutive entries per channel along ``dim``: 1 for convs and norms; ``H * W``
            for a linear layer reading a flattened ``(C, H, W)`` map (channel ``c`` owns columns
            ``c * expand .. c * expand + expand - 1``).
        pruned_value: the value written when a channel's whole output is zeroed (soft pruning
            mode ``"zero_path"``): 0; 1 for ``running_var`` so the statistic stays a valid variance.
        role: what the slice is to its channels: ``"filter"`` (conv/linear weight rows computing
            them), ``"bias"`` (that layer's bias), ``"norm"`` (scale, shift or running statistic
            of the norm after the layer), ``"input"`` (a consumer's weight columns). Soft
            pruning zeroes ``"filter"`` slices and keeps the others, which carry the gradient
            back to a zeroed filter. When not given it is inferred from ``dim`` and ``tensor``
            (``dim != 0``: input; ``bias``: bias; running statistics: norm; else filter), so a
            norm's ``weight``/``bias`` written by hand must say ``role="norm"``;
            :func:`~pgp_det.pruning.dependency.derive_channel_groups` always does.
    """

    module: str
    tensor: str
    dim: int
    expand: int = 1
    pruned_value: float = 0.0
    role: str = ""

    def __post_init__(self):
        role = self.role
        if not role:
            if self.dim != 0:
                role = ROLE_INPUT
            elif self.tensor == "bias":
                role = ROLE_BIAS
            elif self.tensor in ("running_mean", "running_var"):
                role = ROLE_NORM
            else:
                role = ROLE_FILTER
            object.__setattr__(self, "role", role)  # frozen dataclass
        if role not in _ROLES:
            raise ValueError(f"ChannelSlice role must be one of {_ROLES}, got {role!r}")

    def get(self, model: nn.Module) -> torch.Tensor:
        """The tensor this slice lives in (a Parameter or a buffer)."""
        return getattr(model.get_submodule(self.module), self.tensor)

    def positions(self, channels: torch.Tensor) -> torch.Tensor:
        """Indices along ``dim`` owned by ``channels`` (int64, shape ``(len(channels) * expand,)``)."""
        channels = torch.as_tensor(channels, dtype=torch.long)
        if self.expand == 1:
            return channels
        offsets = torch.arange(self.expand, dtype=torch.long, device=channels.device)
        return (channels[:, None] * self.expand + offsets).reshape(-1)

    def per_channel(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` rearranged to ``(C, -1)``: row ``c`` holds every entry of channel ``c``.

        Useful for scoring (norms of filters or of input columns); returns a copy when needed.
        """
        moved = tensor.movedim(self.dim, 0)
        channels = moved.shape[0] // self.expand
        return moved.reshape(channels, -1)

    def __str__(self) -> str:
        extra = f" x{self.expand}" if self.expand != 1 else ""
        return f"{self.module}.{self.tensor}[dim {self.dim}{extra}]"


@dataclass(frozen=True)
class ChannelCount:
    """A module attribute holding ``expand`` times a group's channel count.

    Attributes:
        module: qualified module name.
        attribute: attribute name on the module (``out_channels``, ``_out_feature_channels``, ...).
        key: ``None`` for a plain int; a dict key or tuple position when the attribute is a
            dict (``_out_feature_channels["res3"]``) or a tuple (``box_head._output_size[0]``).
        expand: the attribute equals ``channels * expand`` (a linear's ``in_features`` after a
            flatten of ``(C, H, W)`` has ``expand = H * W``).
    """

    module: str
    attribute: str
    key: Optional[Hashable] = None
    expand: int = 1

    def read(self, model: nn.Module) -> int:
        value = getattr(model.get_submodule(self.module), self.attribute)
        return value if self.key is None else value[self.key]

    def write(self, model: nn.Module, count: int) -> None:
        """Set the attribute to ``count`` (already multiplied by ``expand``)."""
        module = model.get_submodule(self.module)
        if self.key is None:
            setattr(module, self.attribute, count)
            return
        value = getattr(module, self.attribute)
        if isinstance(value, tuple):
            # tuples (box head `_output_size`) are immutable: rebuild with one position changed
            setattr(module, self.attribute, value[: self.key] + (count,) + value[self.key + 1 :])
        else:
            value[self.key] = count

    def __str__(self) -> str:
        key = "" if self.key is None else f"[{self.key!r}]"
        return f"{self.module}.{self.attribute}{key}"


@dataclass(frozen=True)
class ChannelSource:
    """What a consuming layer reads on a group's channels, written in terms of the producers, as
    far as a *zeroed* channel (all its filter rows 0) is concerned.

    The value read is ``activation(scale * (sum of the outputs of layers + value of plus))``,
    carried to the consumer by ``path``. A producing layer's output on a zeroed channel is its
    bias (0 without one) passed through its norm, a constant per channel (except under
    GroupNorm, which mixes channels). Operations that keep a constant map constant (max-pool,
    nearest upsampling, the spatial mean before a predictor) are not recorded.

    Attributes:
        layers: producing layers (qualified names) whose outputs are summed.
        plus: a value added to that sum: the input of an identity shortcut, FPN's upsampled
            top-down path. None when nothing is added.
        scale: factor applied to the sum (0.5 for FPN ``fuse_type "avg"``).
        activation: ``"relu"``, ``None`` (identity), or ``"other"`` (a constant cannot be
            computed through it).
        path: ``"direct"``: the consumer reads the map itself; ``"roi_align"``: it reads ROIAlign
            samples of it, constant except where samples fall outside the map.
    """

    layers: Tuple[str, ...]
    plus: Optional["ChannelSource"] = None
    scale: float = 1.0
    activation: Optional[str] = None
    path: str = "direct"

    def exact(self) -> bool:
        """True when a constant map reaches the consumer unchanged (no ROIAlign anywhere)."""
        return self.path == "direct" and (self.plus is None or self.plus.exact())


@dataclass
class ChannelGroup:
    """Coupled channels that must be pruned with one shared index set.

    Attributes:
        name: stable readable name, e.g. ``backbone.bottom_up.res3.stream``,
            ``backbone.bottom_up.res3.0.conv1``, ``backbone.fpn.out``, ``roi_heads.box_head.fc1``.
        scope: one of :data:`SCOPES` (where the producing layers live).
        size: current number of channels ``C``.
        producers: slices with the channels on an output axis (soft pruning zeroes those of role
            ``"filter"``).
        consumers: slices with the channels on an input axis.
        counts: attributes that store the channel count.
        sources: ``{consumer layer: ChannelSource per feature map it reads}`` (several when one
            layer is shared by FPN levels that end in different producers).
        producer_layers: conv/linear modules whose outputs are the channels (qualified names).
        consumer_layers: conv/linear modules that read the channels (qualified names).
        channel_multiple: the kept count must be a multiple of this (GroupNorm ``num_groups``).
        prunable: False when the group must not be pruned; ``reason`` says why.
    """

    name: str
    scope: str
    size: int
    producers: Tuple[ChannelSlice, ...]
    consumers: Tuple[ChannelSlice, ...]
    counts: Tuple[ChannelCount, ...]
    producer_layers: Tuple[str, ...]
    consumer_layers: Tuple[str, ...]
    channel_multiple: int = 1
    prunable: bool = True
    reason: str = field(default="")
    sources: Mapping[str, Tuple[ChannelSource, ...]] = field(default_factory=dict)

    @property
    def slices(self) -> Tuple[ChannelSlice, ...]:
        """Producers then consumers."""
        return self.producers + self.consumers

    def __str__(self) -> str:
        state = "prunable" if self.prunable else f"fixed ({self.reason})"
        multiple = f", multiple of {self.channel_multiple}" if self.channel_multiple > 1 else ""
        return (
            f"{self.name} [{self.scope}] C={self.size}{multiple}, {len(self.producer_layers)} producing / "
            f"{len(self.consumer_layers)} consuming layers, {state}"
        )


def kept_count(
    current: int, ratio: float, multiple: int = 8, floor: int = 8, channel_multiple: int = 1
) -> int:
    """How many of ``current`` channels to keep when pruning the fraction ``ratio`` of them.

    The target ``current * (1 - ratio)`` is rounded to the nearest multiple of
    ``lcm(multiple, channel_multiple)`` (hardware-friendly widths), kept at least ``floor`` and
    at most ``current``. ``multiple`` and ``floor`` are relaxed when the count is too small to
    honour them; ``channel_multiple`` (GroupNorm ``num_groups``) is a hard constraint, except
    that keeping all ``current`` channels is always allowed.

    Args:
        current: channels the group has now.
        ratio: fraction of ``current`` to prune, in ``[0, 1]``.
        multiple: preferred granularity of the kept count.
        floor: fewest channels to keep (``current`` when ``current < floor``).
        channel_multiple: the group's structural constraint (``ChannelGroup.channel_multiple``).

    Returns:
        int in ``[min(floor, current), current]``.

    Examples: ``kept_count(256, 0.3) == 176``, ``kept_count(64, 0.99) == 8``,
    ``kept_count(6, 0.5) == 6``.
    """
    if current < 1:
        raise ValueError(f"current must be >= 1, got {current}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    if multiple < 1 or floor < 1 or channel_multiple < 1:
        raise ValueError(
            f"multiple, floor and channel_multiple must be >= 1, got {multiple}, {floor}, {channel_multiple}"
        )
    target = current * (1.0 - ratio)
    low = min(floor, current)
    if target >= current or low == current:
        return current
    # first try the preferred granularity, then only the structural one
    for step in (math.lcm(multiple, channel_multiple), channel_multiple):
        largest = (current // step) * step
        smallest = -(-low // step) * step  # ceil to a multiple of step
        if smallest > largest:
            continue
        count = int(math.floor(target / step + 0.5)) * step
        return min(max(count, smallest), largest)
    return current


def format_groups(groups: Union[Mapping[str, ChannelGroup], Iterable[ChannelGroup]]) -> str:
    """A fixed-width table of groups: name, scope, size, GN multiple, prunable (or why not),
    and the number of producing / consuming layers. One line per group."""
    if isinstance(groups, Mapping):
        groups = groups.values()
    groups = list(groups)
    rows = [("group", "scope", "size", "multiple", "prunable", "producers", "consumers")]
    for group in groups:
        rows.append(
            (
                group.name,
                group.scope,
                str(group.size),
                str(group.channel_multiple),
                "yes" if group.prunable else f"no: {group.reason}",
                str(len(group.producer_layers)),
                str(len(group.consumer_layers)),
            )
        )
    # the free-text "prunable" column goes last so long reasons do not widen the table
    order = (0, 1, 2, 3, 5, 6, 4)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [row[i].ljust(widths[i]) if i in (0, 1) else row[i].rjust(widths[i]) for i in order[:-1]]
        cells.append(row[order[-1]])
        lines.append("  ".join(cells))
    return "\n".join(lines)


def removable_channels(
    groups: Union[Mapping[str, ChannelGroup], Iterable[ChannelGroup]], scopes: Iterable[str], floor: int
) -> int:
    """How many channels pruning could remove at most: over the prunable groups in ``scopes``,
    each group's channels above ``floor`` (0 means a pruning run would change nothing)."""
    if isinstance(groups, Mapping):
        groups = groups.values()
    scopes = set(scopes)
    return sum(max(0, g.size - floor) for g in groups if g.prunable and g.scope in scopes)
