"""The knapsack's values: the first-order loss change of removing a channel, checked against the
loss itself (a central difference along the channel's producing parameters) on R18-FPN with
BatchNorm, for a backbone group behind a norm, FPN's norm-free output, the RPN conv and a box-head
fc; and its accumulation, averaging and state."""
import pytest
import torch

from pgp_det.pruning import PruningRequestError, derive_channel_groups
from pgp_det.pruning.loss_change import LossChangeEstimate
from test_soft_recovery import build, training_loss

GROUPS = ["backbone.bottom_up.res3.0.conv1", "backbone.bottom_up.res4.stream", "backbone.fpn.out",
          "proposal_generator.rpn_head.conv", "roi_heads.box_head.fc1"]
EPSILON = 1e-1  # float32 loss: smaller steps drown in rounding (the loss is smooth in alpha: proposals held)


def producing_parameters(model, group):
    """(parameter, channel slice) pairs that removing a channel sets to zero."""
    return [(piece.get(model), piece) for piece in group.producers
            if piece.role != "input" and isinstance(piece.get(model), torch.nn.Parameter)]


@torch.no_grad()
def scale_channel(model, group, channel, factor):
    for tensor, piece in producing_parameters(model, group):
        positions = piece.positions(torch.tensor([channel]))
        tensor.index_copy_(piece.dim, positions, tensor.index_select(piece.dim, positions) * factor)


def loss_at(model, group, channel, factor):
    scale_channel(model, group, channel, factor)
    with torch.no_grad():
        loss = training_loss(model, seed=3).item()
    scale_channel(model, group, channel, 1.0 / factor)
    return loss


def hold_proposals(model):
    """The RPN's proposals of the first call, every call: the loss is then smooth in the weights
    (proposal selection and NMS are discrete, and carry no gradient)."""
    rpn = model.proposal_generator
    select, held = rpn.predict_proposals, []

    def first_proposals(*args, **kwargs):
        if not held:
            held.append(select(*args, **kwargs))
        return held[0]

    rpn.predict_proposals = first_proposals


@pytest.fixture(scope="module")
def estimate():
    model = build("R18-FPN", "BN")
    hold_proposals(model)
    groups = derive_channel_groups(model)
    values = LossChangeEstimate("taylor")
    values.attach(model, groups)
    training_loss(model, seed=3).backward()
    values.update()
    return model, groups, values


@pytest.mark.parametrize("name", GROUPS)
def test_the_estimate_is_the_slope_of_the_loss_toward_removal(estimate, name):
    """d[c] = -dL/d(alpha) at alpha = 1, alpha scaling every producing parameter of channel c:
    removing it (alpha 1 -> 0) changes the loss by about d[c]."""
    model, groups, values = estimate
    value = values.values()[name]
    signed = values.state_dict()["signed"][name]
    group = groups[name]
    strongest = int(value.argmax())
    for channel in {strongest, (strongest + 5) % group.size}:
        slope = (loss_at(model, group, channel, 1 + EPSILON) - loss_at(model, group, channel, 1 - EPSILON)) / (2 * EPSILON)
        assert float(signed[channel]) == pytest.approx(-slope, rel=0.05, abs=1e-3 * float(value.max())), (name, channel)
        assert float(value[channel]) == pytest.approx(abs(float(signed[channel])), rel=1e-6)
    assert float(value[strongest]) > 0


def test_values_average_over_iterations_and_cancel_signs():
    """Two iterations of opposite sign cancel in ``taylor``, not in ``taylor_squared``; both are
    averaged over the iterations; the state restores them."""
    model = build("R18-FPN", "BN")
    groups = derive_channel_groups(model)
    name = "roi_heads.box_head.fc1"
    first, squared = LossChangeEstimate("taylor"), LossChangeEstimate("taylor_squared")
    for estimate in (first, squared):
        estimate.attach(model, groups)
    training_loss(model).backward()
    first.update(), squared.update()
    once = first.values()[name].clone()
    once_squared = squared.values()[name].clone()
    for parameter in model.parameters():
        if parameter.grad is not None:
            parameter.grad.neg_()
    first.update(), squared.update()
    assert torch.all(first.values()[name] <= 1e-6 * once.max())  # +d then -d: nothing left
    torch.testing.assert_close(squared.values()[name], once_squared)  # (d^2 + d^2) / 2
    restored = LossChangeEstimate("taylor_squared")
    restored.attach(model, groups)
    restored.load_state_dict(squared.state_dict())
    torch.testing.assert_close(restored.values()[name], once_squared)
    with pytest.raises(PruningRequestError, match="cannot load a 'taylor_squared' loss-change estimate into a 'taylor'"):
        first.load_state_dict(squared.state_dict())
    with pytest.raises(PruningRequestError, match="must be 'taylor' or 'taylor_squared'"):
        LossChangeEstimate("scores")
