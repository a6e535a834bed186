"""Pruning-rate schedules reach their target exactly, never go back, and reject bad arguments."""
import math

import pytest

from pgp_det.pruning import PruningRequestError
from pgp_det.pruning.schedules import SCHEDULE_REGISTRY, pruned_fraction, pruning_iterations

NAMES = sorted(name for name, _ in SCHEDULE_REGISTRY)


def test_registered_schedules():
    assert NAMES == ["cubic", "linear", "pgp_exponential", "pgp_exponential_shifted", "psfp"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("num_steps", [1, 2, 7, 40])
@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.5, 0.9, 0.99])
def test_schedule_starts_at_zero_grows_and_ends_exactly_at_the_target(name, num_steps, ratio):
    values = [pruned_fraction(name, k, num_steps, ratio) for k in range(num_steps + 1)]
    assert values[0] == 0.0
    assert values[-1] == ratio  # exactly, not approximately: the last step hits the target
    assert all(b >= a for a, b in zip(values, values[1:])), values
    assert all(0.0 <= v <= ratio for v in values)


@pytest.mark.parametrize("ratio,num_steps", [(0.5, 5), (0.7, 12), (0.3, 3)])
def test_pgp_exponential_keeps_c0_exp_minus_lambda_k(ratio, num_steps):
    lam = -math.log(1.0 - ratio) / num_steps
    c0 = 256
    for k in range(num_steps + 1):
        kept = c0 * (1.0 - pruned_fraction("pgp_exponential", k, num_steps, ratio))
        assert kept == pytest.approx(c0 * math.exp(-lam * k), rel=1e-12)
    # the kept fraction shrinks by the same factor every step
    kept = [1.0 - pruned_fraction("pgp_exponential", k, num_steps, ratio) for k in range(num_steps + 1)]
    factors = [b / a for a, b in zip(kept, kept[1:])]
    assert factors == pytest.approx([math.exp(-lam)] * num_steps)


@pytest.mark.parametrize("ratio,num_steps", [(0.5, 6), (0.7, 12), (0.3, 3)])
def test_shifted_exponential_is_the_authors_loop(ratio, num_steps):
    """The authors' loop (epochs 1..E, keep C0 exp(-lambda (epoch + 1)), never below the target)
    gives the same kept counts, and prunes at least as hard as the paper's indexing at every step."""
    c0, lam = 256, -math.log(1.0 - ratio) / num_steps
    target_kept = c0 * (1.0 - ratio)
    for epoch in range(1, num_steps + 1):
        kept_by_loop = max(c0 * math.exp(-lam * (epoch + 1)), target_kept)
        kept = c0 * (1.0 - pruned_fraction("pgp_exponential_shifted", epoch, num_steps, ratio))
        assert kept == pytest.approx(kept_by_loop, rel=1e-12)
        assert pruned_fraction("pgp_exponential_shifted", epoch, num_steps, ratio) >= pruned_fraction(
            "pgp_exponential", epoch, num_steps, ratio)
    # one step ahead of the paper's indexing, at the target one step early
    assert pruned_fraction("pgp_exponential_shifted", 1, num_steps, ratio) == pytest.approx(
        pruned_fraction("pgp_exponential", 2, num_steps, ratio))
    assert pruned_fraction("pgp_exponential_shifted", num_steps - 1, num_steps, ratio) == pytest.approx(ratio)


def test_other_schedules_follow_their_formulas():
    assert pruned_fraction("linear", 3, 10, 0.5) == pytest.approx(0.15)
    assert pruned_fraction("cubic", 5, 10, 0.8) == pytest.approx(0.8 * (1 - 0.5 ** 3))
    decay = -math.log(0.147) / 10
    scale = 0.6 / (math.exp(-decay * 10) - 1)
    assert pruned_fraction("psfp", 4, 10, 0.6) == pytest.approx(scale * (math.exp(-decay * 4) - 1))
    # PSFP front-loads: most of the way is covered early
    assert pruned_fraction("psfp", 5, 10, 0.6) > pruned_fraction("linear", 5, 10, 0.6)


@pytest.mark.parametrize("args,message", [
    ((1, 0, 0.5), "num_steps must be an integer >= 1"),
    ((-1, 5, 0.5), r"step must be an integer in 0..5"),
    ((6, 5, 0.5), r"step must be an integer in 0..5"),
    ((1.5, 5, 0.5), r"step must be an integer"),
    ((1, 5, 1.0), r"ratio must be in \[0, 1\)"),
    ((1, 5, -0.1), r"ratio must be in \[0, 1\)"),
    ((1, 5, float("nan")), r"ratio must be in \[0, 1\)"),
])
@pytest.mark.parametrize("name", NAMES)
def test_bad_schedule_arguments_raise(name, args, message):
    with pytest.raises(PruningRequestError, match=message):
        pruned_fraction(name, *args)


def test_unknown_schedule_names_the_known_ones():
    known = "known: cubic, linear, pgp_exponential, pgp_exponential_shifted, psfp"
    with pytest.raises(PruningRequestError, match=f"unknown pruning schedule 'exp'; {known}"):
        pruned_fraction("exp", 1, 5, 0.5)


def test_pruning_iterations_end_exactly_at_end_iter():
    assert pruning_iterations(0, 100, 30) == [0, 30, 60, 90, 100]
    assert pruning_iterations(0, 90, 30) == [0, 30, 60, 90]  # end not repeated
    assert pruning_iterations(10, 12, 5) == [10, 12]
    assert pruning_iterations(5, 5, 1) == [5]
    for start, end, interval in [(3, 1000, 7), (0, 1, 1), (100, 350, 50)]:
        iters = pruning_iterations(start, end, interval)
        assert iters[0] == start and iters[-1] == end and iters == sorted(set(iters))
        assert all(b - a <= interval for a, b in zip(iters, iters[1:]))


@pytest.mark.parametrize("args", [(0, 10, 0), (10, 5, 1), (-1, 5, 1), (0, 10.5, 2), (0, 10, True)])
def test_bad_pruning_iterations_raise(args):
    with pytest.raises(PruningRequestError):
        pruning_iterations(*args)
