"""The report: the sections and pictures it must contain, and that a browser shows it cleanly."""

import re
import shutil

import pytest
import torch
from PIL import Image

import convlens as cl
from convlens.report import ReportImage, build_report

from conftest import TinyNet


@pytest.fixture(scope="module")
def report_run(tmp_path_factory):
    """The report on a tiny model: its path, its HTML and every progress step it reported."""
    torch.manual_seed(0)
    model = cl.load_model(TinyNet(), labels=["circle", "square", "star"])
    folder = tmp_path_factory.mktemp("report")
    picture = folder / "red.png"
    Image.new("RGB", (48, 40), (220, 40, 40)).save(picture)
    square = torch.zeros(40, 48, dtype=torch.bool)
    square[10:30, 12:36] = True
    images = [picture, ReportImage("cat", cl.sample_image("chelsea")),
              ReportImage("masked", Image.new("RGB", (48, 40), (30, 200, 30)), square.numpy())]
    steps = []
    path = build_report(model, images, folder / "r.html", filter_steps=4,
                        methods=["gradcam", "scorecam", "saliency"], progress=steps.append)
    return path, path.read_text(), steps


@pytest.fixture(scope="module")
def report_html(report_run):
    return report_run[:2]


def test_report_has_every_section_and_embedded_pictures(report_html):
    _, html = report_html
    for section in ("model", "predictions", "heatmaps", "classes", "activations", "filters"):
        assert f'<section id="{section}">' in html
    assert "conv2" in html and "Conv2d" in html  # the layer table
    # 3 thumbnails + 3 images x (original + 3 methods) + one map per class (3) + 2 activation grids
    # + 2 filter grids + class models
    assert len(re.findall(r'<img src="data:image/png;base64,', html)) == 3 + 3 * 4 + 3 + 2 + 2 + 1
    assert "ground-truth object masks" in html
    # self-contained: nothing fetched from anywhere
    assert not re.search(r'(src|href)="(https?:)?//', html)


def test_report_needs_a_spatial_layer(tmp_path):
    flat = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    model = cl.load_model(flat)
    model.input_size = (8, 8)
    with pytest.raises(cl.ConvlensError, match="spatial"):
        build_report(model, [ReportImage("x", Image.new("RGB", (8, 8)))], tmp_path / "r.html")
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                    reason="Chromium is not installed (make test installs it when run as root)")
def test_report_opens_in_headless_chromium_without_console_errors(report_html, tmp_path):
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                 "--window-size=1200,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        path, _ = report_html
        driver.get(path.resolve().as_uri())
        assert driver.title.startswith("convlens report")
        loaded = driver.execute_script(
            "return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        assert loaded
        shot = tmp_path / "shot.png"
        assert driver.save_screenshot(str(shot))
        colours = Image.open(shot).convert("RGB").getcolors(1 << 20)
        assert colours is not None and len(colours) > 50  # a real page, not a blank one
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == []
    finally:
        driver.quit()


def test_the_class_grid_is_one_gradcam_per_class_and_only_for_few_classes(tmp_path):
    from convlens.report.sections import MAX_CLASS_GRID, Context, classes_section

    torch.manual_seed(0)
    model = cl.load_model(TinyNet(), input_size=16)
    picture = cl.sample_image("chelsea")
    ctx = Context(model, cl.summarize(model), [ReportImage("cat", picture)])
    section = classes_section(ctx)
    assert section.html.count("<img ") == 3 and "every class's gradient from the same forward pass" in section.note
    many = cl.load_model(TinyNet(classes=MAX_CLASS_GRID + 1), input_size=16)
    assert classes_section(Context(many, cl.summarize(many), [ReportImage("cat", picture)])) is None


# -- progress ----------------------------------------------------------------------------------------

def test_progress_announces_the_totals_it_then_reports(report_run):
    from convlens.report.sections import SECTIONS

    steps = report_run[2]
    sections = [step for step in steps if step.part == 0]
    # every section begins once, in order, and the first step already says how many there are
    assert [(s.index, s.total) for s in sections] == [(k, len(SECTIONS)) for k in range(1, len(SECTIONS) + 1)]
    assert {s.total for s in steps} == {len(SECTIONS)}
    parts = {}
    for step in steps:
        if step.part:
            parts.setdefault(step.name, []).append(step)
    # each long section announced its sub-steps before the first and then reported exactly that many
    for name, reported in parts.items():
        assert [s.part for s in reported] == list(range(1, len(reported) + 1))
        assert {s.parts for s in reported} == {len(reported)}, name
    assert [s.detail for s in parts["heatmaps"]] == ["gradcam", "scorecam", "saliency"]
    assert len(parts["filters"]) == 2 + 1  # two layers of TinyNet, then the class models
    # the evaluation: the one masked image, for each of the four default methods
    assert [s.detail for s in parts["evaluation"]] == [f"{m} on masked" for m in
                                                       ("gradcam", "scorecam", "layercam", "saliency")]
    assert str(parts["heatmaps"][1]) == f"[3/{len(SECTIONS)}] heatmaps: scorecam (2/3)"


def test_report_cli_prints_one_plain_line_per_step_when_not_a_terminal(report_run, cli, monkeypatch, tmp_path):
    steps = report_run[2]

    def replay(model, images, out, *, progress):  # the real report's steps, without building it again
        for step in steps:
            progress(step)
        out.write_text("<html></html>")
        return out

    monkeypatch.setattr("convlens.report.build_report", replay)  # the command imports it when it runs
    code, stdout, stderr = cli("report", "--out", tmp_path / "r.html")
    assert code == 0, stderr
    assert "\r" not in stderr and "report written to" in stdout
    assert stderr.splitlines() == [str(step) for step in steps]
    assert all(re.match(r"\[\d+/\d+\] ", line) for line in stderr.splitlines())


def test_an_evaluation_method_that_does_not_apply_still_ends_on_the_announced_count():
    from torch import nn

    from convlens.progress import Steps
    from convlens.report.sections import Context, evaluation_section

    torch.manual_seed(0)
    max_pooled = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(),
                               nn.Linear(4, 3))  # no global average pooling: CAM does not apply
    model = cl.load_model(max_pooled, input_size=16)
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[4:12, 4:12] = True
    images = [ReportImage(f"green {i}", Image.new("RGB", (16, 16), (30, 200, 30 * i)), mask.numpy()) for i in range(2)]
    seen = []
    steps = Steps(1, seen.append)
    steps.begin("evaluation")
    options = {"evaluation_methods": ["cam", "saliency"]}
    section = evaluation_section(Context(model, cl.summarize(model), images, options, steps))
    assert "cam: " in section.note  # left out with its reason
    assert [str(s) for s in seen] == ["[1/1] evaluation", "[1/1] evaluation: saliency on green 0 (3/4)",
                                      "[1/1] evaluation: saliency on green 1 (4/4)"]
