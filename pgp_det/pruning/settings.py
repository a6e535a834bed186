"""The ``PRUNING`` settings of a config (keys added by :func:`pgp_det.config.add_pruning_config`):
checked at start-up, and read as per-scope ratios."""
from ..errors import UserInputError
from .allocation import ALLOCATION_REGISTRY
from .criteria import CRITERION_REGISTRY
from .groups import SCOPES
from .loss_change import KNAPSACK_VALUES
from .surgery import SOFT_MODES
from .schedules import SCHEDULE_REGISTRY, resolve_pruning_iterations
from .target import TARGET_KINDS

__all__ = ["check_pruning_config"]


def _registry_names(registry) -> list:
    return sorted(name for name, _ in registry)


def check_pruning_config(cfg) -> None:
    """Validate ``cfg.PRUNING`` before training starts.

    Raises:
        UserInputError: one line naming the bad key, its value and what is accepted.
    """
    p = cfg.PRUNING
    if not p.ENABLED:
        return

    def fail(key, value, accepted):
        raise UserInputError(f"PRUNING.{key} = {value!r} is invalid: {accepted}")

    if p.TARGET not in TARGET_KINDS:
        kinds = [repr(kind) for kind in TARGET_KINDS]
        fail("TARGET", p.TARGET, f"use {', '.join(kinds[:-1])} or {kinds[-1]}")
    if not 0.0 <= p.RATIO < 1.0:
        fail("RATIO", p.RATIO, "use a fraction in [0, 1)")
    if not 0.0 < p.FLOPS_REDUCTION < 1.0:
        fail("FLOPS_REDUCTION", p.FLOPS_REDUCTION, "use a fraction in (0, 1)")
    if len(p.COST_INPUT_SIZE) != 2 or min(p.COST_INPUT_SIZE) < 32:
        fail("COST_INPUT_SIZE", p.COST_INPUT_SIZE, "use (height, width), each >= 32")
    if not p.SCOPES:
        fail("SCOPES", p.SCOPES, f"name at least one of {SCOPES}")
    for scope in p.SCOPES:
        if scope not in SCOPES:
            fail("SCOPES", scope, f"scopes are {SCOPES}")
    for entry in p.SCOPE_RATIOS:
        if len(entry) != 2 or entry[0] not in p.SCOPES:
            fail("SCOPE_RATIOS", entry, f"use (scope, ratio) pairs with a scope in PRUNING.SCOPES {tuple(p.SCOPES)}")
        if not 0.0 <= float(entry[1]) < 1.0:
            fail("SCOPE_RATIOS", entry, "ratios are fractions in [0, 1)")
    TARGET_KINDS[p.TARGET].check_config(cfg)
    for key, registry in (("CRITERION", CRITERION_REGISTRY), ("SCHEDULE", SCHEDULE_REGISTRY),
                          ("ALLOCATION", ALLOCATION_REGISTRY)):
        value = p.get(key)
        if value not in registry:
            fail(key, value, f"known: {', '.join(_registry_names(registry))}")
    if p.CRITERION in ("pgp_pass", "frs") and p.EXTRA_PASS_BATCHES < 1:
        fail("EXTRA_PASS_BATCHES", p.EXTRA_PASS_BATCHES, f"the {p.CRITERION} criterion needs an extra pass of >= 1 batch")
    if p.KNAPSACK_VALUE not in KNAPSACK_VALUES:
        fail("KNAPSACK_VALUE", p.KNAPSACK_VALUE, f"use one of {', '.join(KNAPSACK_VALUES)}")
    if not 0.0 <= p.PROTECT_QUANTILE < 1.0:
        fail("PROTECT_QUANTILE", p.PROTECT_QUANTILE, "use a quantile in [0, 1); 0 disables protection")
    if p.UNIT not in ("iter", "epoch"):
        fail("UNIT", p.UNIT, "use 'iter' or 'epoch'")
    if p.START < 0:
        fail("START", p.START, "use a value >= 0")
    if p.END != -1 and p.END < p.START:
        fail("END", p.END, f"must be >= PRUNING.START ({p.START}), or -1 for 3/4 of SOLVER.MAX_ITER")
    if p.INTERVAL != -1 and p.INTERVAL <= 0:
        fail("INTERVAL", p.INTERVAL, "use a positive interval, or -1 for a tenth of END - START")
    if not 0.0 <= p.REMOVE_RATIO <= 1.0:
        fail("REMOVE_RATIO", p.REMOVE_RATIO, "use a fraction in [0, 1]")
    if p.SOFT_MODE not in SOFT_MODES:
        fail("SOFT_MODE", p.SOFT_MODE, "use 'pgp' (zero filters and their momentum; they may recover), 'sfp' (zero "
             "filters, keep momentum) or 'zero_path' (zero filter, bias, norm and momentum: the PGP authors' code)")
    if p.CHANNEL_MULTIPLE < 1:
        fail("CHANNEL_MULTIPLE", p.CHANNEL_MULTIPLE, "use an integer >= 1")
    if p.MIN_CHANNELS < 1:
        fail("MIN_CHANNELS", p.MIN_CHANNELS, "use an integer >= 1")
    if p.UNIT == "iter":
        try:
            resolve_pruning_iterations(cfg)
        except ValueError as e:
            raise UserInputError(f"{e} (SOLVER.MAX_ITER is {cfg.SOLVER.MAX_ITER})") from None
