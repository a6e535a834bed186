"""Channel criteria rank channels as known by construction: scaled filters, zeroed gradients or
gammas, cancelling Taylor terms, relevance from a real forward/backward; accumulators survive
state_dict round trips and hard prunes, and the extra pass leaves the model as it was."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.layers import Conv2d
from detectron2.utils.events import EventStorage

from pgp_det.pruning import ChannelCount, ChannelGroup, ChannelSlice, PruningRequestError, derive_channel_groups
from pgp_det.pruning.criteria import base as criteria_base
from pgp_det.pruning.criteria import CRITERION_REGISTRY, NormGammaCriterion, build_criterion, combine_layer_scores
from pgp_det.pruning.surgery import hard_prune, soft_prune

ALL = sorted(name for name, _ in CRITERION_REGISTRY)


class TwoBranchNet(nn.Module):
    """stem (conv + BN) -> two convs whose outputs are added (one coupled group) -> pooled linear.

    Called like a detectron2 model in training: a list of dicts in, ``{"loss": ...}`` out; the
    loss ``sum(head(x) * target)`` is linear in ``target``, so negating it negates every gradient.
    """

    def __init__(self, stem=8, branches=6):
        super().__init__()
        self.stem = Conv2d(3, stem, 3, padding=1, bias=False, norm=nn.BatchNorm2d(stem))
        self.left = nn.Conv2d(stem, branches, 3, padding=1)
        self.right = nn.Conv2d(stem, branches, 1)
        self.head = nn.Linear(branches, 2)

    def forward(self, batch):
        images = torch.stack([item["image"] for item in batch])
        target = torch.stack([item["target"] for item in batch])
        stem = F.relu(self.stem(images))
        pooled = F.relu(self.left(stem) + self.right(stem)).mean(dim=(2, 3))
        return {"loss": (self.head(pooled) * target).sum()}


def tiny_groups(stem=8, branches=6):
    """The two channel groups of :class:`TwoBranchNet`, written the way derive_channel_groups
    writes them for a detector."""
    stem_group = ChannelGroup(
        name="stem", scope="backbone", size=stem,
        producers=(ChannelSlice("stem", "weight", 0), ChannelSlice("stem.norm", "weight", 0),
                   ChannelSlice("stem.norm", "bias", 0), ChannelSlice("stem.norm", "running_mean", 0),
                   ChannelSlice("stem.norm", "running_var", 0, pruned_value=1.0)),
        consumers=(ChannelSlice("left", "weight", 1), ChannelSlice("right", "weight", 1)),
        counts=(ChannelCount("stem", "out_channels"), ChannelCount("stem.norm", "num_features"),
                ChannelCount("left", "in_channels"), ChannelCount("right", "in_channels")),
        producer_layers=("stem",), consumer_layers=("left", "right"),
    )
    branch_group = ChannelGroup(
        name="branches", scope="backbone", size=branches,
        producers=(ChannelSlice("left", "weight", 0), ChannelSlice("left", "bias", 0),
                   ChannelSlice("right", "weight", 0), ChannelSlice("right", "bias", 0)),
        consumers=(ChannelSlice("head", "weight", 1),),
        counts=(ChannelCount("left", "out_channels"), ChannelCount("right", "out_channels"),
                ChannelCount("head", "in_features")),
        producer_layers=("left", "right"), consumer_layers=("head",),
    )
    return {"stem": stem_group, "branches": branch_group}


def tiny_net(seed=0):
    torch.manual_seed(seed)
    return TwoBranchNet()


def make_batch(seed, sign=1.0, images=2):
    generator = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.rand(3, 8, 10, generator=generator), "target": sign * torch.randn(2, generator=generator)}
        for _ in range(images)
    ]


def attached(name, model, groups=None):
    criterion = build_criterion(name)
    criterion.attach(model, groups or tiny_groups())
    return criterion


def set_grads(model, seed, scale=None):
    """Give every producer weight a known gradient (as a training step would leave it)."""
    generator = torch.Generator().manual_seed(seed)
    for name in ("stem", "left", "right"):
        weight = model.get_submodule(name).weight
        weight.grad = torch.randn(weight.shape, generator=generator)
        if scale is not None:
            weight.grad *= scale(name)[:, None, None, None]


def row_norms(tensor, order):
    return torch.linalg.vector_norm(tensor.reshape(tensor.shape[0], -1), ord=order, dim=1)


# ---------------------------------------------------------------------------------------------
# registry


def test_unknown_name_fails_clearly_and_every_registered_criterion_scores_every_group():
    with pytest.raises(PruningRequestError, match=r"unknown pruning criterion 'gradient'; known: .*pgp"):
        build_criterion("gradient")
    with pytest.raises(PruningRequestError, match="criterion 'l1'"):
        build_criterion("l1", order=3)
    model = tiny_net()
    for name in ALL:
        criterion = build_criterion(name)
        if criterion.needs_extra_pass:
            continue  # needs batches (frs: a detector); see the extra-pass tests, test_frs_relevance.py
        criterion.attach(model, tiny_groups())
        set_grads(model, 1)
        criterion.update(model)
        scores = criterion.scores(model)
        assert set(scores) == set(tiny_groups()), name
        assert all(torch.isfinite(v).all() and v.shape == (g.size,) for v, g in zip(scores.values(), tiny_groups().values())), name


def test_scores_before_attach_fail_clearly():
    with pytest.raises(PruningRequestError, match="not attached"):
        build_criterion("pgp").scores(tiny_net())


# ---------------------------------------------------------------------------------------------
# the per-group reduction


def test_combine_normalises_each_layer_by_its_mean_then_averages():
    small = torch.tensor([1.0, 2.0, 3.0])
    large = torch.tensor([300.0, 200.0, 100.0])  # 100x the scale: must not dominate
    assert torch.allclose(combine_layer_scores([small, large]), torch.ones(3))
    assert torch.allclose(combine_layer_scores([small]), small / 2)
    assert torch.allclose(combine_layer_scores([small], "l2"), small / small.norm())
    # a dead layer contributes zeros instead of 0 / 0
    assert torch.allclose(combine_layer_scores([small, torch.zeros(3)]), small / 4)


@torch.no_grad()
def test_coupled_group_counts_producer_layers_equally():
    model = tiny_net()
    # row L1 norms: left 1..6, right 100 x (6..1): normalised they average to exactly 1
    for c in range(6):
        model.left.weight[c].fill_((c + 1) / model.left.weight[c].numel())
        model.right.weight[c].fill_(100 * (6 - c) / model.right.weight[c].numel())
    scores = attached("l1", model).scores(model)
    assert torch.allclose(scores["branches"], torch.ones(6), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# weight criteria


@pytest.mark.parametrize("name,order", [("l1", 1), ("l2", 2)])
@torch.no_grad()
def test_filter_norms_rank_a_scaled_filter_highest(name, order):
    model = tiny_net()
    model.stem.weight[3] *= 10
    scores = attached(name, model).scores(model)
    expected = row_norms(model.stem.weight, order)
    assert torch.allclose(scores["stem"], expected / expected.mean())
    assert scores["stem"].argmax() == 3
    assert set(scores) == {"stem", "branches"} and scores["branches"].shape == (6,)
    assert scores["stem"].dtype == torch.float32 and scores["stem"].device.type == "cpu"


@torch.no_grad()
def test_bn_gamma_zero_gamma_is_lowest_and_norm_free_groups_fall_back_to_l1():
    model = tiny_net()
    model.stem.norm.weight.copy_(torch.tensor([0.5, -1.0, 0.25, 2.0, 1.0, 0.0, 0.75, 1.5]))
    scores = attached("bn_gamma", model).scores(model)
    gamma = model.stem.norm.weight.abs()
    assert torch.allclose(scores["stem"], gamma / gamma.mean())
    assert scores["stem"].argmin() == 5 and scores["stem"][1] == scores["stem"][4]  # |gamma|, sign ignored
    assert torch.allclose(scores["branches"], attached("l1", model).scores(model)["branches"])


# ---------------------------------------------------------------------------------------------
# gradient criteria


@pytest.mark.parametrize("name", ["pgp", "rpgp"])
def test_a_channel_without_gradient_scores_lowest_and_reset_clears(name):
    model = tiny_net()
    criterion = attached(name, model)
    silent = torch.ones(8)
    silent[2] = 0.0  # channel 2's filter never receives a gradient
    for seed in (1, 2, 3):
        set_grads(model, seed, scale=lambda layer: silent if layer == "stem" else torch.ones(6))
        criterion.update(model)
    scores = criterion.scores(model)
    assert criterion.num_updates == 3
    assert scores["stem"][2] == 0 and scores["stem"].argmin() == 2
    assert (scores["stem"][torch.arange(8) != 2] > 0).all()
    criterion.reset()
    assert criterion.num_updates == 0 and torch.equal(criterion.scores(model)["stem"], torch.zeros(8))


def test_pgp_sums_signed_gradients_so_oscillation_cancels_while_rpgp_sums_magnitudes():
    model = tiny_net()
    pgp, rpgp = attached("pgp", model), attached("rpgp", model)
    for iteration in range(4):
        set_grads(model, 11)  # the same gradient every iteration...
        if iteration % 2:
            model.stem.weight.grad[3] *= -1  # ...except channel 3's, which flips sign: no net change
        pgp.update(model)
        rpgp.update(model)
    pgp_scores, rpgp_scores = pgp.scores(model)["stem"], rpgp.scores(model)["stem"]
    assert pgp_scores[3] == pytest.approx(0.0, abs=1e-6) and pgp_scores.argmin() == 3
    assert rpgp_scores[3] > 0.5 * rpgp_scores.mean()  # its gradient magnitude is ordinary


def test_missing_or_non_finite_gradients_add_nothing():
    model = tiny_net()
    criterion = attached("pgp", model)
    set_grads(model, 1)
    criterion.update(model)
    before = criterion.state_dict()["sums"]
    model.left.weight.grad[0, 0, 0, 0] = float("inf")  # an iteration the AMP grad scaler skips
    model.right.weight.grad = None
    criterion.update(model)
    after = criterion.state_dict()["sums"]
    for group in before:
        for layer in before[group]:
            assert torch.equal(before[group][layer], after[group][layer])


@torch.no_grad()
def test_taylor_sums_signed_products_before_the_absolute_value():
    model = tiny_net()
    model.stem.weight.fill_(0.5)
    criterion = attached("taylor", model)
    rpgp = attached("rpgp", model)
    direction = torch.ones(8)
    direction[1] = -1.0  # w . g < 0 at every iteration: same |score| as a positive channel
    for iteration in range(2):
        flip = torch.ones(8)
        flip[0] = -1.0 if iteration else 1.0  # channel 0: +w.g then -w.g, which cancel
        set_grads(model, 5)
        model.stem.weight.grad = model.stem.weight * (direction * flip)[:, None, None, None]
        criterion.update(model)
        rpgp.update(model)
    scores = criterion.scores(model)["stem"]
    assert scores[0] == 0 and scores.argmin() == 0
    assert torch.allclose(scores[1:], torch.full((7,), 8 / 7))  # all equal, mean-normalised
    assert torch.allclose(rpgp.scores(model)["stem"], torch.ones(8))  # L1 of g does not cancel


# ---------------------------------------------------------------------------------------------
# extra pass (PGP)


def test_pgp_pass_sums_signed_gradients_and_leaves_the_model_untouched():
    model = tiny_net()
    model.eval()
    model.left.weight.grad = torch.full_like(model.left.weight, 7.0)  # a gradient from the trainer
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    criterion = attached("pgp_pass", model)

    # expected: per-filter L1 of the gradients summed over the two batches
    reference = copy.deepcopy(model).train()
    reference.zero_grad(set_to_none=True)
    batches = [make_batch(1), make_batch(2)]
    for batch in batches:
        reference(batch)["loss"].backward()  # .grad accumulates the signed sum
    criterion.run_extra_pass(model, iter(batches), 2)

    scores = criterion.scores(model)
    stem = row_norms(reference.stem.weight.grad, 1)
    left, right = row_norms(reference.left.weight.grad, 1), row_norms(reference.right.weight.grad, 1)
    assert torch.allclose(scores["stem"], stem / stem.mean(), rtol=1e-5)
    assert torch.allclose(scores["branches"], (left / left.mean() + right / right.mean()) / 2, rtol=1e-5)
    assert criterion.num_updates == 2
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n
        expected_grad = 7.0 if n == "left.weight" else None
        assert (p.grad is None) if expected_grad is None else bool((p.grad == 7.0).all()), n
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n  # BN running statistics restored
    assert not model.training


def test_pgp_pass_gradients_of_opposite_sign_cancel():
    model = tiny_net()
    criterion = attached("pgp_pass", model)
    criterion.run_extra_pass(model, [make_batch(4), make_batch(4, sign=-1.0)], 2)
    for scores in criterion.scores(model).values():
        assert torch.allclose(scores, torch.zeros_like(scores), atol=1e-6)


def test_pgp_pass_bad_requests():
    model = tiny_net()
    criterion = attached("pgp_pass", model)
    with pytest.raises(PruningRequestError, match="ran out after 1 of 3 batches"):
        criterion.run_extra_pass(model, [make_batch(1)], 3)
    with pytest.raises(PruningRequestError, match="num_batches >= 1"):
        criterion.run_extra_pass(model, [make_batch(1)], 0)
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# state and hard prunes


@pytest.mark.parametrize("name", ["pgp", "taylor", "pgp_pass"])  # frs: test_frs_relevance.py
def test_state_dict_round_trip_continues_identically(name):
    def step(criterion, model, seed):
        if name == "pgp_pass":
            criterion.run_extra_pass(model, [make_batch(seed)], 1)
        else:
            set_grads(model, seed)
        criterion.update(model)

    model = tiny_net()
    resumed_model = copy.deepcopy(model)
    original = attached(name, model)
    step(original, model, 1)
    state = original.state_dict()

    resumed = build_criterion(name)
    resumed.load_state_dict(state)  # before attach: applied when attached
    resumed.attach(resumed_model, tiny_groups())
    step(original, model, 2)
    step(resumed, resumed_model, 2)
    for group, values in original.scores(model).items():
        assert torch.equal(values, resumed.scores(resumed_model)[group]), group
    assert resumed.num_updates == original.num_updates == 2


def test_load_state_dict_rejects_another_criterion_or_model():
    model = tiny_net()
    pgp = attached("rpgp", model)
    with pytest.raises(PruningRequestError, match="criterion 'rpgp' into criterion 'taylor'"):
        attached("taylor", model).load_state_dict(pgp.state_dict())
    other = attached("rpgp", TwoBranchNet(stem=16), tiny_groups(stem=16))
    with pytest.raises(PruningRequestError, match=r"shape \(8,\), the model needs \(16,\)"):
        other.load_state_dict(pgp.state_dict())


def test_after_hard_prune_keeps_accumulators_aligned_with_surviving_channels():
    model = tiny_net()
    groups = tiny_groups()
    pgp, extra = attached("rpgp", model), attached("pgp_pass", model)
    # rpgp sums: channel c of the branches gets c + 1 in both layers, stem channel c gets 10 c
    ramp = lambda name: torch.arange(1.0, 7.0) if name != "stem" else torch.arange(8.0) * 10  # noqa: E731
    with torch.no_grad():
        for name in ("stem", "left", "right"):
            weight = model.get_submodule(name).weight
            weight.grad = torch.ones_like(weight) * ramp(name)[:, None, None, None] / weight[0].numel()
    pgp.update(model)
    extra.run_extra_pass(model, [make_batch(2)], 1)

    removals = {"branches": [1, 4], "stem": [0, 6]}
    hard_prune(model, removals, groups=groups)
    after = tiny_groups(stem=6, branches=4)
    for criterion in (pgp, extra):
        criterion.after_hard_prune(after, removals)

    sums = pgp.state_dict()["sums"]
    assert torch.allclose(sums["branches"]["left"], torch.tensor([1.0, 3.0, 4.0, 6.0]))
    assert torch.allclose(sums["stem"]["stem"], torch.tensor([10.0, 20, 30, 40, 50, 70]))
    assert extra.num_updates == 0 and all(  # the extra pass's sums are reset
        not t.any() for layers in extra.state_dict()["sums"].values() for t in layers.values())
    # the criteria keep working on the smaller model: sizes match
    model.zero_grad(set_to_none=True)
    model(make_batch(3))["loss"].backward()
    pgp.update(model)
    assert pgp.scores(model)["branches"].shape == (4,)


def test_a_stale_criterion_fails_clearly():
    model = tiny_net()
    criterion = attached("rpgp", model)
    hard_prune(model, {"branches": [0]}, groups=tiny_groups())
    set_grads(model, 1)
    with pytest.raises(PruningRequestError, match="call after_hard_prune"):
        criterion.update(model)
    with pytest.raises(PruningRequestError, match="branches has 5 channels in the model but 6"):
        criterion.scores(model)
    with pytest.raises(PruningRequestError, match="out of range"):
        criterion.after_hard_prune(tiny_groups(branches=5), {"branches": [6]})


def test_scores_are_summed_over_processes(monkeypatch):
    """With a (simulated) second process holding its own sums, scores use the total; the local
    accumulators are left as they were."""
    model = tiny_net()
    criterion = attached("rpgp", model)
    set_grads(model, 1)
    criterion.update(model)
    local = criterion.state_dict()["sums"]
    peer = attached("rpgp", tiny_net())
    set_grads(peer._model, 2)
    peer.update(peer._model)
    monkeypatch.setattr(criteria_base.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(criteria_base.dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(criteria_base.dist, "all_reduce", lambda tensor: tensor.add_(peer._sums.flat))
    scores = criterion.scores(model)
    total = local["stem"]["stem"] + peer.state_dict()["sums"]["stem"]["stem"]
    assert torch.allclose(scores["stem"], total / total.mean())
    assert torch.equal(criterion.state_dict()["sums"]["stem"]["stem"], local["stem"]["stem"])


# ---------------------------------------------------------------------------------------------
# a real detector


def test_every_criterion_scores_every_prunable_group_of_a_detector():
    """R18-FPN, one training forward/backward: soft-pruned channels score exactly 0 wherever the
    criterion reads weights or activations (and frozen groups are not scored)."""
    from test_pruning_groups import build_detector
    from test_surgery_equivalence import make_training_input

    model = build_detector("R18-FPN")
    groups = derive_channel_groups(model)
    prunable = {name for name, group in groups.items() if group.prunable}
    zeroed = ["backbone.bottom_up.res3.stream", "backbone.bottom_up.res4.0.conv1", "backbone.fpn.out",
              "roi_heads.box_head.fc1"]
    for name in zeroed:
        soft_prune(model, groups[name], [3], mode="zero_path")  # the whole output 0, norms included
    criteria = {name: attached(name, model, groups) for name in ALL}
    model.train()
    torch.manual_seed(0)
    with EventStorage(0):
        losses = model([make_training_input()])
    sum(losses.values()).backward()
    for criterion in criteria.values():
        criterion.update(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    for criterion in criteria.values():
        if criterion.needs_extra_pass:
            torch.manual_seed(0)
            criterion.run_extra_pass(model, iter([[make_training_input()]]), 1)
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())

    norm_groups = {n for n in prunable if NormGammaCriterion.norm_slices(groups[n])}
    for name, criterion in criteria.items():
        scores = criterion.scores(model)
        assert set(scores) == prunable, name
        for group, values in scores.items():
            assert values.shape == (groups[group].size,) and torch.isfinite(values).all() and (values >= 0).all()
        for group in zeroed:
            if name in ("l1", "l2", "taylor", "frs") or (name == "bn_gamma" and group in norm_groups):
                # ties at 0 are possible (frs: ReLU units dead for every ROI of a random fc1, or
                # a FPN level no proposal of the image reaches)
                assert scores[group][3] == 0 == scores[group].min(), (name, group)
        assert scores["roi_heads.box_head.fc2"].max() > 0, name
