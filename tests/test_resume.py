"""Resuming ``evaluate``: only the very same run is continued, and a damaged journal or run.json is repaired.

Stand-in explainers (as in test_evaluate_cli) keep every run to a few tiny forward passes.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from convlens.errors import ConvlensError
from convlens.evaluation import evaluate
from convlens.models.loading import from_module

from conftest import TinyNet

METRICS = ["drop", "deletion"]


def magnitude(model, x, targets):
    return x.abs().sum(1)


def brightness(model, x, targets):
    return x.sum(1)


@pytest.fixture
def calls() -> list:
    return []


@pytest.fixture
def methods(calls):
    """The stand-ins, counting every (image, method) pair they explain."""
    def counted(name, fn):
        def explain_fn(model, x, targets):
            calls.append(name)
            return fn(model, x, targets)
        return explain_fn

    return {"magnitude": counted("magnitude", magnitude), "brightness": counted("brightness", brightness)}


def tiny(seed: int = 0, input_size: int = 16):
    torch.manual_seed(seed)
    return from_module(TinyNet(), input_size=input_size)


@pytest.fixture
def data(tmp_path) -> Path:
    root = tmp_path / "data"
    root.mkdir()
    for i in range(4):
        array = np.zeros((20, 20, 3), np.uint8)
        array[2 + 3 * i: 10 + 3 * i, 4:12] = (200, 60 * i, 40)
        Image.fromarray(array).save(root / f"a{i}.png")
    return root


def _lines(out: Path) -> list[bytes]:
    return (out / "journal.jsonl").read_bytes().splitlines(keepends=True)


@pytest.fixture
def clean(tmp_path, data, methods, calls) -> Path:
    """A finished run (8 pairs) to compare resumed runs with."""
    evaluate(tiny(), data, methods=methods, metrics=METRICS, out_dir=tmp_path / "clean")
    calls.clear()
    return tmp_path / "clean"


# -- other settings are refused, --restart starts over ---------------------------------------------

@pytest.mark.parametrize("change,message", [
    ("model", "model: other weights (sha256 "),
    ("input size", "model: other preprocessing or input size"),
    ("methods", "methods: magnitude,brightness → magnitude"),
    ("metrics", "metrics: drop,deletion → drop"),
    ("an added image", "data: 4 → 5 images"),
    ("an edited image", "data: image files renamed, edited or copied"),
    ("limit", "--limit: none → 2"),
])
def test_a_run_with_other_settings_is_refused_and_left_alone(clean, data, methods, calls, change, message):
    arguments = {"model": tiny(), "methods": methods, "metrics": METRICS, "limit": None}
    if change == "model":
        arguments["model"] = tiny(seed=1)  # same architecture and name, other weights
    elif change == "input size":
        arguments["model"] = tiny(input_size=12)
    elif change == "methods":
        arguments["methods"] = {"magnitude": methods["magnitude"]}
    elif change == "metrics":
        arguments["metrics"] = ["drop"]
    elif change == "an added image":
        Image.new("RGB", (20, 20), "blue").save(data / "a9.png")
    elif change == "an edited image":
        Image.new("RGB", (20, 20), "blue").save(data / "a1.png")
    else:
        arguments["limit"] = 2
    before = {p.name: p.read_bytes() for p in clean.iterdir()}
    with pytest.raises(ConvlensError) as caught:
        evaluate(arguments.pop("model"), data, out_dir=clean, **arguments)
    assert message in str(caught.value) and "pass a new --out, or --restart" in str(caught.value)
    assert "\n" not in str(caught.value) and calls == []
    assert {p.name: p.read_bytes() for p in clean.iterdir()} == before


def test_the_same_run_again_is_continued_not_refused(clean, data, methods, calls):
    result = evaluate(tiny(), data, methods=methods, metrics=METRICS, out_dir=clean)
    assert calls == [] and len(result.rows) == 8


def test_a_limited_sample_is_continued_with_the_same_seed_and_refused_with_another(data, methods, calls, tmp_path):
    out = tmp_path / "sample"
    first = evaluate(tiny(), data, methods=methods, metrics=METRICS, out_dir=out, limit=2, seed=0)
    assert "a sample of 2 of 4 images" in first.sample and len(calls) == 4
    calls.clear()
    again = evaluate(tiny(), data, methods=methods, metrics=METRICS, out_dir=out, limit=2, seed=0)
    assert calls == [] and again.rows == first.rows
    with pytest.raises(ConvlensError, match="--seed: 0 → 1"):
        evaluate(tiny(), data, methods=methods, metrics=METRICS, out_dir=out, limit=2, seed=1)
    assert calls == []
    # without --limit the seed chooses nothing, so it is no reason to refuse
    evaluate(tiny(), data, methods=methods, metrics=METRICS, out_dir=tmp_path / "all", seed=3)
    calls.clear()
    evaluate(tiny(), data, methods=methods, metrics=METRICS, out_dir=tmp_path / "all", seed=4)
    assert calls == []


def test_restart_discards_the_old_run(clean, data, methods, calls, tmp_path):
    other = tiny(seed=1)
    evaluate(other, data, methods={"magnitude": methods["magnitude"]}, metrics=["drop"], out_dir=clean,
             restart=True)
    assert len(calls) == 4  # nothing of the old run was reused
    fresh = tmp_path / "fresh"
    evaluate(other, data, methods={"magnitude": magnitude}, metrics=["drop"], out_dir=fresh)
    assert (clean / "results.csv").read_text() == (fresh / "results.csv").read_text()
    assert not (clean / "deletion.png").exists()  # the old run's plot went with it
    assert json.loads((clean / "run.json").read_text()) == json.loads((fresh / "run.json").read_text())
    assert len(_lines(clean)) == 4


def test_a_run_from_before_fingerprints_is_refused(clean, data, methods):
    (clean / "run.json").write_text(json.dumps({"model": "TinyNet", "metrics": METRICS}))
    with pytest.raises(ConvlensError, match="it was made by another convlens version"):
        evaluate(tiny(), data, methods=methods, metrics=METRICS, out_dir=clean)


# -- damage is dropped, counted and recomputed --------------------------------------------------------

def _resume(out, data, methods, model=None):
    return evaluate(model or tiny(), data, methods=methods, metrics=METRICS, out_dir=out)


def test_a_corrupt_line_in_the_middle_is_dropped_and_recomputed(clean, data, methods, calls, tmp_path):
    lines = _lines(clean)
    lines[3] = b'{"image": "a1.png", "method": "bri\xff\xfe garbage}\n'
    lines[5] = b'{"not": "a record"}\n'
    (clean / "journal.jsonl").write_bytes(b"".join(lines))
    table = (tmp_path / "clean" / "results.csv").read_text()
    with pytest.warns(UserWarning, match=r"dropped 2 damaged journal line\(s\), to be recomputed; kept 6"):
        _resume(clean, data, methods)
    assert len(calls) == 2
    assert (clean / "results.csv").read_text() == table
    assert all(json.loads(line)["values"] for line in _lines(clean)) and len(_lines(clean)) == 8


def test_nul_bytes_at_the_end_are_dropped_and_the_lost_pairs_recomputed(clean, data, methods, calls):
    lines = _lines(clean)
    nuls = b"\x00" * len(b"".join(lines[-2:]))  # a crash: the file's size was written, its last blocks were not
    (clean / "journal.jsonl").write_bytes(b"".join(lines[:-2]) + nuls)
    table = (clean / "results.csv").read_text()
    with pytest.warns(UserWarning, match=r"dropped 1 damaged journal line\(s\), to be recomputed; kept 6"):
        _resume(clean, data, methods)
    assert len(calls) == 2
    assert (clean / "results.csv").read_text() == table
    assert b"\x00" not in (clean / "journal.jsonl").read_bytes() and len(_lines(clean)) == 8


def test_a_truncated_run_json_is_rewritten_and_the_journal_still_trusted(clean, data, methods, calls):
    text = (clean / "run.json").read_text()
    (clean / "run.json").write_text(text[: len(text) // 2])
    with pytest.warns(UserWarning, match=r"run.json was damaged and is rewritten; kept 8"):
        _resume(clean, data, methods)
    assert calls == [] and (clean / "run.json").read_text() == text


def test_with_run_json_damaged_the_lines_of_another_model_are_not_trusted(clean, data, methods, calls):
    (clean / "run.json").write_bytes(b"\x00" * 64)
    with pytest.warns(UserWarning, match=r"dropped 8 line\(s\) of another run, to be recomputed; kept 0"):
        _resume(clean, data, methods, model=tiny(seed=1))
    assert len(calls) == 8


# -- the command line -------------------------------------------------------------------------------

@pytest.fixture
def run(monkeypatch, cli):
    from convlens.evaluation import EXPLAINERS

    for name, fn in {"magnitude": magnitude, "brightness": brightness}.items():
        monkeypatch.setitem(EXPLAINERS, name, fn)

    return cli


def test_cli_refuses_another_model_under_the_same_file_name_and_restarts_on_request(run, data, tmp_path):
    model_file, out = checkpoint(tmp_path / "model.pt", seed=0), tmp_path / "eval"
    args = ["evaluate", model_file, data, "--methods", "magnitude", "--metrics", "drop", "--out", out]
    assert run(*args)[0] == 0
    journal = (out / "journal.jsonl").read_bytes()
    checkpoint(model_file, seed=1)  # another model, same file name
    code, _, err = run(*args)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "holds a run with other settings (model: other weights" in err and "--restart" in err
    assert (out / "journal.jsonl").read_bytes() == journal
    code, _, err = run(*args, "--restart")
    assert code == 0, err
    assert (out / "journal.jsonl").read_bytes() != journal and len(_lines(out)) == 4


def test_cli_says_on_one_line_what_was_dropped(run, data, tmp_path):
    out = tmp_path / "eval"
    args = ["evaluate", checkpoint(tmp_path / "tiny.pt"), data, "--methods", "magnitude", "--metrics", "drop",
            "--out", out]
    assert run(*args)[0] == 0
    with open(out / "journal.jsonl", "ab") as journal:
        journal.write(b"\x00" * 100)
    code, _, err = run(*args)
    assert code == 0
    assert [line for line in err.splitlines() if "warning" in line] == [
        f"convlens: warning: {out}: dropped 1 damaged journal line(s), to be recomputed; "
        "kept 4 finished (image, method) pair(s)"]


def checkpoint(path: Path, seed: int = 0) -> Path:
    """A tiny convlens checkpoint file (weights, not pickled code, so it loads without trusting it)."""
    from convlens.models.nets import ShapesNet

    torch.manual_seed(seed)
    net = ShapesNet(num_classes=3, widths=(4, 8))
    torch.save({"convlens": "test", "arch": "shapesnet", "arch_kwargs": {"num_classes": 3, "widths": [4, 8]},
                "state_dict": net.state_dict(), "input_size": [16, 16]}, path)
    return path
