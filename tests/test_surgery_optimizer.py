"""Pruning while training: soft and hard pruning keep the optimizer consistent with the model
(same optimizer object, same param groups and hyper-parameters, state sliced like the
parameters; SGD, Adam and AdamW), optimizers whose state cannot be sliced (factored moments,
sharded) are refused, masks hold soft-pruned channels at zero, and bad requests fail clearly."""
import pytest
import torch
import torch.distributed as dist

from detectron2.solver import build_optimizer
from detectron2.solver.build import get_default_optimizer_params
from detectron2.utils.events import EventStorage

from pgp_det.errors import UserInputError
from pgp_det.pruning import (
    ChannelMasks, PruningRequestError, derive_channel_groups, hard_prune, soft_prune,
)
from test_pruning_groups import build_detector, detector_cfg
from test_surgery_equivalence import make_training_input

ARCH = "R18-FPN"
# fpn.out feeds both the FPN output convs' rows and fc1's 49-column blocks; fc1 itself too
REMOVALS = {
    "backbone.fpn.inner": [0, 5, 17, 200],
    "backbone.fpn.out": [1, 2, 3, 100, 255],
    "roi_heads.box_head.fc1": list(range(0, 1024, 3)),
    "backbone.bottom_up.res4.stream": [7, 8],
}


def sgd(model):
    """detectron2's own optimizer: per-parameter-kind groups (norm weight decay, bias lr)."""
    cfg = detector_cfg(ARCH)
    cfg.SOLVER.BASE_LR, cfg.SOLVER.MOMENTUM, cfg.SOLVER.WEIGHT_DECAY = 0.01, 0.9, 1e-4
    cfg.SOLVER.WEIGHT_DECAY_NORM, cfg.SOLVER.BIAS_LR_FACTOR = 0.0, 2.0
    return build_optimizer(cfg, model)


def adam(model):
    """Adam with AMSGrad: a third parameter-shaped state (``max_exp_avg_sq``) next to the moments."""
    return torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4, amsgrad=True)


def adamw(model):
    params = get_default_optimizer_params(
        model, base_lr=1e-4, weight_decay=0.05, weight_decay_norm=0.0, bias_lr_factor=2.0
    )
    return torch.optim.AdamW(params, lr=1e-4)


OPTIMIZERS = {
    "SGD": (sgd, ("momentum_buffer",)),
    "Adam": (adam, ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")),
    "AdamW": (adamw, ("exp_avg", "exp_avg_sq")),
}


def training_step(model, optimizer, seed=0):
    model.train()
    torch.manual_seed(seed)
    with EventStorage(0):
        losses = model([make_training_input()])
    loss = sum(losses.values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def hyper_parameters(optimizer):
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def kept(size, removed):
    return torch.tensor([i for i in range(size) if i not in set(removed)])


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_hard_prune_edits_optimizer_in_place(kind):
    build, state_keys = OPTIMIZERS[kind]
    model = build_detector(ARCH)
    optimizer = build(model)
    assert torch.isfinite(torch.tensor(training_step(model, optimizer)))
    names = {p: n for n, p in model.named_parameters()}
    old_hyper = hyper_parameters(optimizer)
    old_positions = [[names[p] for p in group["params"]] for group in optimizer.param_groups]
    old_state = {names[p]: {k: optimizer.state[p][k].clone() for k in state_keys} for p in optimizer.state}
    old_step = {names[p]: optimizer.state[p].get("step") for p in optimizer.state}

    mapping = hard_prune(model, REMOVALS, optimizer)

    params = dict(model.named_parameters())
    assert mapping and all(params[names[old]] is new for old, new in mapping.items())
    # same parameters, same places, same hyper-parameters
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    held = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in held} == trainable and len(held) == len(trainable)
    assert [[params[n] for n in group] for group in old_positions] == [g["params"] for g in optimizer.param_groups]
    assert hyper_parameters(optimizer) == old_hyper
    assert set(optimizer.state) == set(held)
    # state follows the parameter's shape; kept entries keep their values
    for name, param in params.items():
        if param.requires_grad:
            for key in state_keys:
                assert optimizer.state[param][key].shape == param.shape, (name, key)
            step = optimizer.state[param].get("step")
            assert (step is None and old_step[name] is None) or torch.equal(torch.as_tensor(step), torch.as_tensor(old_step[name]))
    inner, out, fc1 = (kept(256, REMOVALS["backbone.fpn.inner"]), kept(256, REMOVALS["backbone.fpn.out"]),
                       kept(1024, REMOVALS["roi_heads.box_head.fc1"]))
    for key in state_keys:
        old = old_state["backbone.fpn_output3.weight"][key]
        new = optimizer.state[params["backbone.fpn_output3.weight"]][key]
        assert torch.equal(new, old[out][:, inner])
        old = old_state["roi_heads.box_head.fc1.weight"][key].reshape(1024, 256, 49)
        new = optimizer.state[params["roi_heads.box_head.fc1.weight"]][key]
        assert torch.equal(new, old[fc1][:, out].reshape(len(fc1), -1))
        old = old_state["roi_heads.box_head.fc2.weight"][key]
        assert torch.equal(optimizer.state[params["roi_heads.box_head.fc2.weight"]][key], old[:, fc1])
    # training goes on with the same optimizer
    before = params["roi_heads.box_head.fc2.weight"].detach().clone()
    loss = training_step(model, optimizer, seed=1)
    assert torch.isfinite(torch.tensor(loss))
    assert not torch.equal(before, params["roi_heads.box_head.fc2.weight"])


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_soft_prune_zeroes_optimizer_state(kind):
    build, state_keys = OPTIMIZERS[kind]
    model = build_detector(ARCH)
    optimizer = build(model)
    training_step(model, optimizer)
    groups = derive_channel_groups(model)
    channels = torch.tensor([1, 4, 9])
    conv = model.backbone.bottom_up.res3[1].conv1
    for key in state_keys:
        assert optimizer.state[conv.weight][key][channels].abs().sum() > 0
    norm = {name: b.clone() for name, b in conv.norm.named_buffers()}
    soft_prune(model, groups["backbone.bottom_up.res3.1.conv1"], channels, optimizer)
    assert conv.weight[channels].abs().sum() == 0
    for key in state_keys:
        assert optimizer.state[conv.weight][key][channels].abs().sum() == 0
        assert optimizer.state[conv.weight][key][0].abs().sum() > 0  # other channels untouched
    # the FrozenBN after the zeroed filters is kept: it carries the gradient back to them
    assert all(torch.equal(b, norm[name]) for name, b in conv.norm.named_buffers())
    # mode "zero_path" zeroes the whole output: FrozenBN scale 0, variance 1
    soft_prune(model, groups["backbone.bottom_up.res3.1.conv1"], channels, optimizer, mode="zero_path")
    assert conv.norm.weight[channels].abs().sum() == 0 and torch.all(conv.norm.running_var[channels] == 1)


def test_masks_hold_channels_at_zero_and_follow_hard_prune():
    model = build_detector(ARCH)
    optimizer = sgd(model)
    groups = derive_channel_groups(model)
    masks = ChannelMasks()
    masks.add(groups["backbone.fpn.out"], [3, 10, 11])
    masks.add(groups["roi_heads.box_head.fc1"], [0, 1023])
    masks.apply(model, optimizer)
    training_step(model, optimizer)
    weight = model.backbone.fpn_output2.weight
    assert weight[[3, 10, 11]].abs().sum() > 0  # gradients and momentum revive them ...
    masks.apply(model, optimizer)
    assert weight[[3, 10, 11]].abs().sum() == 0  # ... until the masks re-zero them
    assert optimizer.state[weight]["momentum_buffer"][[3, 10, 11]].abs().sum() == 0

    removals = {"backbone.fpn.out": [0, 10], "roi_heads.box_head.fc1": [5]}
    hard_prune(model, removals, optimizer)
    masks.after_hard_prune(derive_channel_groups(model), removals)
    assert masks.masked() == {"backbone.fpn.out": [2, 9], "roi_heads.box_head.fc1": [0, 1022]}
    training_step(model, optimizer, seed=2)
    masks.apply(model, optimizer)
    assert model.backbone.fpn_output2.weight[[2, 9]].abs().sum() == 0
    assert model.roi_heads.box_head.fc1.weight[[0, 1022]].abs().sum() == 0


@pytest.mark.parametrize(
    "removals, message",
    [
        ({"backbone.fpn.nope": [0]}, "unknown channel group 'backbone.fpn.nope'"),
        ({"roi_heads.box_predictor.cls_score": [0]}, "outputs of roi_heads.box_predictor.cls_score are the detector's predictions"),
        ({"roi_heads.box_predictor.bbox_pred.weight": [0]}, "bbox_pred are the detector's predictions and are never pruned"),
        ({"proposal_generator.rpn_head.objectness_logits": [0]}, "never pruned"),
        ({"backbone.bottom_up.res2.stream": [0]}, "cannot be pruned: touches frozen parameter"),
        ({"backbone.fpn.out": [0, 256]}, "index 256 out of range 0..255"),
        ({"backbone.fpn.out": [-1]}, "index -1 out of range"),
        ({"backbone.fpn.out": [4, 4]}, "index 4 given more than once"),
        ({"backbone.fpn.out": list(range(256))}, "cannot remove all 256 channels"),
        ({"backbone.fpn.out": [0.5]}, "must be integers"),
        ({"roi_heads.box_head.fc1": [1], "backbone.fpn.out": [300]}, "out of range"),
    ],
)
def test_bad_requests_fail_clearly_and_change_nothing(removals, message):
    model = build_detector(ARCH)
    optimizer = sgd(model)
    before = {n: p for n, p in model.named_parameters()}
    with pytest.raises(PruningRequestError, match=message) as error:
        hard_prune(model, removals, optimizer)
    assert isinstance(error.value, UserInputError) and isinstance(error.value, ValueError)
    assert "\n" not in str(error.value)
    assert all(p is before[n] for n, p in model.named_parameters())
    assert model.roi_heads.box_head.fc1.weight.shape == (1024, 256 * 49)


def test_hard_prune_keeps_detectron2_gradient_clipping():
    model = build_detector(ARCH)
    cfg = detector_cfg(ARCH, "SOLVER.CLIP_GRADIENTS.ENABLED", True, "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", 5.0)
    optimizer = build_optimizer(cfg, model)  # a generated subclass of SGD that clips in step()
    hard_prune(model, {"backbone.fpn.out": [0, 1]}, optimizer)
    assert "Clip" in type(optimizer).__name__
    assert torch.isfinite(torch.tensor(training_step(model, optimizer)))


class FactoredSGD(torch.optim.SGD):
    """SGD that also keeps an Adafactor-like factored second moment of every matrix: one entry per
    row (``row_var``) and one per column (``col_var``), neither shaped like the parameter."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None and param.dim() > 1:
                    squared = param.grad.reshape(param.shape[0], -1) ** 2
                    self.state[param]["row_var"] = squared.mean(1)
                    self.state[param]["col_var"] = squared.mean(0)
        return loss


class ShardedSGD(torch.optim.SGD):
    """Shaped like ZeroRedundancyOptimizer: its param groups list every parameter, while an inner
    optimizer (``optim``) steps this rank's shard and keeps its state."""

    def __init__(self, params, lr=0.01):
        params = list(params)
        super().__init__(params, lr=lr)
        self.optim = torch.optim.SGD(params[::2], lr=lr, momentum=0.9)


def fsdp_flat_sgd(model):
    """SGD over parameters flagged as FSDP flat parameters (how torch marks a ``FlatParameter``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    params[0]._is_flat_param = True
    return torch.optim.SGD(params, lr=0.01)


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group, as ZeroRedundancyOptimizer needs one."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def zero_sgd(model):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    params = [p for p in model.parameters() if p.requires_grad]
    return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.SGD, lr=0.01, momentum=0.9)


REFUSED = {
    "factored": (lambda model: FactoredSGD(model.parameters(), lr=0.01, momentum=0.9), True,
                 r"FactoredSGD: its state '(row|col)_var' of .* is shaped .*unlike the parameter"),
    "inner optimizer": (lambda model: ShardedSGD(model.parameters()), False,
                        r"ShardedSGD: it steps an inner optimizer"),
    "fsdp": (fsdp_flat_sgd, False, r"SGD: its parameters are FSDP flat parameters"),
}
if hasattr(torch.optim, "Adafactor"):
    REFUSED["Adafactor"] = (lambda model: torch.optim.Adafactor(model.parameters(), lr=0.01), True,
                            r"Adafactor: its state '(row|col)_var' of .* is shaped")


def _check_refused(model, optimizer, message):
    groups = derive_channel_groups(model)
    # zeroed channels among the removed ones: a fold would change their consumers' biases
    soft_prune(model, groups["backbone.fpn.out"], REMOVALS["backbone.fpn.out"][:2])
    params = dict(model.named_parameters())
    values = {name: t.detach().clone() for name, t in model.state_dict().items()}
    state = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in optimizer.state.items()}
    held = [list(group["params"]) for group in optimizer.param_groups]
    with pytest.raises(PruningRequestError, match=message) as error:
        hard_prune(model, REMOVALS, optimizer, groups=groups)
    assert "\n" not in str(error.value) and "hard pruning cannot carry the optimizer" in str(error.value)
    # nothing changed: parameters, their values, the optimizer's parameters and state
    assert all(p is params[n] for n, p in model.named_parameters())
    assert all(torch.equal(t, values[n]) for n, t in model.state_dict().items())
    assert [list(group["params"]) for group in optimizer.param_groups] == held
    assert set(optimizer.state) == set(state)
    for param, entries in state.items():
        for key, value in entries.items():
            now = optimizer.state[param][key]
            assert torch.equal(now, value) if torch.is_tensor(value) else now == value


@pytest.mark.parametrize("kind", list(REFUSED))
def test_optimizers_whose_state_cannot_be_sliced_are_refused(kind):
    build, train_first, message = REFUSED[kind]
    model = build_detector(ARCH)
    optimizer = build(model)
    if train_first:  # the factored state exists once the optimizer has stepped
        training_step(model, optimizer)
    _check_refused(model, optimizer, message)


def test_zero_redundancy_optimizer_is_refused(process_group):
    model = build_detector(ARCH)
    _check_refused(model, zero_sgd(model), r"ZeroRedundancyOptimizer: ZeRO shards its state across ranks")


def test_group_norm_multiple_is_enforced():
    model = build_detector(ARCH, "MODEL.FPN.NORM", "GN")
    groups = derive_channel_groups(model)
    with pytest.raises(PruningRequestError, match="multiple of 32"):
        hard_prune(model, {"backbone.fpn.out": [0, 1, 2]})
    assert groups["backbone.fpn.out"].channel_multiple == 32
    with pytest.raises(PruningRequestError, match="cannot be pruned"):
        soft_prune(model, groups["backbone.bottom_up.res2.stream"], [0])  # frozen by FREEZE_AT=2
