"""What ``tools/profile_latency.py`` does below its argument parsing
(:func:`run_profile_command`): check the arguments, build the config and the model, profile a
table (:func:`~pgp_det.benchmark.latency.profile.profile_latency`) or take the one ``--table`` names, check
it against the device (:func:`~pgp_det.benchmark.latency.check.check_latency`) and write it.

Bad input raises :class:`~pgp_det.errors.UserInputError` (one line) before anything is written.
"""
import json
import os
import sys
import time
from typing import Optional

import torch

from ..benchmark.measure import check_device_options, fixed_size_images
from ..checkpoint import load_model
from ..data import check_dataset_available, register_custom_datasets
from .preflight import build_run_config
from ..errors import UserInputError
from ..pruning.dependency import derive_channel_groups
from ..utils.allocator import keep_freed_memory
from ..utils.cli import parse_input_size
from ..utils.output_dir import claim_output_dir
from ..utils.weights import check_weights_available
from ..benchmark.latency.check import check_latency
from ..latency.io import load_table, save_table
from ..latency.page_faults import check_freed_memory_setting
from ..benchmark.latency.profile import profile_latency
from ..benchmark.latency.settings import ProfileSettings
from ..latency.table import LatencyTable
from ..benchmark.latency.timers import Timer, Timing, default_timer, wall_clock_ms

__all__ = ["PROFILING_DEFAULTS", "check_profile_args", "parse_numbers", "profile_images", "run_profile_command"]

# options that set how a table is profiled (``--proposals ""``: a quarter, half and all of the config's count)
PROFILING_DEFAULTS = {"points": 5, "proposals": "", "passes": 1}


def parse_numbers(text: str, option: str, kind=int) -> list:
    """``"1,2,3"`` -> ``[1, 2, 3]`` (``kind`` each); one line naming ``option`` when it is not that."""
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserInputError(f"{option} '{text}': expected comma-separated numbers") from None
    if not values:
        raise UserInputError(f"{option} '{text}' names no value")
    return values


def check_profile_args(args) -> None:
    """Reject bad arguments of ``tools/profile_latency.py`` before anything is loaded (the config is
    checked by :func:`~pgp_det.engine.preflight.build_run_config`); with ``--table``, read that
    table (``args.table_to_check``) and take its input size."""
    check_device_options(args.device, args.fp16)
    args.table_to_check = _table_to_check(args) if args.table else None
    for name, default in PROFILING_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if not args.input_size:
        raise UserInputError("--input-size HxW is required (the size the model will run at), unless --table gives it")
    parse_input_size(args.input_size)
    if args.points < 2:
        raise UserInputError(f"--points {args.points}: time at least 2 widths per axis")
    if args.runs < 1 or args.passes < 1 or args.warmup < 0 or args.threads < 0:
        raise UserInputError("--runs and --passes must be >= 1; --warmup and --threads >= 0")
    if args.images < 1:
        raise UserInputError(f"--images {args.images}: profile on at least 1 image")
    if args.check_weights and not args.check:
        raise UserInputError("--check-weights is used with --check")
    for path in args.check_weights:
        check_weights_available(path)
    if args.proposals and min(parse_numbers(args.proposals, "--proposals")) < 1:
        raise UserInputError(f"--proposals '{args.proposals}': proposal counts are >= 1")
    if any(not 0.0 <= r < 1.0 for r in parse_numbers(args.check_ratios, "--check-ratios", float)):
        raise UserInputError(f"--check-ratios '{args.check_ratios}': ratios are fractions in [0, 1)")
    if os.path.isdir(args.output):
        raise UserInputError(f"--output '{args.output}' is a folder: give the table's file name, e.g. table.json")
    if os.path.exists(args.output) and not args.overwrite:
        raise UserInputError(f"'{args.output}' already exists: pass --overwrite to replace it, or choose another --output")


def _table_to_check(args) -> LatencyTable:
    """The table ``--table`` names, refused unless this run would check it as it was profiled
    (input size, precision, freed memory kept); the other options follow from it."""
    profiling_only = [f"--{name}" for name in PROFILING_DEFAULTS if getattr(args, name) is not None]
    if profiling_only:
        raise UserInputError(f"{', '.join(profiling_only)} set how a table is profiled; --table checks the one "
                             f"it names as it is: drop {', '.join(profiling_only)}, or profile without --table")
    table = load_table(args.table)
    size = f"{table.input_size[0]}x{table.input_size[1]}"
    if args.input_size and parse_input_size(args.input_size) != table.input_size:
        raise UserInputError(f"--input-size {args.input_size}: the table {args.table} was profiled at {size}; "
                             f"leave --input-size out to check it there")
    args.input_size = size
    precision = "fp16" if args.fp16 else "fp32"
    if table.metadata.get("precision") != precision:
        raise UserInputError(f"the table {args.table} was profiled in {table.metadata.get('precision')}, this check "
                             f"would run in {precision}: {'drop' if args.fp16 else 'pass'} --fp16")
    check_freed_memory_setting(table.metadata, args.keep_freed_memory, f"the table {args.table}", "this check would run")
    args.check = True
    return table


def profile_images(cfg, args):
    """``(images, where from)``: the ``--images`` images to profile on: the first ones of the
    config's test set stretched to ``--input-size``, or noise images with ``--noise-images`` or
    when the set is not at hand."""
    size = parse_input_size(args.input_size)
    dataset = cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else None
    reason = "--noise-images" if args.noise_images else "" if dataset else "the config has no DATASETS.TEST"
    if not reason:
        register_custom_datasets(cfg)
        try:
            check_dataset_available(dataset)
        except UserInputError as e:
            reason = f"{dataset} is not at hand ({e})"
    if reason:
        print(f"profiling on {args.images} noise images: {reason}", file=sys.stderr)
        return fixed_size_images(None, size, args.images), "noise"
    return fixed_size_images(dataset, size, args.images), dataset


def run_profile_command(args, configs_dir: str, timer: Optional[Timer] = None) -> LatencyTable:
    """Do what ``args`` (``tools/profile_latency.py``'s) ask: check them, build the config (inside
    ``configs_dir`` for ``--config``), set the threads and keep freed memory as asked, profile a
    table or take ``--table``'s, check it with ``--check`` and write it to ``--output``.
    ``timer``: ``fn -> ms`` replacing real timing (tests); then the element-wise work is weighed
    by the elements written, not by a clock.

    Raises:
        UserInputError: bad arguments, config, weights or table (one line), with nothing written.
    """
    check_profile_args(args)
    cfg = build_run_config(args.config, args.config_file, configs_dir, args.opts)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.keep_freed_memory:
        keep_freed_memory()
    with claim_output_dir(os.path.dirname(os.path.abspath(args.output)), "--output") as output:
        table = _profile_or_check(cfg, args, timer)
        output.start_writing()
        save_table(table, args.output)
    return table


def _weights(cfg, args) -> str:
    """The weights to load (``--weights``, else ``MODEL.WEIGHTS``; "" for random ones), refused
    with ``--table`` unless of the kind the table was profiled with."""
    weights = cfg.MODEL.WEIGHTS if args.weights is None else args.weights
    if weights:
        weights = check_weights_available(weights)
    profiled_with = args.table_to_check.metadata.get("weights") if args.table else None
    if profiled_with is not None and bool(profiled_with) != bool(weights):
        # a random and a trained model differ in proposal boxes and detections, which set the
        # pooler's and the post-processing's time: the share column would compare other models
        described = {True: "trained weights", False: "randomly initialised weights"}
        fix = f"--weights {profiled_with}" if profiled_with else "--weights ''"
        raise UserInputError(f"the table {args.table} was profiled with {described[bool(profiled_with)]}, this check "
                             f"would time the unpruned model with {described[bool(weights)]}: pass {fix}")
    return weights


def _check_table_fits(table: LatencyTable, cfg, model, args) -> None:
    """Refuse to check ``table`` on a model, device or test-time settings it was not profiled with."""
    table.check_compatible(derive_channel_groups(model, allow_frozen=True), table.input_size, args.device)
    for key, name, now in (("pre_nms_topk_test", "MODEL.RPN.PRE_NMS_TOPK_TEST", cfg.MODEL.RPN.PRE_NMS_TOPK_TEST),
                           ("detections_per_image", "TEST.DETECTIONS_PER_IMAGE", cfg.TEST.DETECTIONS_PER_IMAGE)):
        profiled = table.metadata.get(key)
        if profiled is not None and profiled != int(now):
            raise UserInputError(f"the table {args.table} was profiled with {name} {profiled}, the config has {now}: "
                                 f"pass {name} {profiled} to check it there")


def _profile_or_check(cfg, args, timer: Optional[Timer] = None) -> LatencyTable:
    """Build the model and measure its table (and the check rows); nothing is written."""
    weights = _weights(cfg, args)
    cpu = cfg.clone()
    cpu.defrost()
    cpu.MODEL.DEVICE = "cpu"  # built on the CPU, measured on --device
    model = load_model(cpu, weights, strict=False, trusted=args.trust_weights)
    checked = {path: load_model(cpu, path, strict=False, trusted=args.trust_weights) for path in args.check_weights}
    images, source = profile_images(cfg, args)
    timing = Timing(
        args.device, "fp16" if args.fp16 else "fp32",
        timer=timer or default_timer(args.device, warmup=args.warmup, runs=args.runs),
        # whole models that are compared (other proposal counts, the calibration copies, the
        # check's models) are timed in --runs interleaved rounds, one call each a round after a
        # warm-up call: see time_interleaved
        whole_timer=timer or default_timer(args.device, warmup=1, runs=1), rounds=args.runs,
        # the host's clock weighs the element-wise work between a CPU's layers; a GPU's is counted
        clock=wall_clock_ms if timer is None and args.device == "cpu" else None,
    )
    multiple, floor = int(cfg.PRUNING.ROUNDING.MULTIPLE), int(cfg.PRUNING.ROUNDING.MIN_CHANNELS)
    if args.table:
        table = args.table_to_check
        _check_table_fits(table, cfg, model, args)
    else:
        settings = ProfileSettings(
            points=args.points, multiple=multiple, floor=floor,
            proposal_counts=parse_numbers(args.proposals, "--proposals") if args.proposals else None,
            layer_repeat=10 if args.device == "cuda" else 1, passes=args.passes)
        metadata = {
            "config": args.config or args.config_file, "weights": weights, "overrides": list(args.opts),
            "images_from": source,
            "warmup": args.warmup, "runs": args.runs,
            "pre_nms_topk_test": int(cfg.MODEL.RPN.PRE_NMS_TOPK_TEST),
            "detections_per_image": int(cfg.TEST.DETECTIONS_PER_IMAGE),
        }
        table = profile_latency(model, parse_input_size(args.input_size), settings, timing, images=images,
                                metadata=metadata, progress=lambda line: print(line, file=sys.stderr, flush=True))
    if args.check:
        started = time.perf_counter()
        rows = check_latency(model, table, parse_numbers(args.check_ratios, "--check-ratios", float), timing,
                             trained=checked, multiple=multiple, floor=floor, images=images)
        for row in rows:
            if "label" in row:
                row.update(latency_target_of(row["label"]))
        table.metadata["check"] = [{k: v for k, v in row.items() if k != "widths"} for row in rows]
        table.metadata["check_seconds"] = time.perf_counter() - started
    return table


# the records beside a pruned checkpoint that say which latency it was pruned to: a training run's
# log (PGPHook) and one-shot pruning's report
_TARGET_RECORDS = (("pruning_log.json", "unpruned_ms"), ("pruning_report.json", "before_ms"))


def latency_target_of(weights: str) -> dict:
    """The latency target the checkpoint ``weights`` was pruned to, read from the run's record in
    its folder (``pruning_log.json`` of training, ``pruning_report.json`` of one-shot pruning):
    ``{"target_ms", "target_share"}`` (the target over the unpruned model's prediction, the share
    a check measures against), or ``{}`` when no record names a latency target."""
    folder = os.path.dirname(os.path.abspath(weights))
    for name, unpruned_key in _TARGET_RECORDS:
        path = os.path.join(folder, name)
        try:
            with open(path) as f:
                latency = json.load(f).get("latency") or {}
        except (OSError, ValueError, AttributeError):
            continue
        target, unpruned = latency.get("target_ms"), latency.get(unpruned_key)
        if isinstance(target, (int, float)) and isinstance(unpruned, (int, float)) and target > 0 and unpruned > 0:
            return {"target_ms": float(target), "target_share": float(target) / float(unpruned)}
    return {}
