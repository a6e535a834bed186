"""The ``PRUNING`` settings of a config (keys added by :func:`pgp_det.config.add_pruning_config`):
checked at start-up, and read as per-scope ratios."""
from ..errors import UserInputError
from .allocation import ALLOCATION_REGISTRY
from .criteria import CRITERION_REGISTRY
from .groups import SCOPES
from .latency import DEVICE_KINDS, LatencyTable, target_latency_ms
from .loss_change import KNAPSACK_VALUES
from .surgery import SOFT_MODES
from .schedules import SCHEDULE_REGISTRY, resolve_pruning_iterations

__all__ = ["check_latency_settings", "check_pruning_config", "latency_table_at_test_settings", "pruning_scope_ratios"]


def pruning_scope_ratios(cfg) -> dict:
    """``{scope: final ratio}`` for every scope in ``PRUNING.SCOPES`` (``SCOPE_RATIOS`` applied)."""
    ratios = {scope: float(cfg.PRUNING.RATIO) for scope in cfg.PRUNING.SCOPES}
    ratios.update({scope: float(ratio) for scope, ratio in cfg.PRUNING.SCOPE_RATIOS})
    return ratios


def check_latency_settings(cfg):
    """Check ``TARGET "latency"``'s keys and load the table: ``LATENCY_TABLE`` names a readable
    table measured at ``COST_INPUT_SIZE`` on a ``LATENCY_DEVICE`` device (when set), and exactly
    one of ``TARGET_LATENCY_MS`` and ``TARGET_FPS`` is > 0. Whether the table fits the model is
    checked where the model is built (the hook's ``before_train``, ``tools/prune_net.py``).

    Returns:
        ``(table, target milliseconds)``.

    Raises:
        UserInputError: one line naming the bad key.
    """
    p = cfg.PRUNING
    if p.LATENCY_DEVICE not in ("",) + DEVICE_KINDS:
        raise UserInputError(f"PRUNING.LATENCY_DEVICE = {p.LATENCY_DEVICE!r} is invalid: use 'cpu', 'cuda' or '' (any)")
    if not p.LATENCY_TABLE:
        raise UserInputError(
            "PRUNING.LATENCY_TABLE is empty: TARGET 'latency' needs a table made by tools/profile_latency.py on the "
            "device the model will run on"
        )
    try:
        target = target_latency_ms(float(p.TARGET_LATENCY_MS), float(p.TARGET_FPS))
    except UserInputError as e:
        raise UserInputError(f"PRUNING.TARGET_LATENCY_MS = {p.TARGET_LATENCY_MS!r}, PRUNING.TARGET_FPS = "
                             f"{p.TARGET_FPS!r} are invalid: {e}") from None
    table = LatencyTable.load(p.LATENCY_TABLE)
    if tuple(p.COST_INPUT_SIZE) != table.input_size:
        height, width = table.input_size
        raise UserInputError(
            f"PRUNING.COST_INPUT_SIZE = {tuple(p.COST_INPUT_SIZE)} is invalid: the latency table {p.LATENCY_TABLE} "
            f"was measured at {height}x{width}; set PRUNING.COST_INPUT_SIZE ({height}, {width}) or profile at the "
            "size you want"
        )
    if p.LATENCY_DEVICE and p.LATENCY_DEVICE != table.device_kind:
        raise UserInputError(
            f"PRUNING.LATENCY_DEVICE = {p.LATENCY_DEVICE!r} is invalid: the latency table {p.LATENCY_TABLE} was "
            f"measured on {table.device_kind} ({table.metadata.get('device_name', '?')}); profile on the device the "
            "model will run on"
        )
    return table, target


def latency_table_at_test_settings(cfg, table: LatencyTable, source: str):
    """Bind a latency table to the proposal count the config tests with
    (``MODEL.RPN.POST_NMS_TOPK_TEST``), and say where the config leaves the ground it was measured on.

    Args:
        source: how the table is named in the warnings (its path).

    Returns:
        ``(table at that proposal count, [warning lines])``: a count outside the table's is
        extrapolated; an ``INPUT.MIN_SIZE_TEST`` other than the shorter side of the table's input
        size means the budget holds at a size the model is not tested at; a
        ``MODEL.RPN.PRE_NMS_TOPK_TEST`` or ``TEST.DETECTIONS_PER_IMAGE`` other than the one the
        table was profiled with (when it recorded them) means its fixed part is another one; a
        table profiled on a CPU whose whole model faulted many pages in per inference, without
        freed memory kept, may miss by their time (:mod:`~pgp_det.utils.allocator`).
    """
    warnings = []
    for key, value, recorded in (("MODEL.RPN.PRE_NMS_TOPK_TEST", cfg.MODEL.RPN.PRE_NMS_TOPK_TEST, "pre_nms_topk_test"),
                                 ("TEST.DETECTIONS_PER_IMAGE", cfg.TEST.DETECTIONS_PER_IMAGE, "detections_per_image")):
        profiled = table.metadata.get(recorded)
        if profiled is not None and int(profiled) != int(value):
            # these set the work of proposal selection and of the final NMS, the table's fixed part
            warnings.append(f"{key} {value} differs from the {int(profiled)} latency table {source} was profiled "
                            "with: its fixed part (proposal selection, NMS) is that of the profiled value; "
                            f"profile with {key} {value}")
    proposals = int(cfg.MODEL.RPN.POST_NMS_TOPK_TEST)
    if not table.proposal_counts[0] <= proposals <= table.proposal_counts[-1]:
        warnings.append(f"MODEL.RPN.POST_NMS_TOPK_TEST {proposals} is outside the proposal counts "
                        f"{list(table.proposal_counts)} of latency table {source}: its proposal-dependent parts "
                        "are extrapolated")
    shorter = int(cfg.INPUT.MIN_SIZE_TEST)
    if shorter > 0 and shorter != min(table.input_size):
        # detectron2 resizes test images' shorter side to MIN_SIZE_TEST: the budget is then met at another size
        height, width = table.input_size
        warnings.append(f"latency table {source} was measured at {height}x{width}, but INPUT.MIN_SIZE_TEST {shorter} "
                        f"resizes test images' shorter side to {shorter}: the latency target holds at the table's "
                        "size, not at the tested one; profile at the size the model will be deployed at")
    faults = table.page_fault_warning(source)
    if faults:
        warnings.append(faults)
    return table.with_proposals(proposals), warnings


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

    if p.TARGET not in ("ratio", "flops", "latency"):
        fail("TARGET", p.TARGET, "use 'ratio', 'flops' or 'latency'")
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
    if p.TARGET != "ratio" and p.SCOPE_RATIOS:
        fail("SCOPE_RATIOS", p.SCOPE_RATIOS, "per-scope ratios apply to TARGET 'ratio' only")
    if p.TARGET == "latency":
        check_latency_settings(cfg)
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
