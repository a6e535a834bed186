"""The ``PRUNING`` settings of a config (keys added by :func:`pgp_det.config.add_pruning_config`):
checked at start-up, and read as per-scope ratios."""
from ..errors import UserInputError
from .allocation import ALLOCATION_REGISTRY, KNAPSACK_OBJECTIVES
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

    if p.TARGET.KIND not in TARGET_KINDS:
        kinds = [repr(kind) for kind in TARGET_KINDS]
        renamed = " ('ratio' is now 'channels')" if p.TARGET.KIND == "ratio" else ""
        fail("TARGET.KIND", p.TARGET.KIND, f"use {', '.join(kinds[:-1])} or {kinds[-1]}{renamed}")
    if not 0.0 <= p.TARGET.CHANNELS.RATIO < 1.0:
        fail("TARGET.CHANNELS.RATIO", p.TARGET.CHANNELS.RATIO, "use a fraction in [0, 1)")
    if not 0.0 < p.TARGET.FLOPS.REDUCTION < 1.0:
        fail("TARGET.FLOPS.REDUCTION", p.TARGET.FLOPS.REDUCTION, "use a fraction in (0, 1)")
    if len(p.TARGET.FLOPS.INPUT_SIZE) != 2 or min(p.TARGET.FLOPS.INPUT_SIZE) < 32:
        fail("TARGET.FLOPS.INPUT_SIZE", p.TARGET.FLOPS.INPUT_SIZE, "use (height, width), each >= 32")
    if not p.SCOPES:
        fail("SCOPES", p.SCOPES, f"name at least one of {SCOPES}")
    for scope in p.SCOPES:
        if scope not in SCOPES:
            fail("SCOPES", scope, f"scopes are {SCOPES}")
    for entry in p.TARGET.CHANNELS.SCOPE_RATIOS:
        if len(entry) != 2 or entry[0] not in p.SCOPES:
            fail("TARGET.CHANNELS.SCOPE_RATIOS", entry, f"use (scope, ratio) pairs with a scope in PRUNING.SCOPES {tuple(p.SCOPES)}")
        if not 0.0 <= float(entry[1]) < 1.0:
            fail("TARGET.CHANNELS.SCOPE_RATIOS", entry, "ratios are fractions in [0, 1)")
    TARGET_KINDS[p.TARGET.KIND].check_config(cfg)
    for key, registry in (("CRITERION", CRITERION_REGISTRY), ("SCHEDULE", SCHEDULE_REGISTRY),
                          ("ALLOCATION", ALLOCATION_REGISTRY)):
        value = p.get(key).NAME
        if value not in registry:
            fail(f"{key}.NAME", value, f"known: {', '.join(_registry_names(registry))}")
    if p.CRITERION.NAME in ("pgp_pass", "frs") and p.CRITERION.EXTRA_PASS_BATCHES < 1:
        fail("CRITERION.EXTRA_PASS_BATCHES", p.CRITERION.EXTRA_PASS_BATCHES,
             f"the {p.CRITERION.NAME} criterion needs an extra pass of >= 1 batch")
    if p.ALLOCATION.KNAPSACK_VALUE not in KNAPSACK_VALUES:
        fail("ALLOCATION.KNAPSACK_VALUE", p.ALLOCATION.KNAPSACK_VALUE, f"use one of {', '.join(KNAPSACK_VALUES)}")
    if p.ALLOCATION.KNAPSACK_OBJECTIVE not in KNAPSACK_OBJECTIVES:
        fail("ALLOCATION.KNAPSACK_OBJECTIVE", p.ALLOCATION.KNAPSACK_OBJECTIVE,
             f"use one of {', '.join(KNAPSACK_OBJECTIVES)}")
    if not 0.0 <= p.ALLOCATION.PROTECT_QUANTILE < 1.0:
        fail("ALLOCATION.PROTECT_QUANTILE", p.ALLOCATION.PROTECT_QUANTILE, "use a quantile in [0, 1); 0 disables protection")
    if p.SCHEDULE.UNIT not in ("iter", "epoch"):
        fail("SCHEDULE.UNIT", p.SCHEDULE.UNIT, "use 'iter' or 'epoch'")
    if p.SCHEDULE.START < 0:
        fail("SCHEDULE.START", p.SCHEDULE.START, "use a value >= 0")
    if p.SCHEDULE.END != -1 and p.SCHEDULE.END < p.SCHEDULE.START:
        fail("SCHEDULE.END", p.SCHEDULE.END,
             f"must be >= PRUNING.SCHEDULE.START ({p.SCHEDULE.START}), or -1 for 3/4 of SOLVER.MAX_ITER")
    if p.SCHEDULE.INTERVAL != -1 and p.SCHEDULE.INTERVAL <= 0:
        fail("SCHEDULE.INTERVAL", p.SCHEDULE.INTERVAL, "use a positive interval, or -1 for a tenth of END - START")
    if not 0.0 <= p.SOFT.REMOVE_RATIO <= 1.0:
        fail("SOFT.REMOVE_RATIO", p.SOFT.REMOVE_RATIO, "use a fraction in [0, 1]")
    if p.SOFT.MODE not in SOFT_MODES:
        fail("SOFT.MODE", p.SOFT.MODE, "use 'pgp' (zero filters and their momentum; they may recover), 'sfp' (zero "
             "filters, keep momentum) or 'zero_path' (zero filter, bias, norm and momentum: the PGP authors' code)")
    if p.ROUNDING.MULTIPLE < 1:
        fail("ROUNDING.MULTIPLE", p.ROUNDING.MULTIPLE, "use an integer >= 1")
    if p.ROUNDING.MIN_CHANNELS < 1:
        fail("ROUNDING.MIN_CHANNELS", p.ROUNDING.MIN_CHANNELS, "use an integer >= 1")
    if p.SCHEDULE.UNIT == "iter":
        try:
            resolve_pruning_iterations(cfg)
        except ValueError as e:
            raise UserInputError(f"{e} (SOLVER.MAX_ITER is {cfg.SOLVER.MAX_ITER})") from None
