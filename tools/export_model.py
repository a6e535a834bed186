#!/usr/bin/env python
"""Export a (pruned) Faster R-CNN to TorchScript and/or ONNX and check it against PyTorch.

Examples::

    python tools/export_model.py --config-file output/synth_R_18_FPN/config.yaml \\
        --weights output/synth_R_18_FPN/model_final.pth --output export/r18 \\
        --format torchscript onnx --dataset synth_voc_test
    python tools/export_model.py --config-file configs/synthetic/faster_rcnn_R_18_FPN_synth.yaml \\
        --weights pruned.pth --output export/pruned --format onnx --sample-image street.jpg --input-size 256x320

The exported graph takes one (3, H, W) float32 image and returns boxes, scores and classes in
that image's pixels (see ``pgp_det/export.py`` for the contract and the limitations). Check
images are resized as at test time (``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``), or letterboxed
to --input-size; the model is traced on the first. The eager model and the export run on the
same tensors and are compared (max abs difference of boxes in pixels and of scores, classes
equal), and the export's latency is timed on the first. Writes model.ts / model.onnx and
export_report.json into --output.

With ``--int8`` the ONNX export is also quantized to int8 (``model_int8.onnx``, QDQ; see
``pgp_det/quantization.py`` for what is quantized and what stays float), calibrated on the first
``--calibration-images`` images of the config's ``DATASETS.TRAIN[0]`` (or of
``--calibration-dir``), and checked against the float export: the share of the float model's
detections (score >= 0.5) the int8 one finds, same class and IoU >= 0.5, must reach
``--int8-min-agreement``. The report lists the operators quantized and those left float.

Exit codes: 0 all checks pass, 1 an export failed or differs from PyTorch, 2 bad input.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
import pgp_det  # noqa: E402,F401  (first: it quiets detectron2's import-time deprecation warning)


from pgp_det import export, quantization  # noqa: E402
from pgp_det.benchmark import runtimes, time_callable  # noqa: E402
from pgp_det.checkpoint import load_model  # noqa: E402
from pgp_det.benchmark.report import write_json  # noqa: E402
from pgp_det.benchmark.timing import environment_info  # noqa: E402
from pgp_det.config import load_config  # noqa: E402
from pgp_det.data import add_dataset_arguments  # noqa: E402
from pgp_det.errors import UserInputError  # noqa: E402
from pgp_det.utils.cli import OneLineArgumentParser, add_trust_argument, parse_input_size, run_tool  # noqa: E402
from pgp_det.utils.output_dir import claim_output_dir  # noqa: E402

FILE_NAMES = {"torchscript": "model.ts", "onnx": "model.onnx"}


def build_cfg(args):
    cfg = load_config(args.config_file, args.opts, args.register_voc, args.register_coco)
    cfg.MODEL.DEVICE = "cpu"  # exports are traced and checked on the CPU (onnxruntime CPU)
    cfg.freeze()
    return cfg


def argument_parser():
    parser = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--weights", default=None, help="checkpoint (default: the config's MODEL.WEIGHTS)")
    parser.add_argument("--output", required=True, metavar="DIR")
    parser.add_argument("--format", nargs="+", choices=sorted(FILE_NAMES), default=["torchscript", "onnx"])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--sample-image", metavar="PATH", help="image to trace with and check on")
    source.add_argument("--dataset", metavar="NAME", help="trace with and check on this dataset's first images")
    parser.add_argument("--num-images", type=int, default=4, help="dataset images to check on")
    parser.add_argument("--input-size", default="", metavar="HxW",
                        help="letterbox check images to this size (default: the test-time resize)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 16)")
    parser.add_argument("--box-atol", type=float, default=1e-2, help="allowed box difference, pixels")
    parser.add_argument("--score-atol", type=float, default=1e-3, help="allowed score difference")
    parser.add_argument("--int8", action="store_true", help="also write model_int8.onnx, quantized and checked")
    parser.add_argument("--calibration-images", type=int, default=32, metavar="N",
                        help="int8: calibrate on the first N images of DATASETS.TRAIN[0] (or of --calibration-dir)")
    parser.add_argument("--calibration-dir", default="", metavar="DIR", help="int8: calibrate on this folder's images")
    parser.add_argument("--calibration-method", default="minmax", choices=quantization.CALIBRATION_METHODS)
    parser.add_argument("--int8-min-agreement", type=float, default=0.9,
                        help="int8: least mean share of the float export's detections the int8 one must find")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--runs", type=int, default=10)
    add_dataset_arguments(parser)
    add_trust_argument(parser)
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE config overrides")
    return parser


def run(args, argv=None) -> int:
    output = None
    try:
        if args.opset < 16:
            raise UserInputError(f"--opset {args.opset}: RoiAlign as detectron2 uses it needs opset 16 or later")
        if args.num_images < 1 or args.runs < 1 or args.warmup < 0:
            raise UserInputError("--num-images and --runs must be >= 1, --warmup >= 0")
        for option, tolerance in (("--box-atol", args.box_atol), ("--score-atol", args.score_atol)):
            if not tolerance >= 0:  # also refuses nan
                raise UserInputError(f"{option} {tolerance}: a tolerance is a number >= 0")
        if args.int8 and "onnx" not in args.format:
            raise UserInputError("--int8 quantizes the ONNX export: add onnx to --format")
        if not 0 <= args.int8_min_agreement <= 1:
            raise UserInputError(f"--int8-min-agreement {args.int8_min_agreement}: a share between 0 and 1")
        size = parse_input_size(args.input_size) if args.input_size else None
        output = claim_output_dir(args.output, "--output")
        cfg = build_cfg(args)
        images = export.check_images(cfg, args.sample_image, args.dataset, args.num_images)
        args.calibration = quantization.calibration_images(cfg, args.calibration_images, args.calibration_dir) \
            if args.int8 else []
        model = load_model(cfg, args.weights, trusted=args.trust_weights)
        output.start_writing()
    except UserInputError:
        if output is not None:
            output.release()
        raise
    with output:
        return export_and_check(cfg, args, argv, model, images, size)


def main(argv=None) -> int:
    return run_tool(argument_parser(), argv, lambda args: run(args, argv))


def export_and_check(cfg, args, argv, model, images, size) -> int:
    """Export ``model`` in every requested format, compare with PyTorch, write the report; exit code."""
    tensors = [export.to_model_input(cfg, img, size) for _, img in images]
    sizes = [list(t.shape[1:]) for t in tensors]
    reference = [export.run_pytorch(model, t) for t in tensors]
    adapter = export.TensorDetector(model).eval()
    with torch.no_grad():
        eager = time_callable(lambda: adapter(tensors[0]), warmup=args.warmup, runs=args.runs)
    print(f"{len(tensors)} check image(s), sizes {', '.join(f'{h}x{w}' for h, w in sizes)}; "
          f"PyTorch eager median {eager.median:.1f} ms", flush=True)

    results, all_ok = {}, True
    for fmt in args.format:
        path = os.path.join(args.output, FILE_NAMES[fmt])
        print(f"[{fmt}] exporting to {path}", flush=True)
        try:
            result = runtimes.export_and_compare(fmt, model, tensors, reference, path, opset=args.opset,
                                               box_atol=args.box_atol, score_atol=args.score_atol,
                                               warmup=args.warmup, runs=args.runs)
        except Exception as e:  # report the failing path and carry on with the other format
            result = {"path": path, "ok": False, "error": f"{type(e).__name__}: {e}"}
            print(f"[{fmt}] FAILED: {result['error'].splitlines()[0]}", flush=True)
        else:
            counts = ", ".join(f"{c['num_reference']}/{c['num_exported']}" for c in result["checks"])
            print(
                f"[{fmt}] {'OK' if result['ok'] else 'MISMATCH'}: max |d box| {result['max_abs_diff_boxes']:.2e} px, "
                f"max |d score| {result['max_abs_diff_scores']:.2e}, detections (pytorch/export) {counts}; "
                f"median {result['latency_ms']['median']:.1f} ms",
                flush=True,
            )
        results[fmt] = result
        all_ok &= result["ok"]
    if args.int8 and "error" not in results["onnx"]:
        path = os.path.join(args.output, "model_int8.onnx")
        print(f"[int8] calibrating on {len(args.calibration)} image(s) ({args.calibration_method}), writing {path}",
              flush=True)
        int8 = runtimes.quantize_and_check(
            results["onnx"]["path"], path, [export.to_model_input(cfg, image) for _, image in args.calibration], tensors,
            args.calibration_method, args.int8_min_agreement, warmup=args.warmup, runs=args.runs)
        print(f"[int8] {'OK' if int8['ok'] else 'MISMATCH'}: finds {int8['agreement']:.1%} of the float export's "
              f"detections; quantized {int8['quantized']}, float {int8['float']}; "
              f"median {int8['latency_ms']['median']:.1f} ms", flush=True)
        results["onnx_int8"] = int8
        all_ok &= int8["ok"]

    write_json(
        {
            "input_sizes": sizes,
            "images": [name for name, _ in images],
            "pytorch_latency_ms": eager.to_dict(),
            "exports": results,
            "environment": environment_info("cpu"),
            "settings": {k: v for k, v in vars(args).items() if k != "calibration"},
            "command": " ".join(["python", "tools/export_model.py", *(sys.argv[1:] if argv is None else argv)]),
        },
        os.path.join(args.output, "export_report.json"),
    )
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
