"""The explorer's page in headless system Chromium (selenium + the system chromedriver), at / and behind a prefix.

One walk through the page: pick an image, switch method and layer, change the target class,
side by side, open a unit page with its top dataset examples and filter pattern, the trust
view, the link that reproduces the view, the PNG; no console errors. Screenshots are saved
under the test's temporary folder (``pytest tests/test_serve_browser.py -s`` prints where).
"""

from __future__ import annotations

import base64
import shutil
import time

import pytest

import convlens as cl

pytest.importorskip("fastapi")
webdriver = pytest.importorskip("selenium.webdriver")

from test_serve import _tiny_model  # noqa: E402

pytestmark = pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                                reason="Chromium is not installed (make test installs it when run as root)")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from convlens.data.shapes import write_shapes

    root = tmp_path_factory.mktemp("browser")
    data = write_shapes(root / "data", 1, seed=5, size=32, split=None)
    model = _tiny_model()
    cl.dissect(model, data, ["conv2"], out=root / "dissection", figures=False, k=3)
    return {"model": model, "data": data, "atlas": root / "dissection", "root": root}


def _chromium(profile):
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}",
                 "--window-size=1280,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")))


def _until(driver, script: str, timeout: float = 30):
    """The value of ``script`` once it is truthy (polled)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = driver.execute_script(script)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for: {script}; the page says: " + str(driver.execute_script(
        "return [document.getElementById('message').textContent, "
        "[...document.querySelectorAll('.job-state')].map(e => e.textContent)]")))


CAPTION = "return document.querySelector('#panel-1 figcaption').textContent"


def _choose(driver, select_id: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element("id", select_id)).select_by_value(value)


@pytest.mark.parametrize("prefix", ["", "/tools/convlens"])
def test_the_page_in_headless_chromium(world, tmp_path, prefix):
    server = cl.serve(world["model"], data=world["data"], atlas=world["atlas"], cache=tmp_path / "cache",
                      root_path=prefix)
    driver = _chromium(tmp_path / "profile")
    shots = []

    def shot(name):  # the whole page, beyond the viewport too
        shots.append(tmp_path / f"serve{prefix.replace('/', '-')}-{name}.png")
        height = driver.execute_script("return document.documentElement.scrollHeight")
        picture = driver.execute_cdp_cmd("Page.captureScreenshot", {
            "format": "png", "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": 1280, "height": min(height, 8000), "scale": 1}})
        shots[-1].write_bytes(base64.b64decode(picture["data"]))

    try:
        assert server.url.endswith(f"{prefix}/")
        driver.get(server.url)
        _until(driver, "return document.body.dataset.ready")
        assert driver.execute_script(CAPTION).startswith("gradcam at relu2: ")
        assert len(driver.find_elements("css selector", "#predictions li")) == 3
        disabled = driver.execute_script("return [...document.querySelectorAll('#method option')].filter(o => o.disabled).length")
        assert disabled == 0  # every method applies to TinyNet
        shot("start")

        _choose(driver, "image", "star/00000.png")  # pick an image
        _until(driver, "return location.hash.includes('image=star%2F00000.png') && "
                       "document.getElementById('original').complete")
        _choose(driver, "method", "scorecam")  # a slow method: a background job, then the same panel
        _until(driver, CAPTION + ".startsWith('scorecam at relu2')")
        _choose(driver, "method", "layercam")  # switch method
        _until(driver, CAPTION + ".startsWith('layercam at relu2')")
        _choose(driver, "layer", "conv1")  # switch layer: the heatmap and the grid follow
        _until(driver, CAPTION + ".startsWith('layercam at conv1')")
        _until(driver, "return document.getElementById('grid-layer').textContent.startsWith('conv1')")
        _choose(driver, "layer", "conv2")
        _until(driver, "return document.getElementById('grid-layer').textContent.startsWith('conv2')")

        third = driver.find_elements("css selector", "#predictions li")[2]  # change the target class
        label = third.text.split(" — ")[0]
        third.click()
        _until(driver, CAPTION + f".endsWith(': {label}')")
        assert "target" in third.get_attribute("class")
        assert f"--targets {third.get_attribute('data-index')}" in driver.find_element("id", "command").text

        driver.find_element("id", "compare").click()  # side by side: layercam beside the second method
        _until(driver, "return !document.getElementById('panel-2').hidden && "
                       "document.querySelector('#panel-2 figcaption').textContent.includes(':')")
        shot("view")

        # open the unit page of channel 2 by clicking its tile in the activation grid
        driver.execute_script("""
            const img = document.getElementById('grid'), box = img.getBoundingClientRect();
            const L = JSON.parse(img.dataset.layout), s = box.width / img.naturalWidth;
            const x = box.left + (L.margin + 2 * (L.tile_width + L.margin) + L.tile_width / 2) * s;
            const y = box.top + (L.margin + L.tile_height / 2) * s;
            img.dispatchEvent(new MouseEvent('click', {clientX: x, clientY: y, bubbles: true}));""")
        _until(driver, "return document.getElementById('unit-title').textContent === '2 of conv2'")
        _until(driver, "const imgs = [...document.querySelectorAll('#examples img')];"
                       "return imgs.length === 6 && imgs.every(i => i.complete && i.naturalWidth > 0)")
        assert "Dissection:" in driver.find_element("id", "unit-label").text
        driver.find_element("id", "pattern-start").click()  # the filter pattern, computed on demand
        _until(driver, "const p = document.getElementById('pattern'); return !p.hidden && p.naturalWidth > 0", 60)
        shot("unit")

        driver.find_element("id", "trust-start").click()  # the trust view
        _until(driver, "return document.querySelectorAll('#trust-table td.best').length > 0", 60)
        assert "sanity check" in driver.find_element("id", "verdict").text
        driver.find_element("id", "save").click()  # the view as a PNG
        assert driver.find_element("id", "download").get_attribute("href").startswith("data:image/png;base64,")
        shot("trust")

        link = driver.find_element("id", "permalink").get_attribute("href")  # the link reproduces the view
        driver.get("about:blank")
        driver.get(link)
        _until(driver, "return document.body.dataset.ready")
        _until(driver, "return document.getElementById('unit-title').textContent === '2 of conv2'")
        assert driver.execute_script(CAPTION).startswith("layercam at conv2") and driver.execute_script(
            CAPTION).endswith(f": {label}")
        assert driver.execute_script("return [document.getElementById('image').value, "
                                     "document.getElementById('compare').checked]") == ["star/00000.png", True]

        fetched = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert fetched and all(name.startswith(server.url) for name in fetched)  # every URL under the prefix
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert errors == []
        print(f"\nscreenshots: {', '.join(str(s) for s in shots)}")
    finally:
        driver.quit()
        server.stop()
