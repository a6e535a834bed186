"""Checkpoints of (possibly pruned) detectors: save atomically, rebuild the saved architecture on load.

A model built from its config has the config's channel counts; a pruned checkpoint has fewer.
:class:`PrunedCheckpointer` stores the channel count of every channel group next to the weights
(``"pgp_architecture": {group name: channels}``, see :func:`architecture_record`) and, on load,
shrinks the freshly built model to those counts (:func:`apply_architecture`) before the weights
are copied in. Group names do not change when a model is pruned, so a record stays valid for any
model built from the same config.

Where detectron2 only warns about checkpoint tensors that do not fit the model (and leaves them
at their initialisation: a silently wrong model), :class:`PrunedCheckpointer` raises
:class:`~pgp_det.errors.UserInputError` naming the first such tensor; see its docstring for the
two mismatches it tolerates when loading weights to train from.
"""
import logging
import os
from typing import Collection, Dict, List, Mapping, Optional, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from torch import nn

from .utils.modules import unwrap_model
from . import modeling  # noqa: F401  (registers SelectThenDecodeRPN: a config may name it)
from .errors import UserInputError
from .pruning.dependency import derive_channel_groups, prediction_layers
from .pruning.surgery import hard_prune
from .utils.io import atomic_write, atomic_write_text
from .utils.safe_load import ARCHITECTURE_KEY, read_checkpoint_file

__all__ = ["ARCHITECTURE_KEY", "architecture_record", "apply_architecture", "PrunedCheckpointer", "load_model"]

logger = logging.getLogger(__name__)


_REUSE_HINT = "use the config the checkpoint was trained with"


def architecture_record(model: nn.Module) -> Dict[str, int]:
    """``{group name: current channel count}`` for every channel group of ``model``.

    Args:
        model: a detectron2 ``GeneralizedRCNN``, possibly wrapped in (Distributed)DataParallel.

    Raises:
        ValueError: ``derive_channel_groups`` does not support the model's architecture.
    """
    groups = derive_channel_groups(unwrap_model(model), allow_frozen=True)
    return {name: int(group.size) for name, group in groups.items()}


def _different_architecture(source: str, detail: str) -> UserInputError:
    return UserInputError(f"checkpoint {source} was saved from a different architecture: {detail}; {_REUSE_HINT}")


def apply_architecture(
    model: nn.Module,
    record: Mapping[str, int],
    optimizer: Optional[torch.optim.Optimizer] = None,
    source: str = "(unnamed)",
    checkpoint_tensors: Optional[Collection[str]] = None,
) -> bool:
    """Shrink ``model`` so that every channel group has the size ``record`` gives it.

    Groups larger than recorded lose their last channels (the weights are about to be
    overwritten by the checkpoint's); groups of the recorded size are left alone.

    Args:
        model: a freshly built or partly pruned ``GeneralizedRCNN`` (unwrapped from
            DistributedDataParallel here; a wrapper must be rebuilt by the caller when this
            returns True).
        record: ``{group name: channels}``, as :func:`architecture_record` returns.
        optimizer: holds ``model``'s parameters; edited in place to point at the new (smaller)
            parameters, its per-parameter state sliced alike (see :func:`hard_prune`).
        source: the checkpoint's name, for error messages.
        checkpoint_tensors: the names of the checkpoint's tensors, when known. A group the record
            lacks is then accepted, at the size the model was built with, if the checkpoint holds
            none of its producers' tensors: layers the saved model did not have (the domain
            classifiers a source-trained detector gets when it starts adapting).

    Returns:
        whether the model changed.

    Raises:
        UserInputError: the record is malformed, names a group the model lacks, lacks one the
            model has, or gives a group more channels than the model has; nothing changes then.
    """
    model = unwrap_model(model)
    if not isinstance(record, Mapping) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 1 for k, v in record.items()
    ):
        raise UserInputError(
            f"checkpoint {source} has a malformed '{ARCHITECTURE_KEY}' entry (expected {{group name: channels >= 1}}); "
            "save it again with pgp_det.checkpoint.PrunedCheckpointer"
        )
    try:
        groups = derive_channel_groups(model, allow_frozen=True)
    except ValueError as e:  # only supported architectures produce records
        raise _different_architecture(source, f"the model built from the config has no channel groups ({e})") from None
    for name, channels in record.items():
        if name not in groups:
            raise _different_architecture(
                source, f"it has channel group {name}, which the model built from the config lacks"
            )
        if channels > groups[name].size:
            raise _different_architecture(
                source,
                f"group {name} has {channels} channels in the checkpoint but {groups[name].size} in the model built "
                "from the config",
            )
    def layers_absent_from_checkpoint(group) -> bool:
        return checkpoint_tensors is not None and not any(
            f"{p.module}.{p.tensor}" in checkpoint_tensors for p in group.producers)

    missing = [name for name, group in groups.items() if name not in record and not layers_absent_from_checkpoint(group)]
    if missing:
        raise _different_architecture(
            source, f"channel group {missing[0]} of the model built from the config is not in the checkpoint"
        )
    removals = {name: range(record[name], group.size) for name, group in groups.items()
                if name in record and record[name] < group.size}
    if not removals:
        return False
    hard_prune(model, removals, optimizer=optimizer, allow_frozen=True, groups=groups)
    logger.info("rebuilt the pruned architecture of %s: %d channel groups shrunk", source, len(removals))
    return True


class PrunedCheckpointer(DetectionCheckpointer):
    """detectron2's checkpointer for models that may have been pruned.

    Differences to :class:`~detectron2.checkpoint.DetectionCheckpointer`:

    * :meth:`save` adds ``"pgp_architecture": architecture_record(model)`` and writes the file
      and ``last_checkpoint`` atomically (temporary file, then ``os.replace``): a crash or a
      failing ``torch.save`` leaves the previous files intact. ``save_dir`` must be local.
    * Loading applies a checkpoint's ``pgp_architecture`` to ``self.model`` before the weights
      are copied, and passes the optimizer (checkpointable ``"optimizer"``, or the ``optimizer``
      of checkpointable ``"trainer"`` as in detectron2's ``DefaultTrainer``) so it follows the
      model; its state is then loaded as usual when the checkpointables are. When this happens,
      ``architecture_changed`` is True until the next load: a DistributedDataParallel wrapper
      around the model must be rebuilt.
    * Files are read by :func:`pgp_det.utils.safe_load.read_checkpoint_file`: plain data only,
      never code, unless the checkpointer is built with ``trusted=True`` (``--trust-weights``).
    * A checkpoint of which not one tensor fits the model raises :class:`UserInputError`
      (it is not a checkpoint of this architecture; loading it would leave random weights).
    * Tensors whose shapes differ between checkpoint and model raise :class:`UserInputError`
      naming the first one. With ``strict=False`` (the default, for loading weights to train
      from), two detectron2 conventions are kept: model tensors the checkpoint lacks keep their
      initialisation (an ImageNet backbone initialises a detector), and the output axis of the
      prediction layers (class scores, box deltas, objectness, anchor deltas) may differ, so a
      detector can be fine-tuned to another class set; those tensors keep their initialisation
      too. ``strict=True`` (evaluation, export, benchmarks) refuses both, and checkpoint tensors
      the model does not have. After a failed load the model may already have been shrunk:
      build it again.
    """

    def __init__(self, model: nn.Module, save_dir: str = "", *, save_to_disk: Optional[bool] = None,
                 strict: bool = False, trusted: bool = False, **checkpointables):
        super().__init__(model, save_dir, save_to_disk=save_to_disk, **checkpointables)
        self.strict = strict
        self.trusted = trusted
        self.architecture_changed = False
        self._source = ""

    # -- saving ---------------------------------------------------------------------------------

    def save(self, name: str, *, tag_last_checkpoint: bool = True, **kwargs) -> None:
        """Write ``save_dir/name.pth`` atomically: model, checkpointables, ``kwargs`` and the
        architecture record; then point ``last_checkpoint`` at it unless ``tag_last_checkpoint``
        is False (a one-off file that must not become the file ``--resume`` continues from)."""
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, checkpointable in self.checkpointables.items():
            data[key] = checkpointable.state_dict()
        data.update(kwargs)
        try:
            data[ARCHITECTURE_KEY] = architecture_record(self.model)
        except ValueError as e:  # a model pgp_det cannot prune has the architecture of its config
            logger.debug("no architecture record saved: %s", e)
        basename = f"{name}.pth"
        path = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to %s", path)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                torch.save(data, f)
                f.flush()
                os.fsync(f.fileno())  # the data is on disk before the rename makes it visible

        atomic_write(path, write)
        if tag_last_checkpoint:
            self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        atomic_write_text(os.path.join(self.save_dir, "last_checkpoint"), last_filename_basename)

    # -- loading --------------------------------------------------------------------------------

    def load(self, path: str, *args, **kwargs):
        self.architecture_changed = False
        self._source = f"'{path}'"
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename: str) -> dict:
        # every weights file goes through the one loader that never runs code it holds
        return read_checkpoint_file(filename, trusted=self.trusted)

    def _optimizer(self) -> Optional[torch.optim.Optimizer]:
        """The optimizer training ``self.model``, if the checkpointer knows it."""
        if "optimizer" in self.checkpointables:
            return self.checkpointables["optimizer"]
        trainer = self.checkpointables.get("trainer")
        try:
            return getattr(trainer, "optimizer", None)
        except ReferenceError:  # a weakref.proxy to a trainer that is gone
            return None

    def _load_model(self, checkpoint: dict):
        record = checkpoint.pop(ARCHITECTURE_KEY, None)
        if record is not None:
            self.architecture_changed = apply_architecture(self.model, record, self._optimizer(), self._source,
                                                           checkpoint_tensors=set(checkpoint.get("model", {})))
        incompatible = super()._load_model(checkpoint)
        self._check_incompatible(incompatible, has_record=record is not None)
        return incompatible

    def _check_incompatible(self, incompatible, has_record: bool) -> None:
        """Raise for what must not be loaded silently; leave the tolerated rest to be logged."""
        model_keys = [k for k in self.model.state_dict() if not k.endswith("num_batches_tracked")]
        not_loaded = set(incompatible.missing_keys) | {k for k, _, _ in incompatible.incorrect_shapes}
        if model_keys and all(k in not_loaded for k in model_keys):
            example = incompatible.unexpected_keys[0] if incompatible.unexpected_keys else "none"
            raise UserInputError(
                f"checkpoint {self._source} holds no tensor of this model (first of its tensors: {example}): it is "
                "not a checkpoint of this architecture; " + _REUSE_HINT
            )
        shapes = incompatible.incorrect_shapes
        if not self.strict:
            outputs = _prediction_tensors(self.model)
            shapes = [(k, ckpt, mine) for k, ckpt, mine in shapes if not _output_axis_only(k, ckpt, mine, outputs)]
        if shapes:
            key, ckpt_shape, model_shape = shapes[0]
            fix = (
                _REUSE_HINT
                if has_record
                else f"if it is a pruned model, it lacks the '{ARCHITECTURE_KEY}' record: save it with "
                "pgp_det.checkpoint.PrunedCheckpointer, or " + _REUSE_HINT
            )
            raise UserInputError(
                f"checkpoint {self._source} does not match the model of its config: {len(shapes)} tensors differ in "
                f"shape (first: {key}: checkpoint {tuple(ckpt_shape)} vs model {tuple(model_shape)}); {fix}"
            )
        if not self.strict:
            return
        incorrect = {k for k, _, _ in incompatible.incorrect_shapes}
        missing = [
            k for k in incompatible.missing_keys if k not in incorrect and not k.endswith("num_batches_tracked")
        ]
        if missing:
            raise UserInputError(
                f"checkpoint {self._source} does not match the model of its config: {len(missing)} model tensors are "
                f"missing (first: {missing[0]}); load a checkpoint of a whole detector trained with this config"
            )
        if incompatible.unexpected_keys:
            raise UserInputError(
                f"checkpoint {self._source} does not match the model of its config: it holds "
                f"{len(incompatible.unexpected_keys)} tensors the model lacks (first: {incompatible.unexpected_keys[0]}); "
                + _REUSE_HINT
            )


def _prediction_tensors(model: nn.Module) -> List[str]:
    """State-dict prefixes of the prediction layers (``name.``), empty when unsupported."""
    try:
        return [f"{name}." for name in prediction_layers(model)]
    except ValueError:
        return []


def _output_axis_only(key: str, ckpt: Tuple[int, ...], mine: Tuple[int, ...], prefixes: List[str]) -> bool:
    """A prediction layer's tensor differing only in its output count (classes, anchors)."""
    return (
        any(key.startswith(p) for p in prefixes)
        and len(ckpt) == len(mine)
        and len(ckpt) >= 1
        and tuple(ckpt[1:]) == tuple(mine[1:])
    )


def load_model(cfg, weights: str = None, *, strict: bool = True, trusted: bool = False) -> nn.Module:
    """Build ``cfg``'s model, load ``weights`` (default ``cfg.MODEL.WEIGHTS``) and return it in eval mode.

    A pruned checkpoint's architecture is rebuilt (see :class:`PrunedCheckpointer`).

    Args:
        cfg: a detectron2 config.
        weights: checkpoint path or URL; ``""`` keeps the random initialisation.
        strict: refuse checkpoints that do not cover the whole model exactly (for evaluation);
            False accepts partial checkpoints such as an ImageNet backbone.
        trusted: the user vouches for the file: allow pickled Python objects (runs their code).

    Raises:
        UserInputError: the weights file does not exist or does not fit the model.
    """
    weights = cfg.MODEL.WEIGHTS if weights is None else weights
    if weights and "://" not in weights and not os.path.isfile(weights):
        raise UserInputError(f"weights file '{weights}' does not exist")
    model = build_model(cfg)
    if weights:
        PrunedCheckpointer(model, strict=strict, trusted=trusted).load(weights)
    return model.eval()
