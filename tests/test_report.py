"""The report: the sections and pictures it must contain, and that a browser shows it cleanly and readably."""

import base64
import math
import re
import shutil
from html import unescape

import pytest
import torch
from PIL import Image

import convlens as cl
from convlens.heatmaps import METHODS
from convlens.report.sections import REPORT_METHODS
from convlens.metrics import METRICS
from convlens.metrics.stats import MeanCI
from convlens.report import ReportImage, build_report

from conftest import TinyNet

LABELS = ["circle", "square", "star"]


@pytest.fixture(scope="module")
def report_run(tmp_path_factory):
    """The report on a tiny model: its path, its HTML and every progress step it reported."""
    torch.manual_seed(0)
    model = cl.load_model(TinyNet(), labels=LABELS)
    folder = tmp_path_factory.mktemp("report")
    picture = folder / "red.png"
    Image.new("RGB", (48, 40), (220, 40, 40)).save(picture)
    square = torch.zeros(40, 48, dtype=torch.bool)
    square[10:30, 12:36] = True
    images = [picture, ReportImage("chelsea", cl.sample_image("chelsea"), label="cat"),
              ReportImage("masked", Image.new("RGB", (48, 40), (30, 200, 30)), square.numpy(), label="square")]
    steps = []
    tcav = _tcav_sets(folder)
    # every method: fourteen panels per image are what overflowed a 1280 px page
    path = build_report(model, images, folder / "r.html", filter_steps=4, progress=steps.append, **tcav)
    return path, path.read_text(), steps


def _tcav_sets(folder):
    """Two concepts (red and blue noise, 10 images each) and a pool of grey noise for the TCAV section."""
    import numpy as np

    rng = np.random.default_rng(0)
    for name, colour, count in (("red", (200, 30, 30), 10), ("blue", (30, 30, 200), 10),
                                ("pool", (120, 120, 120), 24)):
        (folder / "tcav" / name).mkdir(parents=True)
        for i in range(count):
            pixels = np.clip(rng.normal(0, 40, (12, 12, 3)) + colour, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / "tcav" / name / f"{i:03d}.png")
    (folder / "tcav" / "concepts").mkdir()
    for name in ("red", "blue"):
        shutil.move(folder / "tcav" / name, folder / "tcav" / "concepts" / name)
    return {"tcav_concepts": folder / "tcav" / "concepts", "tcav_random": folder / "tcav" / "pool",
            "tcav_random_size": 12}


@pytest.fixture(scope="module")
def report_html(report_run):
    return report_run[:2]


def _section(html: str, name: str) -> str:
    start = html.index(f'<section id="{name}">')
    return html[start:html.index("</section>", start)]


def test_report_has_every_section_and_embedded_pictures(report_html):
    _, html = report_html
    for section in ("model", "predictions", "heatmaps", "concepts", "tcav", "classes", "activations", "filters",
                    "evaluation"):
        assert f'<section id="{section}">' in html
    assert "conv2" in html and "Conv2d" in html  # the layer table
    # 3 thumbnails + 3 images x (original + every method) + a concepts figure per image + a TCAV figure
    # + one map per class (3) + 2 activation grids + 2 filter grids + class models
    assert len(re.findall(r'<img src="data:image/png;base64,', html)) == \
        3 + 3 * (1 + len(REPORT_METHODS)) + 3 + 1 + 3 + 2 + 2 + 1
    assert "ground-truth object masks" in html
    # self-contained: nothing fetched from anywhere
    assert not re.search(r'(src|href)="(https?:)?//', html)


def test_the_concepts_section_is_the_factorization_of_the_explained_layer(report_run):
    path, html, _ = report_run
    concepts = _section(html, "concepts")
    assert concepts.count("<figure>") == 3 and "split into 4 non-negative concepts" in concepts
    torch.manual_seed(0)
    model = cl.load_model(TinyNet(), labels=LABELS)  # the report's model, seeded alike, on the same three images
    pictures = [Image.open(path.parent / "red.png").convert("RGB"), cl.sample_image("chelsea"),
                Image.new("RGB", (48, 40), (30, 200, 30))]
    parts = cl.factorize(model, model.preprocess(pictures), cl.auto_layer(model), 4)
    assert "over all 3 images" in concepts and f"leaves {parts.error:.0%} of the activations" in concepts
    assert f"{parts.layer}&#39;s activations" in concepts or f"{parts.layer}'s activations" in concepts


def test_the_tcav_section_is_the_apis_tcav_of_the_images_top_classes(report_run):
    path, html, _ = report_run
    section = unescape(_section(html, "tcav"))
    torch.manual_seed(0)
    model = cl.load_model(TinyNet(), labels=LABELS)  # the report's model, seeded alike, on the same three images
    pictures = [Image.open(path.parent / "red.png").convert("RGB"), cl.sample_image("chelsea"),
                Image.new("RGB", (48, 40), (30, 200, 30))]
    classes = list(dict.fromkeys(top[0].index for top in model.predict(pictures, top_k=1)))
    expected = cl.tcav(model, classes, path.parent / "tcav" / "concepts", [cl.auto_layer(model)],
                       path.parent / "tcav" / "pool", inputs=pictures, random_size=12)
    assert len(expected.rows) == 2 * len(classes)
    for row in expected.rows:  # every row, in the API's order, with its numbers as the API gives them
        cells = [row.class_, row.concept, row.layer, f"{row.score:.3f}", f"{row.std:.3f}", f"{row.random_score:.3f}",
                 f"{row.p_value:.3g}", "yes" if row.significant else "no", f"{row.accuracy:.2f}"]
        tds = "".join(("<td class=\"num\">" if i in (3, 4, 5, 6, 8) else "<td>") + cell + "</td>"
                      for i, cell in enumerate(cells))
        assert f"<tr>{tds}</tr>" in section
    assert "fraction of the report's images whose class logit rises" in section and "over 10 runs" in section
    assert section.count("<figure>") == 1


def test_tcav_options_that_cannot_make_a_section_are_one_line_before_any_work(tmp_path, cli):
    sets = _tcav_sets(tmp_path)
    code, _, err = cli("report", "--tcav-concepts", sets["tcav_concepts"], "--out", tmp_path / "r.html")
    assert code == 2 and "TCAV needs random sets beside the concepts" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli("report", "--tcav-concepts", tmp_path / "nowhere", "--tcav-random", sets["tcav_random"],
                       "--out", tmp_path / "r.html")
    assert code == 2 and "nowhere" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r.html").exists()


def test_the_heatmaps_wrap_and_say_how_each_kind_is_drawn(report_html):
    heatmaps = _section(report_html[1], "heatmaps")
    assert heatmaps.count('class="hm-image"') == 3 and 'class="grid"' not in heatmaps  # no sideways-scrolling table
    assert "Left out" not in heatmaps
    pixel = [name for name in REPORT_METHODS if METHODS[name].pixel_level]
    others = [name for name in REPORT_METHODS if name not in pixel]
    assert pixel and others
    # one colour bar per style, each naming its methods and what low/high mean
    assert heatmaps.count('class="colorbar"') == 2 and heatmaps.count("&larr; attribution &rarr;") == 2
    assert f"{', '.join(others)}: jet over the photo at opacity 0.4" in heatmaps
    assert (f"{', '.join(pixel)}: the map alone on black (inferno), its top 1 % of pixels at full brightness"
            in heatmaps)
    assert "linear-gradient(to right, #000004" in heatmaps  # inferno starts black: the sparse maps' background


def test_a_photo_outside_the_model_s_classes_is_called_one(report_html):
    predictions = unescape(_section(report_html[1], "predictions"))
    # the count and the names come from the model's class list
    assert ("chelsea (cat) is outside the 3 classes this model knows (circle, square, star). A classifier always "
            "answers with one of its own classes") in predictions
    assert re.search(r"'(circle|square|star)' at \d+\.\d% for chelsea says which of its 3 classes", predictions)
    assert "chelsea (cat: not one of the model's classes)" in predictions
    assert "masked (square" not in predictions  # a square is one of its classes
    assert "cat: not one of the model&#39;s classes" in _section(report_html[1], "heatmaps")


def test_outside_classes_matches_whole_words_of_the_class_names():
    from convlens.report.context import outside_classes

    shapes = cl.load_model(TinyNet(), labels=LABELS)
    photo = Image.new("RGB", (8, 8))
    assert outside_classes(shapes, ReportImage("c", photo, label="cat"))
    assert not outside_classes(shapes, ReportImage("c", photo, label="Circle"))
    assert not outside_classes(shapes, ReportImage("c", photo))  # no label: nothing to say
    imagenet_like = cl.load_model(TinyNet(), labels=["tiger cat", "coffee mug", "bubble"])
    assert not outside_classes(imagenet_like, ReportImage("chelsea", photo, label="cat"))
    assert not outside_classes(imagenet_like, ReportImage("coffee", photo, label="coffee"))
    assert outside_classes(imagenet_like, ReportImage("ring", photo, label="ring"))
    assert not outside_classes(cl.load_model(TinyNet()), ReportImage("c", photo, label="cat"))  # no class names


def test_the_trust_table_has_readable_headers_the_best_highlighted_and_a_verdict(report_html):
    evaluation = _section(report_html[1], "evaluation")
    from convlens.report.evaluation_section import DEFAULT_METRICS, SANITY_LABEL

    for name in DEFAULT_METRICS:
        metric = METRICS[name]
        assert f"{metric.label} {'↑' if metric.higher_is_better else '↓'}</th>" in evaluation
    assert "pointing_scaled" not in evaluation and f"{SANITY_LABEL} ↓</th>" in evaluation
    assert 'class="num best"' in evaluation and '<p class="verdict"><b>Verdict.</b> ' in evaluation


@pytest.mark.parametrize("name", sorted(METRICS))
def test_every_metric_has_a_label_for_people(name):
    assert METRICS[name].label and "_" not in METRICS[name].label


def _ci(mean: float) -> MeanCI:
    return MeanCI(mean, mean - 0.1, mean + 0.1, 8)


def _table(values: dict[str, tuple[float, ...]]) -> dict:
    """method -> (pointing, iou, deletion, insertion) means as a summary."""
    names = ("pointing_scaled", "iou", "deletion", "insertion")
    return {method: {name: _ci(v) for name, v in zip(names, row)} for method, row in values.items()}


VERDICT_METRICS = {name: METRICS[name] for name in ("pointing_scaled", "iou", "deletion", "insertion")}


def test_the_verdict_is_computed_from_the_numbers():
    from convlens.report.evaluation_section import verdict

    summary = _table({"gradcam": (0.9, 0.5, 0.30, 0.80), "saliency": (0.7, 0.1, 0.10, 0.90),
                      "layercam": (0.8, 0.4, 0.20, 0.85)})
    sanity = {"gradcam": _ci(0.05), "saliency": _ci(0.2), "layercam": _ci(0.93)}
    said = verdict(summary, VERDICT_METRICS, sanity)
    assert said == ("gradcam localises best (best on 2 of 2 localisation scores). saliency is the most faithful to "
                    "the model (best on 2 of 2 faithfulness scores). layercam failed the sanity check: its maps stay "
                    "alike when every weight is randomised (rank correlation 0.93; a pass is below 0.5), so its "
                    "scores say little about this model.")
    # other numbers, another verdict: deletion is lower-is-better, so 0.05 now wins it for layercam
    summary["layercam"]["deletion"] = _ci(0.05)
    summary["gradcam"]["iou"] = _ci(0.3)
    sanity["layercam"] = _ci(0.3)
    said = verdict(summary, VERDICT_METRICS, sanity)
    assert said == ("gradcam and layercam localise best (each best on 1 of 2 localisation scores). layercam and "
                    "saliency are the most faithful to the model (each best on 1 of 2 faithfulness scores). No method "
                    "failed the sanity check: every map changes when the weights are randomised (rank correlation at "
                    "most 0.30; a pass is below 0.5).")


def test_the_verdict_names_tied_leaders_once_and_skips_what_was_not_run():
    from convlens.evaluation import best_methods
    from convlens.report.evaluation_section import verdict

    # 0.8754 and 0.8751 both show as 0.875: a tie in the table is a tie in the verdict
    summary = _table({"a": (0.8754, 0.5, 0.1, 0.9), "b": (0.8751, 0.5, 0.1, 0.9), "c": (0.5, 0.2, 0.3, 0.4)})
    assert best_methods(summary, VERDICT_METRICS) == {name: ["a", "b"] for name in VERDICT_METRICS}
    assert verdict(summary, VERDICT_METRICS) == (
        "a and b both localise best (each best on 2 of 2 localisation scores) and are the most faithful to the "
        "model (each best on 2 of 2 faithfulness scores).")
    empty = {"a": {name: MeanCI(math.nan, math.nan, math.nan, 0) for name in VERDICT_METRICS}}
    assert verdict(empty, VERDICT_METRICS) == ""


def test_report_needs_a_spatial_layer(tmp_path):
    flat = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    model = cl.load_model(flat)
    model.input_size = (8, 8)
    with pytest.raises(cl.ConvlensError, match="spatial"):
        build_report(model, [ReportImage("x", Image.new("RGB", (8, 8)))], tmp_path / "r.html")
    assert not list(tmp_path.iterdir())


#: Measured in the page: the viewport, the heatmap section's overflow, its colour bars, the verdict and the
#: methods whose row has a best cell in the trust table.
MEASURE = """
const width = document.documentElement.clientWidth;
const section = document.getElementById('heatmaps');
const inside = [section, ...section.querySelectorAll('*')];
const wide = inside.filter(e => { const r = e.getBoundingClientRect();
                                  return r.width > 0 && (r.left < -0.5 || r.right > width + 0.5); })
                   .map(e => e.tagName + '.' + e.className);
const scrolling = inside.filter(e => e.clientWidth > 0 && e.scrollWidth > e.clientWidth + 1)
                        .map(e => e.tagName + '.' + e.className);
const bars = [...section.querySelectorAll('.colorbar')].map(e => ({
    width: e.getBoundingClientRect().width, image: getComputedStyle(e).backgroundImage}));
const verdict = document.querySelector('#evaluation .verdict');
const best = [...document.querySelectorAll('#evaluation td.best')].map(td => td.parentElement.cells[0].textContent);
return {innerWidth: window.innerWidth, width: width, pageWidth: document.documentElement.scrollWidth,
        wide: wide, scrolling: scrolling, bars: bars, verdict: verdict ? verdict.textContent : null,
        best: [...new Set(best)], height: document.documentElement.scrollHeight};
"""


@pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                    reason="Chromium is not installed (make test installs it when run as root)")
def test_report_reads_in_headless_chromium_at_1280_px(report_html, tmp_path):
    """At 1280 px: nothing of the heatmaps sideways, colour bars, a verdict naming a best method; screenshots kept."""
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                 "--window-size=1280,900", "--hide-scrollbars"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=shutil.which("chromedriver"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        # the viewport itself is 1280 px wide, whatever the window decorations take
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                               {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False})
        path, _ = report_html
        driver.get(path.resolve().as_uri())
        assert driver.title.startswith("convlens report")
        loaded = driver.execute_script(
            "return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
        assert loaded
        page = driver.execute_script(MEASURE)
        shots = _screenshots(driver, tmp_path, page["height"])
        print(f"\nscreenshots at 1280 px: {', '.join(str(shot) for shot in shots)}")
        assert page["innerWidth"] == 1280
        assert page["wide"] == [] and page["scrolling"] == []  # every method visible, no sideways scroll
        assert page["pageWidth"] <= page["width"]
        assert len(page["bars"]) == 2
        for bar in page["bars"]:
            assert bar["width"] >= 100 and bar["image"].startswith("linear-gradient")
        assert page["verdict"] and page["best"]
        named = [method for method in page["best"] if re.search(rf"\b{re.escape(method)}\b", page["verdict"])]
        assert named, (page["verdict"], page["best"])  # the verdict names a method the table shows as best
        colours = Image.open(shots[0]).convert("RGB").getcolors(1 << 20)
        assert colours is not None and len(colours) > 50  # a real page, not a blank one
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == []
    finally:
        driver.quit()


def _screenshots(driver, folder, height: int) -> list:
    """The whole page at 1280 px wide, then the heatmap and evaluation sections, as PNGs in ``folder``."""
    boxes = {"report-1280.png": [0, 0, 1280, height]}
    for name in ("heatmaps", "evaluation"):
        boxes[f"report-1280-{name}.png"] = driver.execute_script(
            "const r = document.getElementById(arguments[0]).getBoundingClientRect();"
            "return [r.left + window.scrollX, r.top + window.scrollY, r.width, r.height];", name)
    shots = []
    for filename, (x, y, width, tall) in boxes.items():
        shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": x, "y": y, "width": width, "height": min(tall, 16000), "scale": 1}})
        shots.append(folder / filename)
        shots[-1].write_bytes(base64.b64decode(shot["data"]))
    return shots


def test_the_class_grid_is_one_gradcam_per_class_and_only_for_few_classes(tmp_path):
    from convlens.report.context import Context
    from convlens.report.sections import MAX_CLASS_GRID, classes_section

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
    assert [s.detail for s in parts["heatmaps"]] == list(REPORT_METHODS)
    assert len(parts["filters"]) == 2 + 1  # two layers of TinyNet, then the class models
    # the evaluation: the one masked image, for each of the four default methods, then their sanity checks
    evaluated = ("gradcam", "scorecam", "layercam", "saliency")
    assert [s.detail for s in parts["evaluation"]] == ([f"{m} on masked" for m in evaluated]
                                                       + [f"sanity check, {m}" for m in evaluated])
    assert str(parts["heatmaps"][1]) == f"[3/{len(SECTIONS)}] heatmaps: gradcam (2/{len(REPORT_METHODS)})"


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
    from convlens.report.context import Context
    from convlens.report.evaluation_section import evaluation_section

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
    # cam's two pairs and its sanity check are skipped, counted all the same
    assert [str(s) for s in seen] == ["[1/1] evaluation", "[1/1] evaluation: saliency on green 0 (4/6)",
                                      "[1/1] evaluation: saliency on green 1 (5/6)",
                                      "[1/1] evaluation: sanity check, saliency (6/6)"]
