"""Targets beyond classifiers: Region (segmentation), Box (detection), Similarity (embeddings).

Each is checked against pytorch-grad-cam with its own target (``SemanticSegmentationTarget``,
``FasterRCNNBoxScoreTarget``, the embedding tutorial's ``SimilarityToConceptTarget``) on
torchvision models with seeded random weights at 96 px, and against hand-made models whose
answer the test computes. Bad input is one line.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from cam_reference import TOLERANCE, difference, minmax, peer_cam
from torch import nn

import convlens as cl
from convlens.errors import ConvlensError
from convlens.targets import Box, Region, Similarity

SIZE = 96


class Out(nn.Module):
    """pytorch-grad-cam reads one tensor: the segmentation model's ``out``."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        return self.module(x)["out"]


class Concept:
    """pytorch-grad-cam's embedding tutorial target: cosine similarity of a row to a concept's features."""

    def __init__(self, features):
        self.features = features

    def __call__(self, row):
        return torch.nn.CosineSimilarity(dim=0)(row, self.features)


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text and "Traceback" not in text
    return text


@pytest.fixture(scope="module")
def picture_batch():
    return torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def deeplab():
    torch.manual_seed(0)
    return cl.load_model("deeplabv3_mobilenet_v3_large", weights="none", input_size=SIZE)


@pytest.fixture(scope="module")
def fcn():
    torch.manual_seed(0)
    return cl.load_model("fcn_resnet50", weights="none", input_size=64)


@pytest.fixture(scope="module")
def detector():
    torch.manual_seed(0)
    module = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, min_size=SIZE, max_size=SIZE, box_score_thresh=0.0,
        rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=100, box_detections_per_img=20)
    return cl.load_model(module, labels=list(torchvision.models.detection.FasterRCNN_MobileNet_V3_Large_FPN_Weights
                                             .DEFAULT.meta["categories"]))


# -- segmentation --------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", [("deeplab", "gradcam"), ("deeplab", "hirescam"), ("fcn", "gradcam")], ids=str)
def test_region_matches_pytorch_grad_cams_semantic_segmentation_target(request, picture_batch, case):
    from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget

    segmenter, method = request.getfixturevalue(case[0]), case[1]
    picture_batch = picture_batch[..., :segmenter.input_size[0], :segmenter.input_size[1]]
    layer = "backbone.16" if "mobilenet" in segmenter.name else "backbone.layer4"
    with torch.no_grad():
        logits = segmenter.module.eval()(picture_batch)["out"]
    winner = int(torch.bincount(logits.argmax(1).flatten()).argmax())
    ours = cl.explain(segmenter, picture_batch, method=method, layer=layer, target=Region(winner))
    mask = (logits[0].argmax(0) == winner).float().numpy()
    theirs = peer_cam(method, Out(segmenter.module), segmenter.named_layers()[layer], picture_batch,
                      [SemanticSegmentationTarget(winner, mask)], tuple(ours.raw.shape[-2:]))
    assert ours.targets == [winner] and not ours.flat[0]
    assert difference(method, ours.raw, theirs) <= TOLERANCE


def test_a_class_index_on_a_segmenter_is_its_region_and_auto_is_the_backbone(deeplab, picture_batch):
    with torch.no_grad():
        winners = deeplab.module.eval()(picture_batch)["out"].argmax(1)
    top = int(torch.bincount(winners.flatten()).argmax())
    by_index = cl.explain(deeplab, picture_batch, method="gradcam", target=top)
    by_region = cl.explain(deeplab, picture_batch, method="gradcam", target=Region(top))
    assert by_index.layer.startswith("backbone.") and by_index.targets == [top]
    torch.testing.assert_close(by_index.raw, by_region.raw)


class DenseNet(nn.Module):
    """conv 3x3 -> ReLU -> conv 1x1 to 3 classes, per pixel: a segmentation model small enough to solve by hand."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        return self.head(self.features(x))


def test_region_gradcam_on_a_hand_made_dense_model_is_the_class_logit_map_times_the_mask_share():
    torch.manual_seed(1)
    net = DenseNet().eval()
    x = torch.rand(1, 3, 8, 8)
    mask = torch.zeros(8, 8)
    mask[2:5, 1:7] = 1
    ours = cl.explain(net, x, method="gradcam", layer="features.1", target=Region(2, mask=mask))
    # S = sum_p M(p) (W2[2] . A(p) + b) => dS/dA_c(p) = W2[2, c] M(p), w_c = W2[2, c] |M| / (h w),
    # so the Grad-CAM map is |M| / (h w) times the class logit without its bias, at every pixel.
    with torch.no_grad():
        acts = net.features(x)
        expected = mask.sum() / 64 * torch.einsum("c,nchw->nhw", net.head.weight[2, :, 0, 0], acts)
        score = ((net(x)[0, 2]) * mask).sum()
    torch.testing.assert_close(ours.raw, expected, rtol=1e-5, atol=1e-6)
    settled, classes = Region(2, mask=mask).settle(net(x))
    assert classes == [2] and torch.allclose(settled(net(x)), score.view(1))


def test_deletion_scores_the_region_with_its_mask_fixed_on_the_clean_image():
    from convlens.metrics import deletion

    torch.manual_seed(1)
    net = DenseNet().eval()
    x = torch.rand(1, 3, 8, 8)
    maps = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = net(x)
    k = int(torch.bincount(logits.argmax(1).flatten()).argmax())
    mask = (logits[0].argmax(0) == k).float()
    curve = deletion(net, x, maps, targets=Region(k), step=16)
    order = maps.flatten().argsort(descending=True)
    expected = []
    for count in (0, 16, 32, 48, 64):  # the most important pixels set to the zero baseline first
        deleted = x.clone().flatten(2)
        deleted[..., order[:count]] = 0
        with torch.no_grad():
            expected.append(float((net(deleted.view_as(x))[0, k] * mask).sum()))
    assert curve.scores[0].tolist() == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert len(set(round(v, 4) for v in expected)) > 2  # the region's score does move as pixels go


def test_region_refuses_a_class_out_of_range_and_an_empty_mask_on_one_line(deeplab, picture_batch):
    with pytest.raises(ConvlensError, match="out of range: the model has 21 classes") as err:
        cl.explain(deeplab, picture_batch, method="gradcam", target=Region(21))
    _one_line(err)
    with pytest.raises(ConvlensError, match="empty in image 0: the mask given holds no pixel") as err:
        cl.explain(deeplab, picture_batch, method="gradcam", target=Region(0, mask=np.zeros((SIZE, SIZE))))
    _one_line(err)
    with torch.no_grad():
        winners = set(deeplab.module.eval()(picture_batch)["out"].argmax(1).unique().tolist())
    absent = min(set(range(21)) - winners)
    with pytest.raises(ConvlensError, match="wins no pixel") as err:
        cl.explain(deeplab, picture_batch, method="gradcam", target=absent)
    _one_line(err)


def test_predict_on_a_deeplab_gives_pixel_shares_not_a_flattened_index(deeplab, picture_batch):
    with torch.no_grad():
        winners = deeplab.module.eval()(picture_batch)["out"].argmax(1).flatten()
    counts = torch.bincount(winners, minlength=21).float() / winners.numel()
    shares = deeplab.predict(picture_batch, top_k=3)[0]
    assert all(0 <= row.index < 21 for row in shares)
    assert [round(row.share, 6) for row in shares] == [round(float(v), 6) for v in counts.sort(descending=True)
                                                       .values[:len(shares)]]
    assert shares[0].label == deeplab.labels[shares[0].index]


# -- embeddings ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def embedder():
    torch.manual_seed(0)
    module = torchvision.models.resnet18(weights=None)
    module.fc = nn.Identity()
    return cl.load_model(module.eval(), input_size=SIZE)


@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_similarity_matches_pytorch_grad_cams_concept_target(embedder, picture_batch, method):
    reference = torch.rand(3, SIZE, SIZE, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        features = embedder.module(reference[None])[0]
    ours = cl.explain(embedder, picture_batch, method=method, layer="layer4", target=Similarity(reference))
    theirs = peer_cam(method, embedder.module, embedder.module.layer4, picture_batch, [Concept(features)],
                      tuple(ours.raw.shape[-2:]))
    assert ours.target_names == ["custom target"]
    assert difference(method, ours.raw, theirs) <= TOLERANCE


def test_similarity_to_a_vector_is_the_cosine_and_a_reference_of_another_shape_is_one_line(embedder, picture_batch):
    vector = torch.randn(512, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        embedding = embedder.module(picture_batch)
    settled, indices = Similarity(vector).settle(embedding)
    expected = (embedding[0] @ vector) / (embedding[0].norm() * vector.norm())
    assert indices == [-1] and torch.allclose(settled(embedding), expected.view(1), atol=1e-6)
    with pytest.raises(ConvlensError, match="reference embedding has 10 values and the model's output has 512") as err:
        cl.explain(embedder, picture_batch, method="gradcam", target=Similarity(torch.ones(10)))
    _one_line(err)


def test_cam_refuses_a_task_target_on_one_line(embedder, picture_batch):
    with pytest.raises(ConvlensError, match="cannot serve a Similarity target; use gradcam") as err:
        cl.explain(embedder, picture_batch, method="cam", target=Similarity(torch.ones(512)))
    _one_line(err)


# -- detection ---------------------------------------------------------------------------------------------

def _unscaled(monkeypatch) -> list:
    """pytorch-grad-cam's maps before its own min-max, which adds 1e-7 to the maximum: a random detector's
    box-score maps are about 1e-11, so that epsilon alone would rescale them by a visible amount."""
    import pytorch_grad_cam.base_cam as base_cam

    seen, scale = [], base_cam.scale_cam_image
    monkeypatch.setattr(base_cam, "scale_cam_image", lambda cam, size=None: seen.append(cam.copy()) or scale(cam, size))
    return seen


def test_box_with_regression_matches_pytorch_grad_cams_faster_rcnn_box_score_target(detector, picture_batch,
                                                                                     monkeypatch):
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    seen = _unscaled(monkeypatch)
    with torch.no_grad():
        found = detector.module.eval()(picture_batch)[0]
    assert len(found["boxes"]) > 3  # score threshold 0: a random detector finds boxes, deterministically
    index = 2
    layer = "backbone.fpn.layer_blocks.0"
    ours = cl.explain(detector, picture_batch, method="gradcam", layer=layer, target=Box(index, regression=True))
    reference = FasterRCNNBoxScoreTarget([int(found["labels"][index])], [found["boxes"][index].numpy()])
    theirs = peer_cam("gradcam", detector.module, detector.named_layers()[layer], picture_batch, [reference],
                      tuple(ours.raw.shape[-2:]))
    assert ours.targets == [int(found["labels"][index])]
    assert ours.target_names == [detector.labels[int(found["labels"][index])]]
    assert theirs.shape == ours.raw.shape and not ours.flat[0]
    assert difference("gradcam", ours.raw, minmax(torch.as_tensor(seen[0]))) <= TOLERANCE


def test_eigencam_through_the_fpn_matches_pytorch_grad_cam(detector, picture_batch):
    layer = "backbone.fpn.layer_blocks.0"
    ours = cl.explain(detector, picture_batch, method="eigencam", layer=layer, sign_correction=False)
    theirs = peer_cam("eigencam", detector.module, detector.named_layers()[layer], picture_batch, [None],
                      tuple(ours.raw.shape[-2:]))
    assert difference("eigencam", ours.raw, theirs) <= TOLERANCE


def test_box_by_label_and_overlap_finds_that_detection_and_scores_it(detector, picture_batch):
    with torch.no_grad():
        found = detector.module.eval()(picture_batch)[0]
    label, box = int(found["labels"][1]), found["boxes"][1]
    same = (found["labels"] == label).nonzero().flatten()
    ious = torchvision.ops.box_iou(box[None], found["boxes"][same])[0]
    expected = int(same[ious.argmax()])
    settled, classes = Box(detector.labels[label], iou_with=box.tolist()).settle([found], labels=detector.labels)
    assert classes == [label] and torch.equal(settled.boxes[0], found["boxes"][expected])
    assert float(settled([found])[0]) == pytest.approx(float(found["scores"][expected]))
    # on another pass the same detection is found again by overlap; nothing overlapping scores 0
    moved = {k: v.clone() for k, v in found.items()}
    moved["boxes"] += 1000
    assert float(settled([moved])[0]) == 0.0


def test_predict_lists_the_detections_and_auto_is_in_the_backbone(detector, picture_batch):
    with torch.no_grad():
        found = detector.module.eval()(picture_batch)[0]
    rows = detector.predict(picture_batch, top_k=2)[0]
    assert [(r.index, round(r.score, 5)) for r in rows] == [
        (int(k), round(float(s), 5)) for k, s in zip(found["labels"][:2], found["scores"][:2])]
    assert cl.summarize(detector).auto_layer.startswith("backbone.")


def test_box_refuses_an_index_past_the_detections_and_a_detector_that_found_nothing(detector, picture_batch):
    with torch.no_grad():
        count = len(detector.module.eval()(picture_batch)[0]["boxes"])
    with pytest.raises(ConvlensError, match=f"box {count} is past the detections: the detector found {count}") as err:
        cl.explain(detector, picture_batch, method="gradcam", target=Box(count))
    _one_line(err)
    torch.manual_seed(0)
    blind = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, min_size=SIZE, max_size=SIZE, box_score_thresh=0.99)
    with pytest.raises(ConvlensError, match="the detector found nothing in image 0") as err:
        cl.explain(blind, picture_batch, method="gradcam")
    _one_line(err)
