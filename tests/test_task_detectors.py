"""torchvision's other detectors: RetinaNet, FCOS and SSD (SSDlite), beside Faster R-CNN (tests/test_task_targets.py).

Each is built once, with random weights (nothing downloads), a score threshold of 0 (a random
detector finds nothing at torchvision's), few candidates and detections, and at 96 px where its
constructor allows (SSD runs at its one fixed size, 320). Each loads through convlens as a
detector, ``predict`` lists the detector's own detections, and ``Box(index)`` explained with
Grad-CAM through the FPN (or SSD feature) layer named equals pytorch-grad-cam's with
``FasterRCNNBoxScoreTarget`` to 1e-3 (the signed map, before the ReLU: a random detector's is
often negative everywhere), and Eigen-CAM at that layer equals pytorch-grad-cam's. A detector that found nothing is
one line and exit 2 in ``explain`` and ``evaluate``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from cam_reference import CAM_PEERS, TOLERANCE, difference, minmax
from PIL import Image

import convlens as cl
from convlens.targets import Box

SIZE = 96
DETECTION = torchvision.models.detection
COCO = list(DETECTION.FasterRCNN_ResNet50_FPN_Weights.DEFAULT.meta["categories"])
SMALL = {"min_size": SIZE, "max_size": SIZE}

#: name -> (constructor, its options, the layer explained: one whose maps the explained box's score reaches)
DETECTORS = {
    "retinanet": (DETECTION.retinanet_resnet50_fpn, SMALL, "backbone.fpn.layer_blocks.0"),
    "fcos": (DETECTION.fcos_resnet50_fpn, SMALL, "backbone.fpn.inner_blocks.2"),
    "ssdlite": (DETECTION.ssdlite320_mobilenet_v3_large, {}, "backbone.features.0"),
}


def build(name: str, score_thresh: float = 0.0) -> torch.nn.Module:
    constructor, options, _ = DETECTORS[name]
    torch.manual_seed(0)
    return constructor(weights=None, weights_backbone=None, score_thresh=score_thresh, detections_per_img=10,
                       topk_candidates=50, **options)


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    rng = np.random.default_rng(5)
    return Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype("uint8"))


@pytest.fixture(scope="module", params=list(DETECTORS))
def detector(request, picture):
    """``(name, model, x, the module's own detections of x)``."""
    model = cl.load_model(build(request.param), labels=COCO)
    x = model.preprocess([picture])
    with torch.no_grad():
        found = model.module.eval()(x)[0]
    return request.param, model, x, found


def test_each_detector_loads_as_one_and_predict_lists_its_own_detections(detector, picture):
    name, model, x, found = detector
    assert model.info["task"] == "detect" and cl.summarize(model).auto_layer.startswith("backbone.")
    # the detector normalises itself: convlens hands it the picture in [0, 1], at its own size
    pixels = torch.from_numpy(np.array(picture)).permute(2, 0, 1).float() / 255
    if name == "ssdlite":
        assert model.input_size == (320, 320) and x.shape[-2:] == (320, 320)
    else:
        assert model.input_size == (SIZE, SIZE)
        torch.testing.assert_close(x[0], pixels, atol=1e-6, rtol=0)
    assert len(found["boxes"]) > 2
    rows = model.predict(x, top_k=3)[0]
    assert [(r.index, round(r.score, 5)) for r in rows] == [
        (int(k), round(float(s), 5)) for k, s in zip(found["labels"][:3], found["scores"][:3])]
    assert [r.box for r in rows] == [tuple(round(float(v), 1) for v in box) for box in found["boxes"][:3]]
    assert rows[0].label == COCO[rows[0].index]


def signed_peer(method: str, module, layer_module, x, targets) -> torch.Tensor:
    """pytorch-grad-cam's map before its ReLU and min-max, at the layer's resolution: a random detector's
    box-score map is often negative everywhere (after the ReLU two zero maps would agree), and its maps are
    so small that the 1e-7 the peer adds to the maximum in its min-max would rescale them visibly."""
    peer, seen = CAM_PEERS[method][0](module, [layer_module]), []
    cam_image = peer.get_cam_image
    peer.get_cam_image = lambda *args, **kwargs: seen.append(cam_image(*args, **kwargs)) or seen[-1]
    try:
        peer(x, targets)
    finally:
        peer.activations_and_grads.release()
    return torch.as_tensor(seen[0]).float()


def test_box_gradcam_through_the_named_layer_matches_pytorch_grad_cam(detector):
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    name, model, x, found = detector
    layer = DETECTORS[name][2]
    ours = cl.explain(model, x, method="gradcam", layer=layer, target=Box(0, regression=True))
    reference = FasterRCNNBoxScoreTarget([int(found["labels"][0])], [found["boxes"][0].numpy()])
    theirs = signed_peer("gradcam", model.module, model.named_layers()[layer], x, [reference])
    assert ours.targets == [int(found["labels"][0])] and torch.equal(ours.boxes[0], found["boxes"][0])
    assert theirs.shape == ours.raw.shape and float(theirs.abs().max()) > 0  # the box's score reaches the layer
    scale = theirs.abs().max()
    assert float((ours.raw / scale - theirs / scale).abs().max()) <= TOLERANCE
    if not ours.flat[0]:  # and what is drawn: after the same ReLU and min-max
        assert difference("gradcam", ours.raw, minmax(theirs)) <= TOLERANCE


def test_eigencam_at_the_named_layer_matches_pytorch_grad_cam(detector):
    name, model, x, _ = detector
    layer = DETECTORS[name][2]
    ours = cl.explain(model, x, method="eigencam", layer=layer, sign_correction=False).raw
    theirs = signed_peer("eigencam", model.module, model.named_layers()[layer], x, [None])
    assert theirs.shape == ours.shape and float(theirs.abs().max()) > 0
    ours, theirs = ours / ours.abs().max(), theirs / theirs.abs().max()
    # the first principal component's sign is arbitrary: either sign of the projection may come back
    assert min(float((ours - theirs).abs().max()), float((ours + theirs).abs().max())) <= TOLERANCE


def test_a_detector_that_found_nothing_is_one_line_and_exit_2(cli, tmp_path, picture):
    blind = build("ssdlite", score_thresh=0.999)
    with torch.no_grad():
        assert len(blind.eval()([torch.rand(3, SIZE, SIZE)])[0]["boxes"]) == 0
    torch.save(blind, tmp_path / "blind.pt")
    picture.save(tmp_path / "pic.png")
    for command, extra in (("explain", []), ("evaluate", ["--targets", "box:0", "--metrics", "drop"])):
        code, _, err = cli(command, tmp_path / "blind.pt", "--trust-code", tmp_path / "pic.png", *extra,
                           "--out", tmp_path / command)
        assert code == 2 and "the detector found nothing in image 0" in err, err
        assert err.count("convlens: error:") == 1 and "\n" not in err.strip() and "Traceback" not in err
        assert not (tmp_path / command).exists()
    assert "pic.png: the detector found nothing" in err  # evaluate names the image of its folder
