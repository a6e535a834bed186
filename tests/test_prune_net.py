"""One-shot pruning (:func:`pgp_det.engine.one_shot.prune_once`, and ``tools/prune_net.py`` over
it) of the synthetic R18-FPN writes a checkpoint that reloads to the same detector and exports to
ONNX, a report whose figures are real, and refuses bad input with one line and nothing written."""
import json
import os

import numpy as np
import pytest
import torch

from pgp_det import export
from pgp_det.checkpoint import load_model
from pgp_det.config import load_config
from pgp_det.engine.one_shot import prune_once
from pgp_det.pruning import derive_channel_groups
from conftest import ROOT, load_tool
from test_export import sample_images

CONFIG = "synthetic/faster_rcnn_R_18_FPN_synth.yaml"
# random init; score threshold 0 so that the untrained detector reports detections to compare
OVERRIDES = ["MODEL.WEIGHTS", "", "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", "MODEL.RPN.POST_NMS_TOPK_TEST", "100",
             "TEST.DETECTIONS_PER_IMAGE", "50"]
SIZE = ["--input-size", "128x160"]


@pytest.fixture(scope="module")
def tool():
    return load_tool("prune_net")


def one_shot_config(*pruning):
    """The synthetic config at random init, FLOPs counted at 128x160, with ``PRUNING`` items."""
    keys = ["PRUNING.TARGET.FLOPS.INPUT_SIZE", "(128, 160)",
            *(f"PRUNING.{v}" if i % 2 == 0 else v for i, v in enumerate(pruning))]
    cfg = load_config(os.path.join(ROOT, "configs", CONFIG), OVERRIDES + keys)
    cfg.freeze()
    return cfg


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """The library's result at ratio 0.5, and the files it wrote."""
    out = tmp_path_factory.mktemp("pruned") / "out"
    cfg = one_shot_config("TARGET.KIND", "channels", "TARGET.CHANNELS.RATIO", "0.5")
    result = prune_once(cfg, "l1")
    result.write(str(out), cfg)
    return cfg, result.model.eval(), out


def image_tensor(index=0):
    return torch.from_numpy(np.ascontiguousarray(sample_images(index + 1)[index].transpose(2, 0, 1))).float()


def test_cli_writes_checkpoint_and_report(tool, tmp_path, capsys):
    out = tmp_path / "cli"
    assert tool.main(["--config", CONFIG, "--ratio", "0.5", *SIZE, "--output", str(out), *OVERRIDES]) == 0
    printed = capsys.readouterr().out
    assert "GFLOPs at 128x160" in printed and f"wrote {out / 'model_pruned.pth'}" in printed
    assert sorted(os.listdir(out)) == ["config.yaml", "model_pruned.pth", "pruning_report.json"]  # no last_checkpoint
    from pgp_det.config import get_pgp_cfg

    saved = get_pgp_cfg()
    saved.merge_from_file(str(out / "config.yaml"))
    assert saved.MODEL.WEIGHTS == str(out / "model_pruned.pth")

    report = json.loads((out / "pruning_report.json").read_text())
    flops, params = report["flops"], report["params"]
    assert flops["after_gflops"] < flops["before_gflops"] and flops["reduction_percent"] > 0
    assert flops["reduction_percent"] == pytest.approx(100 * (1 - flops["after_gflops"] / flops["before_gflops"]))
    assert flops["predicted_after_gflops"] == pytest.approx(flops["after_gflops"], rel=0.01)
    assert sum(flops["after_gflops_per_family"].values()) == pytest.approx(flops["after_gflops"])
    assert params["after"] < params["before"]
    assert report["settings"]["criterion"] == "l1" and report["settings"]["requested"] == {"ratio": 0.5}
    assert report["settings"]["allocation"] == "uniform"  # the config's PRUNING.ALLOCATION.NAME
    for name, group in report["groups"].items():  # every group halved, on a multiple of 8
        assert group["kept"] % 8 == 0 and abs(group["kept"] - group["original"] / 2) <= 4, name


def test_checkpoint_reloads_to_the_pruned_detector(pruned):
    cfg, model, out = pruned
    report = json.loads((out / "pruning_report.json").read_text())
    reloaded = load_model(cfg, str(out / "model_pruned.pth"))
    sizes = {name: group.size for name, group in derive_channel_groups(reloaded).items()}
    assert sizes == {name: group["kept"] for name, group in report["groups"].items()}
    assert sum(p.numel() for p in reloaded.parameters()) == report["params"]["after"]
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value), key
    image = image_tensor()
    with torch.no_grad():
        a = model([{"image": image}])[0]["instances"]
        b = reloaded([{"image": image}])[0]["instances"]
    assert len(a) > 0
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor) and torch.equal(a.scores, b.scores)


def test_pruned_model_exports_to_onnx(pruned, tmp_path):
    cfg, _, out = pruned
    model = load_model(cfg, str(out / "model_pruned.pth"))
    images = [image_tensor(0), image_tensor(1)]  # the second has another size than the traced one
    path = str(tmp_path / "pruned.onnx")
    export.export_onnx(model, images[0], path, opset=17)
    session = export.load_onnx(path)
    for image in images:
        reference = export.run_pytorch(model, image)
        assert len(reference["scores"]) > 0
        result = export.compare_detections(reference, export.run_onnx(session, image), box_atol=1e-2, score_atol=1e-3)
        assert result["ok"], result


def test_flops_target_and_scopes(tool, tmp_path, capsys):
    out = tmp_path / "flops"
    code = tool.main(["--config", CONFIG, "--flops-reduction", "0.3", "--scopes", "backbone,fpn", "--criterion", "l2",
                      *SIZE, "--output", str(out), *OVERRIDES])
    assert code == 0, capsys.readouterr().err
    report = json.loads((out / "pruning_report.json").read_text())
    assert 30.0 <= report["flops"]["reduction_percent"] <= 31.0
    assert 0 < report["settings"]["ratio"] < 1
    for name, group in report["groups"].items():
        if group["scope"] in ("rpn", "roi_heads"):
            assert group["kept"] == group["original"] and group["out_of_scope"], name


@pytest.mark.parametrize("target", [["TARGET.KIND", "channels", "TARGET.CHANNELS.RATIO", "0.5"],
                                    ["TARGET.KIND", "flops", "TARGET.FLOPS.REDUCTION", "0.5"]])
def test_every_allocation_meets_the_target(target):
    kept = {}
    for allocation in ("uniform", "global", "adaptive"):
        report = prune_once(one_shot_config(*target, "ALLOCATION.NAME", allocation), "l1").report
        assert report["settings"]["allocation"] == allocation
        groups = report["groups"].values()
        if target[1] == "channels":
            removed = 1.0 - sum(g["kept"] for g in groups) / sum(g["original"] for g in groups)
        else:  # measured by fvcore on the pruned model
            removed = report["flops"]["reduction_percent"] / 100
            assert removed >= 0.5 - 1e-6
        assert removed == pytest.approx(0.5, abs=0.01), allocation
        kept[allocation] = [g["kept"] for g in groups]
    assert len({tuple(k) for k in kept.values()}) == 3  # three allocations, three architectures


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--ratio", "1.0"], "--ratio 1.0 is outside [0, 1)"),
        (["--ratio", "-0.1"], "--ratio -0.1 is outside [0, 1)"),
        (["--flops-reduction", "0"], "--flops-reduction 0.0 is outside (0, 1)"),
        ([], "one of the arguments --ratio --flops-reduction --target-latency-ms --target-fps --list-groups is required"),
        (["--ratio", "0.5", "--flops-reduction", "0.5"], "not allowed with argument"),
        (["--ratio", "0.5", "--scopes", "backbone,neck"], "--scopes: unknown scope 'neck'"),
        (["--ratio", "0.5", "--criterion", "l3"], "--criterion 'l3' is unknown; one-shot pruning takes bn_gamma, l1, l2"),
        (["--ratio", "0.5", "--criterion", "pgp"], "--criterion 'pgp' needs training"),
        (["--ratio", "0.5", "--allocation", "greedy"], "argument --allocation: invalid choice: 'greedy'"),
        (["--ratio", "0.5", "--input-size", "128x"], "--input-size '128x': expected HxW"),
        (["--ratio", "0.5", "--flops-reduction", "x"], "argument --flops-reduction: invalid float value: 'x'"),
        (["--flops-reduction", "0.9", "--scopes", "rpn"], "unreachable"),
        (["--ratio", "0.5", "MODEL.NO_SUCH_KEY", "1"], "bad override"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tool, tmp_path, capsys, arguments, message):
    out = tmp_path / "out"
    code = tool.main(["--config", CONFIG, *SIZE, "--output", str(out), *arguments, *OVERRIDES])
    err = capsys.readouterr().err
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert err.rstrip().splitlines()[-1] == errors[0]
    assert not out.exists()


def test_existing_output_is_kept_without_overwrite(tool, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model_pruned.pth").write_bytes(b"previous")
    code = tool.main(["--config", CONFIG, "--ratio", "0.5", *SIZE, "--output", str(out), *OVERRIDES])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        f"error: '{out / 'model_pruned.pth'}' already exists: pass --overwrite to replace it, or choose another --output"
    )
    assert (out / "model_pruned.pth").read_bytes() == b"previous" and os.listdir(out) == ["model_pruned.pth"]
    assert tool.main(["--config", CONFIG, "--ratio", "0.25", "--overwrite", *SIZE, "--output", str(out), *OVERRIDES]) == 0
    assert (out / "model_pruned.pth").read_bytes() != b"previous"


def test_list_groups_prints_every_group_with_its_flops_share(tool, capsys):
    assert tool.main(["--config", CONFIG, "--list-groups", *SIZE, *OVERRIDES]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split()[:5] == ["group", "scope", "size", "GFLOPs", "share"]
    groups = derive_channel_groups(load_model(one_shot_config(), "", strict=False), allow_frozen=True)
    assert [line.split()[0] for line in lines[1:]] == list(groups)
    fpn_out = next(line for line in lines if line.startswith("backbone.fpn.out "))
    assert fpn_out.split()[2] == str(groups["backbone.fpn.out"].size) and fpn_out.split()[4].endswith("%")
