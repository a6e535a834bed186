"""Domain-adaptive Faster R-CNN: gradient reversal, the domain classifiers inside the channel
groups (they follow hard pruning), target labels never read, the plain detector without the
classifiers, bad settings in one line, and the fog domain's images."""
import os

import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

import pgp_det.modeling  # noqa: F401  (registers DomainAdaptiveRCNN)
from pgp_det import export
from pgp_det.config import load_config
from pgp_det.data.domains import TARGET, build_domain_adaptive_train_loader, check_domain_adaptation_config
from pgp_det.data.synthetic import render_image
from pgp_det.engine.preflight import check_training_run
from pgp_det.errors import UserInputError
from pgp_det.modeling.domain_adaptation import grad_reverse
from pgp_det.pruning import derive_channel_groups, hard_prune
from conftest import ROOT

CONFIG = os.path.join(ROOT, "configs", "synthetic", "da_faster_rcnn_R_18_FPN_synth_fog.yaml")
SMALL = ["SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0", "INPUT.MIN_SIZE_TRAIN", "(128,)",
         "INPUT.MAX_SIZE_TRAIN", "192", "MODEL.RPN.POST_NMS_TOPK_TEST", "50", "SEED", "3"]


def da_cfg(*extra):
    cfg = load_config(CONFIG, SMALL + list(extra))
    cfg.freeze()
    return cfg


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(da_cfg()).eval()


def test_gradient_reversal_is_identity_forward_and_flips_and_scales_the_gradient():
    x = torch.randn(3, 4, requires_grad=True)
    upstream = torch.randn(3, 4)
    y = grad_reverse(x, 0.3)
    assert torch.equal(y, x)
    y.backward(upstream)
    assert torch.allclose(x.grad, -0.3 * upstream)


def _consistency_gradients(model, mode, features, proposals, domains):
    """The consistency loss in ``mode``, and the gradients it gives the features and the classifiers."""
    model.consistency_gradient = mode
    leaves = {name: f.detach().clone().requires_grad_(True) for name, f in features.items()}
    model.zero_grad(set_to_none=True)
    loss = model._domain_losses(leaves, proposals, domains)["loss_da_consistency"]
    loss.backward()
    heads = {name: p.grad.clone() for name, p in model.domain_classifiers.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.item(), {name: f.grad for name, f in leaves.items()}, heads


def _consistency_loss(model, features, proposals, domains):
    with torch.no_grad():
        return model._domain_losses(features, proposals, domains)["loss_da_consistency"].item()


def test_consistency_term_is_descended_by_the_features_when_scaled_and_ascended_when_reversed(model):
    torch.manual_seed(5)
    with torch.no_grad():
        features = model.backbone(torch.rand(2, 3, 128, 128) * 255)
    boxes = torch.tensor([[4.0, 4.0, 60.0, 50.0], [20.0, 30.0, 120.0, 110.0], [0.0, 0.0, 127.0, 127.0]])
    proposals = [Instances((128, 128), proposal_boxes=Boxes(boxes + shift)) for shift in (0.0, 3.0)]
    domains = torch.tensor([0.0, 1.0])
    mode, weight = model.consistency_gradient, model.reversal_weight
    model.reversal_weight = 0.5
    try:
        loss, reversed_grads, reversed_heads = _consistency_gradients(model, "reversed", features, proposals, domains)
        scaled_loss, scaled_grads, scaled_heads = _consistency_gradients(model, "scaled", features, proposals, domains)
        assert scaled_loss == pytest.approx(loss, rel=1e-6) and loss > 0
        # the classifiers descend the term in both modes
        for name in reversed_heads:
            assert torch.allclose(scaled_heads[name], reversed_heads[name], rtol=1e-4, atol=1e-9), name
        # each feature level gets the gradient with the opposite sign in the two modes
        for name in features:
            assert scaled_grads[name].abs().max() > 0, name
            assert torch.allclose(scaled_grads[name], -reversed_grads[name], rtol=1e-4, atol=1e-12), name
        # a small step of the features against the gradient they get: lowers the term when scaled, raises it when reversed
        norm = sum(float((g ** 2).sum()) for g in scaled_grads.values())
        step = 0.02 * loss / norm
        for grads, lower in ((scaled_grads, True), (reversed_grads, False)):
            moved = {name: features[name] - step * grads[name] for name in features}
            after = _consistency_loss(model, moved, proposals, domains)
            assert (after < loss) if lower else (after > loss), (after, loss)
    finally:
        model.consistency_gradient, model.reversal_weight = mode, weight


def _domain_logits(model, image):
    """The image-level logits of every level and the instance-level logits of fixed boxes."""
    with torch.no_grad():
        features = model.backbone(image[None])
        heads = model.domain_classifiers
        levels = [heads.image(features[name]) for name in model.domain_image_in_features]
        boxes = [Boxes(torch.tensor([[4.0, 4.0, 60.0, 50.0], [20.0, 30.0, 120.0, 110.0], [0.0, 0.0, 127.0, 127.0]]))]
        pooled = model.roi_heads.box_pooler([features[f] for f in model.roi_heads.box_in_features], boxes)
        instance = heads.instance(model.roi_heads.box_head(pooled))
    return levels, instance


def test_domain_classifiers_are_consumers_of_the_groups_they_read_and_follow_hard_pruning(model):
    import copy

    pruned = copy.deepcopy(model)
    groups = derive_channel_groups(pruned)
    fpn = next(g for g in groups.values() if any(s.module == "domain_classifiers.image_conv" for s in g.consumers))
    head = next(g for g in groups.values() if any(s.module == "domain_classifiers.instance_fc" for s in g.consumers))
    assert fpn.scope == "fpn" and any(s.module.startswith("rpn") or "rpn" in s.module for s in fpn.consumers)
    assert head.scope == "roi_heads" and any(s.module.endswith("cls_score") for s in head.consumers)
    hidden = [g for g in groups.values() if g.scope == "domain"]
    assert sorted(g.name for g in hidden) == ["domain_classifiers.image_conv", "domain_classifiers.instance_fc"]
    # channels whose producers write zeros carry nothing: removing them leaves every domain logit as it was
    removed = {fpn.name: [1, 5, 9], head.name: [0, 7, 100]}
    with torch.no_grad():
        for name, channels in removed.items():
            for producer in groups[name].producers:
                tensor = dict(pruned.named_parameters())[f"{producer.module}.{producer.tensor}"]
                tensor[channels] = 0
    image = torch.rand(3, 128, 128) * 255
    before = _domain_logits(pruned, image)
    hard_prune(pruned, removed, groups=groups)
    after = _domain_logits(pruned, image)
    assert pruned.domain_classifiers.image_conv.in_channels == fpn.size - 3
    assert pruned.domain_classifiers.instance_fc.in_features == head.size - 3
    for a, b in zip(before[0] + [before[1]], after[0] + [after[1]]):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


def test_the_plain_detector_detects_alike_and_exports_without_the_classifiers(model, tmp_path):
    detector = model.detector().eval()
    assert not any("domain" in name for name, _ in detector.named_parameters())
    image = torch.rand(3, 128, 160) * 255
    with torch.no_grad():
        a = model([{"image": image}])[0]["instances"]
        b = detector([{"image": image}])[0]["instances"]
    assert torch.equal(a.pred_boxes.tensor, b.pred_boxes.tensor) and torch.equal(a.scores, b.scores)
    path = str(tmp_path / "da.onnx")
    export.export_onnx(detector, image, path, opset=17)
    reference = export.run_pytorch(detector, image)
    result = export.compare_detections(reference, export.run_onnx(export.load_onnx(path), image),
                                       box_atol=1e-2, score_atol=1e-3)
    assert result["ok"], result


def test_target_labels_are_never_read(tmp_path):
    """Target dicts whose labels would break training (class 99, boxes outside the image) give
    batches without instances, and a training step on them has finite losses."""
    name = "poisoned_fog_target"
    source = DatasetCatalog.get("synth_fog_voc_train")[:4]
    poisoned = [dict(d, annotations=[{"bbox": [-50.0, -50.0, 1e6, 1e6], "bbox_mode": 0, "category_id": 99}])
                for d in source]
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
    DatasetCatalog.register(name, lambda: poisoned)
    MetadataCatalog.get(name).set(thing_classes=MetadataCatalog.get("synth_fog_voc_train").thing_classes)
    try:
        cfg = da_cfg("DOMAIN_ADAPTATION.TARGET_DATASETS", f"('{name}',)")
        batch = next(iter(build_domain_adaptive_train_loader(cfg)))
        target = [d for d in batch if d["domain"] == TARGET]
        assert len(target) == 2 and len(batch) == 4
        assert all("instances" not in d and "annotations" not in d for d in target)
        torch.manual_seed(0)
        model = build_model(cfg).train()
        with EventStorage():
            losses = model(batch)
        assert {"loss_da_image", "loss_da_instance", "loss_da_consistency", "loss_cls"} <= set(losses)
        total = sum(losses.values())
        assert torch.isfinite(total)
        total.backward()
        assert model.domain_classifiers.image_conv.weight.grad.abs().sum() > 0
    finally:
        DatasetCatalog.remove(name)


@pytest.mark.parametrize("extra, message", [
    (["DOMAIN_ADAPTATION.TARGET_DATASETS", "()"], "DOMAIN_ADAPTATION.TARGET_DATASETS is empty"),
    (["MODEL.META_ARCHITECTURE", "GeneralizedRCNN"], "needs MODEL.META_ARCHITECTURE DomainAdaptiveRCNN"),
    (["DOMAIN_ADAPTATION.ENABLED", "False"], "needs DOMAIN_ADAPTATION.ENABLED True"),
    (["DOMAIN_ADAPTATION.IMAGE_WEIGHT", "-1.0"], "DOMAIN_ADAPTATION.IMAGE_WEIGHT -1.0: use a weight >= 0"),
    (["DOMAIN_ADAPTATION.TARGET_DATASETS", "('no_such_set',)"], "dataset 'no_such_set' is not registered"),
    (["DOMAIN_ADAPTATION.IMAGE_IN_FEATURES", "('p9',)"], "IMAGE_IN_FEATURES names ['p9']"),
    (["DOMAIN_ADAPTATION.REVERSAL_RAMP", "-10.0"], "DOMAIN_ADAPTATION.REVERSAL_RAMP -10.0: use 0"),
    (["DOMAIN_ADAPTATION.CONSISTENCY_GRADIENT", "flipped"], "DOMAIN_ADAPTATION.CONSISTENCY_GRADIENT 'flipped': use"),
])
def test_bad_adaptation_settings_are_one_line_before_anything_is_written(tmp_path, extra, message):
    cfg = da_cfg("OUTPUT_DIR", str(tmp_path / "out"), *extra)
    with pytest.raises(UserInputError) as error:
        check_training_run(cfg, eval_only=False, resume=False)
    assert message in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()


def test_reversal_weight_ramp_starts_at_zero_and_rises_to_the_weight():
    from pgp_det.engine.trainer import reversal_weight_at

    weights = [reversal_weight_at(i, 300, 0.5, 10.0) for i in range(0, 301, 15)]
    assert weights[0] == 0.0
    assert all(b > a for a, b in zip(weights, weights[1:]))
    assert weights[-1] == pytest.approx(0.5, rel=1e-3)
    assert reversal_weight_at(45, 300, 0.5, 10.0) > 0.25  # half the weight within the first 15% of training
    assert reversal_weight_at(10 ** 6, 300, 0.5, 10.0) <= 0.5


def test_ramp_hook_sets_the_models_reversal_weight_each_step(tmp_path):
    from types import SimpleNamespace

    from pgp_det.engine.trainer import ReversalWeightRamp, reversal_weight_at

    cfg = da_cfg("DOMAIN_ADAPTATION.REVERSAL_RAMP", "10.0", "SOLVER.MAX_ITER", "300")
    with EventStorage(30) as storage:  # the hook needs only the trainer's model, iteration and storage
        trainer = SimpleNamespace(model=build_model(cfg), iter=30, storage=storage)
        hook = ReversalWeightRamp(cfg.DOMAIN_ADAPTATION.REVERSAL_WEIGHT, 10.0, 300)
        hook.trainer = trainer
        hook.before_step()
        logged = storage.history("da/reversal_weight").latest()
    assert trainer.model.reversal_weight == pytest.approx(reversal_weight_at(30, 300, 0.1, 10.0)) == logged
    assert 0 < trainer.model.reversal_weight < cfg.DOMAIN_ADAPTATION.REVERSAL_WEIGHT


def test_adaptation_settings_of_the_shipped_configs_are_valid():
    check_domain_adaptation_config(da_cfg())


def test_fog_images_are_hazier_and_bluer_than_source_images():
    """Haze lifts the black level (the light it adds), the cast shifts blue over red."""
    import cv2

    def black_level(images):
        return float(np.mean([np.percentile(cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), 1) for img in images]))

    def blue_over_red(images):
        return float(np.mean([img[..., 0].mean() / img[..., 2].mean() for img in images]))

    source = [render_image(np.random.default_rng([0, 0, i]))[0] for i in range(8)]
    fog = [render_image(np.random.default_rng([0, 0, i]), domain="fog")[0] for i in range(8)]
    assert black_level(fog) > black_level(source) + 20
    assert blue_over_red(fog) > 1.1 * blue_over_red(source)


def test_frs_explains_only_the_labelled_images_of_an_adapting_batch():
    """FRS's relevance flows from true classes: in a mixed batch it explains the source images,
    exactly as it would the source images alone."""
    from pgp_det.pruning.criteria import build_criterion

    cfg = da_cfg()
    batch = next(iter(build_domain_adaptive_train_loader(cfg)))
    torch.manual_seed(0)
    model = build_model(cfg)
    groups = derive_channel_groups(model)
    scores = []
    for batches in ([batch], [[d for d in batch if d["domain"] != TARGET]]):
        criterion = build_criterion("frs")
        criterion.attach(model, groups)
        criterion.run_extra_pass(model, batches, 1)
        scores.append(criterion.scores(model))
    assert any(float(s.abs().sum()) > 0 for s in scores[0].values())
    for name in scores[0]:
        assert torch.allclose(scores[0][name], scores[1][name]), name


def test_adapting_starts_from_a_pruned_source_trained_detector(tmp_path):
    """The usual start of adaptation: a detector trained (and pruned) on the source images. Its
    checkpoint has no domain classifiers; they start at their init, every other tensor loads, and
    the classifiers' inputs follow the pruned FPN and box head."""
    from pgp_det.checkpoint import PrunedCheckpointer

    source_cfg = load_config(os.path.join(ROOT, "configs", "synthetic", "faster_rcnn_R_18_FPN_synth.yaml"), SMALL)
    torch.manual_seed(0)
    source = build_model(source_cfg)
    groups = derive_channel_groups(source)
    fpn_out, box_head = "backbone.fpn.out", "roi_heads.box_head.fc2"  # what the two classifiers read
    hard_prune(source, {fpn_out: range(40, groups[fpn_out].size), box_head: range(100, groups[box_head].size)})
    PrunedCheckpointer(source, save_dir=str(tmp_path)).save("source")

    torch.manual_seed(1)
    adaptive = build_model(da_cfg())
    initial = {k: v.clone() for k, v in adaptive.domain_classifiers.state_dict().items()}
    PrunedCheckpointer(adaptive).load(str(tmp_path / "source.pth"))
    for name, tensor in source.state_dict().items():
        assert torch.equal(adaptive.state_dict()[name], tensor), name
    classifiers = adaptive.domain_classifiers
    assert classifiers.image_conv.in_channels == 40 and classifiers.instance_fc.in_features == 100
    # the classifiers keep their init, on the channels kept
    assert torch.equal(classifiers.image_conv.weight, initial["image_conv.weight"][:, :40])
    assert torch.equal(classifiers.instance_fc.weight, initial["instance_fc.weight"][:, :100])
    for name in ("image_logits.weight", "instance_logits.weight", "image_conv.bias", "instance_fc.bias"):
        assert torch.equal(classifiers.state_dict()[name], initial[name]), name

    # a checkpoint whose record lacks a group whose layers it holds is still another architecture
    state = torch.load(tmp_path / "source.pth", map_location="cpu", weights_only=False)
    del state["pgp_architecture"][box_head]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(UserInputError, match=f"channel group {box_head} of the model built from the config is not in"):
        PrunedCheckpointer(build_model(da_cfg())).load(str(tmp_path / "broken.pth"))
