"""The model zoo's rows for models that are not classifiers: a segmenter, a detector, an embedding model.

Each row runs as a user would, offline and small (64-96 px, random weights, seeded): ``layers``,
``predict`` (pixel shares, detections), ``explain`` with every method that applies (the others
refuse on one line), ``report`` and ``evaluate --targets`` (the CLI's scores equal the API's for the same
target); bad input to ``--targets`` is one line and exit 2, in ``explain`` and ``evaluate``.
The detector and the embedding model reach the CLI as pickled modules (``--trust-code``): a random
detector finds nothing at torchvision's score threshold, so it is built with threshold 0 (and with
100 proposals and 10 detections instead of 1000 and 100, to stay quick).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import convlens as cl
from convlens.heatmaps import METHODS
from convlens.report import ReportImage, build_report
from convlens.targets import Box, Similarity

#: the documented speed options the slow methods run with here
FAST = {"smoothgrad": {"n_samples": 2}, "integrated_gradients": {"steps": 2}, "scorecam": {"top_k": 4},
        "deeplift_shap": {"n_baselines": 2}, "lime": {"n_samples": 8}, "kernel_shap": {"n_samples": 8},
        "sscam": {"n_samples": 1, "top_k": 4}, "iscam": {"n_samples": 1, "top_k": 4},
        "smoothgradcam++": {"n_samples": 2}}
#: Ablation-CAM runs the rest of the network once per channel (256 FPN channels through the detector's
#: heads, 960 backbone channels through DeepLab's): minutes on two cores; it runs on the embedding row.
SLOW = {"ablationcam"}
#: (row, method) -> words of the one-line refusal, beside CAM's
REFUSES = {("detect", "shapleycam"): "needs second derivatives"}  # torchvision's roi_align has none


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("task-zoo")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((72, 90, 3)) * 255).astype("uint8")).save(folder / "pic.png")
    Image.fromarray((rng.random((64, 64, 3)) * 255).astype("uint8")).save(folder / "ref.png")
    Image.fromarray(np.zeros((72, 90), np.uint8)).save(folder / "empty.png")
    np.save(folder / "short.npy", np.ones(7, np.float32))  # a reference embedding of another model
    np.save(folder / "vector.npy", np.random.default_rng(1).standard_normal(512).astype(np.float32))
    torch.manual_seed(0)
    torch.save(torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, min_size=64, max_size=64, box_score_thresh=0.0,
        rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=100, box_detections_per_img=10), folder / "det.pt")
    embedder = torchvision.models.resnet18(weights=None)
    embedder.fc = torch.nn.Identity()
    torch.save(embedder, folder / "emb.pt")
    return folder


#: kind -> (model arguments of the CLI, the target the row explains)
ROWS = {
    "segment": (["deeplabv3_mobilenet_v3_large", "--weights", "none", "--input-size", "64"], "top1"),
    "detect": (["{folder}/det.pt", "--trust-code"], "box:0"),
    "embed": (["{folder}/emb.pt", "--trust-code", "--input-size", "64"], "similar:{folder}/ref.png"),
}


def _args(kind, folder) -> list[str]:
    return [a.format(folder=folder) for a in ROWS[kind][0]]


@pytest.fixture(scope="module", params=list(ROWS))
def row(request, files):
    kind = request.param
    args = _args(kind, files)
    torch.manual_seed(0)
    model = cl.load_model(args[0], weights="none", input_size=64) if kind == "segment" else cl.load_model(
        args[0], trust_code=True, input_size=64 if kind == "embed" else None)
    target = {"segment": None, "detect": Box(0), "embed": Similarity(files / "ref.png")}[kind]
    return kind, args, model, target, cl.summarize(model).auto_layer


def test_layers_marks_the_backbone_layer_auto(row, cli):
    kind, args, model, _, auto = row
    code, out, err = cli("layers", *args)
    assert code == 0, err
    assert re.search(rf"{re.escape(auto.split('.')[-1])}\s.*auto", out)
    assert auto.startswith("backbone.") if kind != "embed" else auto == "layer4"


def test_predict_speaks_the_models_kind(row, cli, files):
    kind, args, model, _, auto = row
    code, out, err = cli("predict", *args, str(files / "pic.png"), "--json", "--top", "3")
    assert code == 0, err
    predictions = json.loads(out)[0]["predictions"]
    expected = model.predict([files / "pic.png"], top_k=3)[0]
    if kind == "segment":
        assert [p["share"] for p in predictions] == pytest.approx([p.share for p in expected])
        assert all(0 <= p["index"] < 21 for p in predictions)  # never a flattened pixel index
    elif kind == "detect":
        assert [p["score"] for p in predictions] == pytest.approx([p.score for p in expected])
        assert all(len(p["box"]) == 4 for p in predictions)
    else:
        assert [p["index"] for p in predictions] == [p.index for p in expected]


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_explains_the_rows_target_or_says_why_not(row, files, method):
    kind, _, model, target, auto = row
    if method in SLOW and kind != "embed":
        pytest.skip(f"{method} takes minutes on this row (see SLOW)")
    x = model.preprocess([files / "pic.png"])
    if method in ("cam", "finercam"):  # a region, a box or a similarity is not a class (of a linear head)
        with pytest.raises(cl.ConvlensError) as err:
            cl.explain(model, x, method=method, layer=auto, target=target)
        assert "\n" not in str(err.value) and ("cannot serve" in str(err.value) or "CAM needs" in str(err.value))
        return
    refusal = REFUSES.get((kind, method))
    if method.startswith("lrp") and kind != "embed":  # DeepLab's Hardswish, the detector's own resize have no rule
        refusal = "LRP has no rule"
    if refusal is not None:
        with pytest.raises(cl.ConvlensError, match=refusal) as err:
            cl.explain(model, x, method=method, layer=auto, target=target)
        assert "\n" not in str(err.value)
        return
    result = cl.explain(model, x, method=method, layer=auto, target=target, **FAST.get(method, {}))
    assert result.maps.shape == (1, *x.shape[-2:]) and torch.isfinite(result.maps).all()
    assert float(result.maps.max()) == (0.0 if result.flat[0] else 1.0)
    if kind == "detect":
        assert result.boxes is not None and result.boxes.shape == (1, 4)


def test_explain_cli_writes_the_rows_target(row, cli, files, tmp_path):
    kind, args, model, _, auto = row
    target = ROWS[kind][1].format(folder=files)
    code, out, err = cli("explain", *args, str(files / "pic.png"), "--methods", "gradcam", "--targets", target,
                         "--out", tmp_path / "out")
    assert code == 0, err
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert {r["file"] for r in index} == {"pic_gradcam.png", "pic_gradcam.npy", "pic_explain.png"}
    drawn = np.asarray(Image.open(tmp_path / "out" / "pic_gradcam.png"))
    assert drawn.shape[:2] == (72, 90)
    if kind == "detect":  # the explained box is drawn in white where it lies on the photo
        box = model.predict([files / "pic.png"], top_k=1)[0][0].box
        x0, y0 = round(box[0] * 90 / 64), round(box[1] * 72 / 64)
        x1 = round(box[2] * 90 / 64)
        assert (drawn[min(y0 + 1, 71), min(x0 + 1, 89):max(x0 + 2, x1 - 1)] == 255).all()


BAD = [
    ("segment", "region:21", "class 21 is out of range: the model has 21 classes"),
    ("segment", "region:0:{folder}/empty.png", "the mask given holds no pixel"),
    ("detect", "box:500", "box 500 is past the detections: the detector found 10"),
    ("detect", "box:3@1,2", "needs four numbers after '@'"),
    ("embed", "similar:{folder}/missing.png", "not found"),
    ("embed", "similar:{folder}/short.npy", "the reference embedding has 7 values and the model's output has 512"),
    ("detect", "3", "this model is a detector: its target is a box"),
]


@pytest.mark.parametrize("kind, target, words", BAD, ids=[b[1].split(":")[0] + str(i) for i, b in enumerate(BAD)])
def test_bad_targets_are_one_line_and_exit_2(cli, files, tmp_path, kind, target, words):
    code, out, err = cli("explain", *_args(kind, files), str(files / "pic.png"), "--targets",
                         target.format(folder=files), "--out", tmp_path / "out")
    assert code == 2 and words in err, err
    assert err.count("convlens: error:") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_an_embedding_reference_of_another_size_is_one_line(cli, files, tmp_path):
    code, _, err = cli("explain", *_args("embed", files), str(files / "pic.png"), "--targets",
                       f"similar:{files / 'pic.png'}", "--out", tmp_path / "ok")
    assert code == 0, err  # an image of another size is resized by the model's preprocessing
    code, _, err = cli("explain", *_args("embed", files), str(files / "pic.png"), "--targets",
                       f"similar:{files / 'vector.npy'}", "--out", tmp_path / "vector")
    assert code == 0, err  # a saved embedding is a reference too: the map is the API's for that vector
    model = cl.load_model(str(files / "emb.pt"), trust_code=True, input_size=64)
    expected = cl.explain(model, [files / "pic.png"], target=Similarity(torch.from_numpy(np.load(files / "vector.npy"))))
    np.testing.assert_allclose(np.load(tmp_path / "vector" / "pic_gradcam.npy"), expected.raw[0].numpy(), rtol=1e-5,
                               atol=1e-7)
    with pytest.raises(cl.ConvlensError, match="reference embedding has 7 values") as caught:
        cl.explain(cl.load_model(str(files / "emb.pt"), trust_code=True, input_size=64), [files / "pic.png"],
                   target=Similarity(torch.ones(7)))
    assert "\n" not in str(caught.value)


def test_evaluate_scores_a_segmenters_region(cli, files, tmp_path):
    code, out, err = cli("evaluate", *_args("segment", files), str(files), "--out", tmp_path / "eval",
                         "--metrics", "deletion,drop", "--limit", "1")
    assert code == 0, err
    rows = (tmp_path / "eval" / "results.csv").read_text().splitlines()
    assert rows[0].startswith("image,method,target,deletion,drop") and len(rows) == 2


def test_evaluate_targets_scores_what_the_api_scores_for_that_target(row, cli, files, tmp_path):
    from convlens.metrics import average_drop, increase_in_confidence, deletion
    from convlens.targets import Region

    kind, args, model, _, _ = row
    picture = files / "pic.png"
    if kind == "segment":  # the row's own random weights, through --weights FILE
        torch.save(model.module.state_dict(), tmp_path / "seg.pt")
        args = [args[0], "--weights", str(tmp_path / "seg.pt"), *args[3:]]
        mask = np.zeros((64, 64), np.uint8)
        mask[8:40, 4:30] = 255
        Image.fromarray(mask).save(tmp_path / "mask.png")
        k = 1 + int(model.predict([picture], top_k=1)[0][0].index == 1)  # a class that is not the winner
        text, target = f"region:{k}:{tmp_path / 'mask.png'}", Region(k, mask=tmp_path / "mask.png")
    elif kind == "detect":
        text, target = "box:1", Box(1)
    else:
        text, target = f"similar:{files / 'ref.png'}", Similarity(files / "ref.png")
    # a detector's deletion curve is 225 passes of it, twice here: its row checks the cheap metrics
    metrics = ["drop", "increase"] if kind == "detect" else ["deletion", "drop"]
    code, out, err = cli("evaluate", *args, picture, "--out", tmp_path / "eval", "--targets", text,
                         "--metrics", ",".join(metrics))
    assert code == 0, err
    header, line = (tmp_path / "eval" / "results.csv").read_text().splitlines()
    values = dict(zip(header.split(","), line.split(",")))
    x = model.preprocess([picture])
    maps = cl.explain(model, x, method="gradcam", target=target).maps
    expected = {"drop": float(average_drop(model, x, maps, targets=target)[0])}
    if "deletion" in metrics:
        expected["deletion"] = float(deletion(model, x, maps, targets=target).auc[0])
    else:
        expected["increase"] = float(increase_in_confidence(model, x, maps, targets=target)[0])
    for name, value in expected.items():
        assert float(values[name]) == pytest.approx(value, rel=1e-4, abs=1e-6), name
    if kind == "segment":
        assert values["target"] == str(k)
        # the same folder with another target is another run: refused on one line, naming the change
        code, _, err = cli("evaluate", *args, picture, "--out", tmp_path / "eval", "--metrics", "deletion,drop")
        assert code == 2 and f"--targets: Region(class_={k}, mask={tmp_path / 'mask.png'} (" in err, err


@pytest.mark.parametrize("kind, target, words", [*BAD, ("segment", "all", "one target on every image")],
                         ids=[b[1].split(":")[0] + str(i) for i, b in enumerate(BAD)] + ["all"])
def test_evaluate_refuses_a_bad_target_on_one_line_before_writing(cli, files, tmp_path, kind, target, words):
    code, _, err = cli("evaluate", *_args(kind, files), files / "pic.png", "--targets", target.format(folder=files),
                       "--out", tmp_path / "eval")
    assert code == 2 and words in err, err
    assert err.count("convlens: error:") == 1 and "Traceback" not in err
    assert not (tmp_path / "eval").exists()  # no run.json that would tie the folder to a target that cannot run


def test_report_shows_each_kind_and_leaves_out_what_does_not_apply(row, files, tmp_path):
    kind, _, model, _, auto = row
    layer = auto
    path = build_report(model, [ReportImage("pic", Image.open(files / "pic.png").convert("RGB"))], tmp_path / "r.html",
                        methods=["cam", "gradcam"], activation_layers=[layer], filter_layers=[layer],
                        filter_steps=0, filter_count=2, classes=[0])
    html = path.read_text()
    for section in ("model", "predictions", "heatmaps"):
        assert f'<section id="{section}">' in html
    assert "Left out, as they do not apply to this model: cam:" in html
    assert ('<section id="segmentation">' in html) == (kind == "segment")
    if kind == "segment":
        assert "of pixels)" in html and "predicted mask:" in html
    if kind == "detect":
        assert re.search(r"\(0\.\d\d\) at [\d.]+, [\d.]+, [\d.]+, [\d.]+", html)


def test_report_explains_and_scores_the_target_given(row, files, tmp_path, cli):
    from convlens.evaluation.runner import evaluate_images
    from convlens.metrics.stats import mean_ci

    kind, args, model, _, auto = row
    if kind == "segment":
        pytest.skip("a segmenter's report explains its top classes' regions (the segmentation section)")
    target = Box(1) if kind == "detect" else Similarity(files / "ref.png")  # not what the default explains
    picture = Image.open(files / "pic.png").convert("RGB")
    mask = np.zeros((72, 90), bool)
    mask[10:50, 20:70] = True
    path = build_report(model, [ReportImage("pic", picture)], tmp_path / "r.html", methods=["gradcam"],
                        activation_layers=[auto], filter_layers=[auto], filter_steps=0, filter_count=2, classes=[0],
                        evaluation_images=[("masked", picture, mask)], evaluation_methods=["gradcam"],
                        evaluation_metrics=["drop"], sanity_images=1, targets=target)
    html = path.read_text()
    assert f"Each map explains the target given, {target!r}" in html
    _, summary = evaluate_images(model, [("masked", picture, mask)], methods=["gradcam"], metrics=["drop"],
                                 targets=target)
    assert f">{summary['gradcam']['drop'].format()}<" in html  # the evaluation scored that target too
    code, _, err = cli("report", "--model", *args, str(files / "pic.png"), "--targets",
                       "box:500" if kind == "detect" else f"similar:{files / 'short.npy'}", "--out", tmp_path / "bad.html")
    assert code == 2 and err.count("convlens: error:") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "bad.html").exists()

