"""Training: tiny runs learn, resume is exact, checkpoints load, metrics match scikit-learn and hand values,
bad input is one line and exit 2 with nothing written."""

import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn import metrics as skm

import convlens
from convlens.data.folders import LabelledImages, load_class_folders, stratified_split
from convlens.errors import ConvlensError
from convlens.train import TrainConfig, learning_rate_at, read_checkpoint, train
from convlens.train.evaluate import (confusion_matrix, evaluate_predictions, hanley_mcneil,
                                     roc_auc, roc_curve)

#: colour-coded classes: learnable in a few epochs by a tiny net, so the tests check the pipeline
COLOURS = {"blue": (40, 60, 200), "green": (40, 180, 60), "red": (210, 40, 40)}
TINY = dict(size=16, widths=[6, 12], batch_size=8, lr=0.02, epochs=4)


def colour_images(n_per_class, classes, seed=0, size=16):
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for label, name in enumerate(classes):
        base = np.array(COLOURS[name], dtype=np.float32)
        for _ in range(n_per_class):
            noise = rng.normal(0, 45, size=(size, size, 3))
            images.append(np.clip(base + noise, 0, 255).astype(np.uint8))
            labels.append(label)
    return images, labels


def colour_folder(root, n_per_class=10, classes=("blue", "red"), seed=0):
    images, labels = colour_images(n_per_class, classes, seed)
    for index, (image, label) in enumerate(zip(images, labels)):
        folder = root / classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{index:03d}.png")
    return root


def in_memory(n_per_class, classes, seed=0):
    images, labels = colour_images(n_per_class, classes, seed)
    return LabelledImages(torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(),
                          torch.tensor(labels), list(classes))


# -- learning -------------------------------------------------------------------

@pytest.mark.parametrize("classes", [("blue", "red"), ("blue", "green", "red")])
def test_tiny_run_learns_and_loads_with_load_model(tmp_path, classes):
    result = train(in_memory(12, classes), tmp_path, TrainConfig(**TINY))
    assert result.metrics["accuracy"] >= 0.8  # chance is 1/2 or 1/3
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    for name in ("model.pt", "checkpoint.pt", "metrics.json", "curves.png", "confusion.png"):
        assert (tmp_path / name).is_file()
    assert (tmp_path / "roc.png").is_file() == (len(classes) == 2)
    assert not list(tmp_path.glob("*.part"))

    model = convlens.load_model(tmp_path / "model.pt")
    assert model.labels == list(classes) and model.input_size == (16, 16) and model.output == "logits"
    saved = torch.load(tmp_path / "model.pt", weights_only=True)
    assert saved["arch"] == "shapesnet" and "optimizer" not in saved
    head = model.module.head
    assert head.out_features == (1 if len(classes) == 2 else len(classes))  # binary: one sigmoid logit

    # the loaded model reproduces the validation predictions written in metrics.json
    images, _ = colour_images(12, classes)
    x = model.preprocess(images)
    probabilities = model.probabilities(model(x))
    assert probabilities.shape == (len(images), len(classes))
    assert torch.allclose(probabilities.sum(1), torch.ones(len(images)), atol=1e-6)
    from convlens.train.loop import class_probabilities, predict_scores

    mean = torch.tensor(saved["normalize"]["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(saved["normalize"]["std"]).view(1, -1, 1, 1)
    uint8 = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    with convlens.borrow(model.module):
        direct = class_probabilities(predict_scores(model.module, uint8, mean, std))
    assert torch.allclose(direct, probabilities, atol=1e-5)


def test_resume_continues_exactly_like_an_uninterrupted_run(tmp_path):
    data = in_memory(8, ("blue", "red"))
    config = TrainConfig(**{**TINY, "epochs": 3})
    full = train(data, tmp_path / "full", config)

    class Stop(Exception):
        pass

    def stop_after_epoch_1(event):
        if event.kind == "epoch" and event.epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        train(data, tmp_path / "cut", config, progress=stop_after_epoch_1)
    assert read_checkpoint(tmp_path / "cut" / "checkpoint.pt")["epoch"] == 1
    assert not (tmp_path / "cut" / "model.pt").exists()
    resumed = train(data, tmp_path / "cut", resume=tmp_path / "cut" / "checkpoint.pt")
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    a = torch.load(full.model_path, weights_only=True)["state_dict"]
    b = torch.load(resumed.model_path, weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.metrics["accuracy"] == full.metrics["accuracy"]


def test_learning_rate_schedules():
    cosine = TrainConfig(epochs=4, lr=1.0)
    assert [learning_rate_at(cosine, e) for e in (1, 3)] == [1.0, pytest.approx(0.5)]
    step = TrainConfig(epochs=8, lr=1.0, schedule="step")
    assert [learning_rate_at(step, e) for e in (4, 5, 6, 7)] == pytest.approx([1, 0.1, 0.1, 0.01])
    assert learning_rate_at(TrainConfig(optimizer="sgd", schedule="constant"), 9) == 0.05


def test_stratified_split_keeps_class_proportions():
    labels = [0] * 10 + [1] * 30
    train_idx, val_idx = stratified_split(labels, 0.2, seed=1)
    assert sorted(np.r_[train_idx, val_idx].tolist()) == list(range(40))
    assert np.bincount(np.asarray(labels)[val_idx]).tolist() == [2, 6]
    assert np.array_equal(stratified_split(labels, 0.2, seed=1)[1], val_idx)


# -- metrics --------------------------------------------------------------------

def test_auc_hand_computed_cases():
    # pairs (positive, negative): 0.35 beats 0.1 not 0.4; 0.8 beats both -> 3 of 4
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    # ties count one half: 0.5 ties both negatives (1), 0.9 beats both (2) -> 3 of 4
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.9]) == 0.75
    assert roc_auc([1, 1], [0.2, 0.3]) is None


def test_hanley_mcneil_against_hand_computed_values():
    # A = 0.8, 10 positives, 20 negatives: Q1 = 0.8/1.2 = 2/3, Q2 = 2*0.64/1.8 = 32/45,
    # var = (0.16 + 9*(2/3 - 0.64) + 19*(32/45 - 0.64)) / 200 = (0.16 + 0.24 + 1.351111...) / 200
    se, (low, high) = hanley_mcneil(0.8, 10, 20)
    assert se == pytest.approx(math.sqrt(1.7511111111 / 200), rel=1e-9)
    assert se == pytest.approx(0.0935711257, rel=1e-8)
    assert (low, high) == pytest.approx((0.8 - 1.959964 * se, 0.8 + 1.959964 * se), rel=1e-6)
    assert hanley_mcneil(0.99, 5, 5)[1][1] == 1.0  # clipped to [0, 1]


@pytest.mark.parametrize("seed", range(4))
def test_auc_and_roc_curve_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    scores = np.round(rng.normal(labels * 0.8, 1.0), 1)  # rounding makes ties
    assert roc_auc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
    fpr, tpr, thresholds = roc_curve(labels, scores)
    ref_fpr, ref_tpr, ref_thresholds = skm.roc_curve(labels, scores, drop_intermediate=False)
    assert np.allclose(fpr, ref_fpr) and np.allclose(tpr, ref_tpr)
    assert np.allclose(thresholds[1:], ref_thresholds[1:])


def test_evaluate_predictions_matches_scikit_learn():
    rng = np.random.default_rng(0)
    classes = ["a", "b", "c", "d"]
    true = rng.integers(0, 4, 80)
    logits = rng.normal(size=(80, 4)) + 1.5 * np.eye(4)[true]
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    metrics = evaluate_predictions(true, probabilities, classes)
    predicted = probabilities.argmax(1)
    assert metrics["accuracy"] == pytest.approx(skm.accuracy_score(true, predicted))
    assert metrics["confusion_matrix"] == skm.confusion_matrix(true, predicted, labels=range(4)).tolist()
    precision, recall, f1, support = skm.precision_recall_fscore_support(true, predicted, labels=range(4),
                                                                         zero_division=0)
    for k, name in enumerate(classes):
        row = metrics["per_class"][name]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(
            (precision[k], recall[k], f1[k], support[k]))
        assert metrics["one_vs_rest_auc"][name] == pytest.approx(skm.roc_auc_score(true == k, probabilities[:, k]))
    assert metrics["macro_auc"] == pytest.approx(skm.roc_auc_score(true, probabilities, multi_class="ovr"))
    assert confusion_matrix([0, 1, 1], [1, 1, 0], 2).tolist() == [[0, 1], [1, 1]]


def test_binary_metrics_have_auc_with_confidence_interval():
    true = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    p = np.array([0.1, 0.3, 0.6, 0.7, 0.8, 0.4, 0.9, 0.2])
    metrics = evaluate_predictions(true, np.stack([1 - p, p], 1), ["cat", "dog"])
    roc = metrics["roc"]
    assert roc["positive_class"] == "dog" and roc["auc"] == pytest.approx(skm.roc_auc_score(true, p))
    se, ci = hanley_mcneil(roc["auc"], 4, 4)
    assert roc["se"] == se and roc["ci95"] == list(ci)
    json.dumps(metrics)  # JSON-ready


# -- command line and bad input -------------------------------------------------

def test_cli_trains_a_binary_classifier_and_skips_unreadable_images(tmp_path, cli):
    data = colour_folder(tmp_path / "data", 10)
    (data / "red" / "broken.png").write_bytes(b"\x89PNG not really")
    (data / "red" / "000.mask.png").write_bytes(b"masks are never read as images")
    out = tmp_path / "model"
    code, stdout, stderr = cli("train", data, "--out", out, "--epochs", "3", "--input-size", "16",
                               "--widths", "6,12", "--batch-size", "8", "--lr", "0.02")
    assert code == 0, stderr
    assert "skipped 1 unreadable image" in stderr and "skipped 1 unreadable image" in stdout
    assert "validation accuracy" in stdout and "ROC AUC" in stdout
    # not a terminal: a line as each epoch begins (and a quarter of the images loaded), each epoch's summary on stdout
    assert "\r" not in stderr and "[21/21] loading images" in stderr
    epochs = [line for line in stderr.splitlines() if "train:" in line]
    assert epochs == [f"[{k}/3] train: epoch {k}" for k in (1, 2, 3)]
    assert [line.split(":")[0] for line in stdout.splitlines() if line.startswith("epoch ")] == [
        "epoch 1/3", "epoch 2/3", "epoch 3/3"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped_images"] == 1 and metrics["train_images"] + metrics["val_images"] == 20
    assert len(metrics["history"]) == 3 and (out / "roc.png").is_file()
    assert convlens.load_model(out / "model.pt").labels == ["blue", "red"]


def test_unreadable_images_warn_with_a_count(tmp_path):
    data = colour_folder(tmp_path / "data", 3)
    (data / "blue" / "x.jpg").write_bytes(b"nope")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        loaded = load_class_folders(data, 16)
    assert loaded.skipped == 1 and len(loaded) == 6


@pytest.mark.parametrize("case,match", [
    ("empty", "no images found"),
    ("one_class", "only one class ('red')"),
    ("missing", "data folder not found"),
    ("all_of_one_class_unreadable", "only one class"),
    ("corrupt_checkpoint", "cannot read checkpoint"),
    ("not_a_checkpoint", "not a convlens training checkpoint"),
    ("bad_optimizer", "unknown optimizer 'adamm'"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, cli, case, match):
    data = tmp_path / "data"
    data.mkdir()
    extra = []
    if case == "one_class":
        colour_folder(data, 3, classes=("red",))
    elif case == "missing":
        data = tmp_path / "nowhere"
    elif case == "all_of_one_class_unreadable":
        colour_folder(data, 3, classes=("red",))
        (data / "blue").mkdir()
        (data / "blue" / "a.png").write_bytes(b"broken")
    elif case in ("corrupt_checkpoint", "not_a_checkpoint", "bad_optimizer"):
        colour_folder(data, 3)
        checkpoint = tmp_path / "checkpoint.pt"
        if case == "corrupt_checkpoint":
            checkpoint.write_bytes(b"PK\x03\x04 truncated zip")
        else:
            torch.save({"weights": torch.zeros(2)}, checkpoint)
        extra = ["--optimizer", "adamm"] if case == "bad_optimizer" else ["--resume", checkpoint]
    out = tmp_path / "out"
    code, stdout, stderr = cli("train", data, "--out", out, "--epochs", "1", "--input-size", "16", *extra)
    assert code == 2, stderr
    # the log may show the images loaded before the error ("[2/4] loading images"); the error is one line
    errors = [line for line in stderr.strip().splitlines() if not re.match(r"\[\d+/\d+\] loading images$", line)]
    assert match in stderr and len(errors) - stderr.count("warning:") == 1
    assert "Traceback" not in stderr
    assert not out.exists()


def test_shapes_command_writes_a_dataset(tmp_path, cli):
    code, stdout, stderr = cli("shapes", tmp_path, "--per-class", "1", "--size", "32", "--seed", "3",
                               "--classes", "ring,star")
    assert code == 0, stderr
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png")) == [
        "train/ring/00000.mask.png", "train/ring/00000.png", "train/star/00000.mask.png", "train/star/00000.png"]
    code, _, stderr = cli("shapes", tmp_path / "x", "--classes", "ring,sta")
    assert code == 2 and "did you mean 'star'" in stderr and not (tmp_path / "x").exists()
    code, _, stderr = cli("shapes", tmp_path / "y", "--workers", "-1")
    assert code == 2 and "'--workers': Input should be greater than or equal to 0" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "y").exists()


def test_train_reads_train_and_val_folders(tmp_path):
    colour_folder(tmp_path / "train", 6)
    colour_folder(tmp_path / "val", 2, seed=1)
    result = train(tmp_path, tmp_path / "out", TrainConfig(**{**TINY, "epochs": 1}))
    assert result.metrics["train_images"] == 12 and result.metrics["val_images"] == 4


def test_train_config_errors():
    with pytest.raises(ConvlensError, match="--epochs"):
        train(in_memory(3, ("blue", "red")), "/nonexistent/never", TrainConfig(epochs=0))
