"""The README and the pages of docs/ run as written: every ```python and ```bash/```sh/```shell block is executed.

How a block runs:

* A Python block runs in a fresh interpreter of its own, in an empty temporary
  folder. Blocks do not build on each other: a reader copies one block, so each
  block imports and makes what it uses. The code is compiled under its page's
  name (``README.md``, ``docs/atlas.md``) with the page's line numbers, so a
  traceback points at the line.
* A shell block runs command by command (lines joined at a trailing ``\\``)
  through ``bash`` in an empty temporary folder, with the ``convlens`` script of
  this interpreter's environment (the folder of ``sys.executable``) first on
  ``PATH``; the commands of one block share the folder, as they would in a
  reader's terminal.
* A block that only shows output is fenced ```text and is not run; a fence
  without an info string fails :func:`test_every_block_says_what_it_is`.
* Blocks are independent, so they run two at a time (``WORKERS``), each
  process on one thread: CI machines have two cores, and most of a block's
  time is a fresh interpreter importing torch. Each test waits for its block.

What differs from the pages, all chosen here and never by editing them:

* ``SUBSTITUTIONS``: textual stand-ins for what cannot happen offline or would
  take minutes (random weights instead of a download, a few images instead of
  thousands, two optimisation steps instead of 256), each with its reason.
* ``NOT_RUN``: commands that cannot run inside a test at all, with the reason.
* ``FILES``: the reader's own files a block names (``cat.jpg``, a Keras model, a
  state dict) are written into the block's folder when the block names them.
* ``OBJECTS``: the reader's own Python objects a block names (``my_module``)
  are defined before the block runs, when the block names them.

No block may reach the network: every subprocess gets a proxy that refuses all
connections, so an unintended download fails at once instead of hanging.
A new block, or a new page in docs/, is picked up automatically; a failure names
its page and line (``docs/atlas.md:42``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]  # the README first, then docs/ by name
RUN = {"python": "python", "bash": "shell", "sh": "shell", "shell": "shell"}
SHOWN_ONLY = {"text"}  # output, file contents: shown, never run
TIMEOUT = 300  # seconds per command; the slowest, the default `convlens report`, takes about 45 s on one idle core
WORKERS = 2    # blocks running at once


@dataclass(frozen=True)
class Block:
    """One fenced code block of the README or of a page of docs/."""

    line: int    # line of the opening fence (1-based)
    info: str    # the fence's info string ("python", "bash", "" ...)
    code: str    # the lines between the fences
    source: str = "README.md"  # the page, relative to the repository ("docs/atlas.md")

    def __str__(self) -> str:
        return f"{self.source}:{self.line} ({self.info or 'no info'})"


def readme_blocks(text: str, source: str = "README.md") -> list[Block]:
    """Every fenced block of ``text`` (the page ``source``) with the line of its opening fence."""
    blocks: list[Block] = []
    opening: tuple[int, str] | None = None
    lines: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        fence = re.match(r"^\s*```(.*)$", line)
        if opening is None and fence:
            opening, lines = (number, fence.group(1).strip()), []
        elif opening is not None and fence and not fence.group(1).strip():
            blocks.append(Block(opening[0], opening[1], "\n".join(lines) + "\n", source))
            opening = None
        elif opening is not None:
            lines.append(line)
    if opening is not None:
        raise AssertionError(f"{source}:{opening[0]}: a code block is never closed")
    return blocks


BLOCKS = [block for page in PAGES
          for block in readme_blocks(page.read_text(encoding="utf-8"), page.relative_to(ROOT).as_posix())]
RUNNABLE = [block for block in BLOCKS if block.info in RUN]


@dataclass(frozen=True)
class Substitution:
    old: str
    new: str
    why: str


SUBSTITUTIONS = [
    # Downloads: torchvision's pretrained weights are fetched on first use; random weights need no network.
    Substitution('cl.load_model("resnet50")', 'cl.load_model("resnet50", weights="none")',
                 "pretrained weights would be downloaded"),
    Substitution('cl.load_model("vgg16")', 'cl.load_model("vgg16", weights="none", input_size=64)',
                 "pretrained weights would be downloaded; at 64 px vgg16's optimisation loops take seconds"),
    Substitution("convlens report --model resnet50", "convlens report --model resnet18 --weights none --input-size 32",
                 "pretrained weights would be downloaded; resnet50's filter patterns at 224 px take minutes"),
    Substitution("convlens predict resnet50", "convlens predict resnet50 --weights none",
                 "pretrained weights would be downloaded"),
    Substitution("convlens explain resnet50", "convlens explain resnet18 --weights none --input-size 64",
                 "pretrained weights would be downloaded; Score-CAM on resnet50 at 224 px takes minutes"),
    Substitution("convlens activations vgg16", "convlens activations vgg16 --weights none --input-size 64",
                 "pretrained weights would be downloaded"),
    Substitution("convlens filters resnet18", "convlens filters resnet18 --weights none",
                 "pretrained weights would be downloaded"),
    Substitution("convlens class-model resnet50", "convlens class-model resnet18 --weights none --input-size 64",
                 "pretrained weights would be downloaded; resnet50 at 224 px takes minutes per step batch"),
    Substitution("convlens factorize resnet50", "convlens factorize resnet18 --weights none --input-size 64",
                 "pretrained weights would be downloaded"),
    Substitution("convlens deepdream resnet18", "convlens deepdream resnet18 --weights none",
                 "pretrained weights would be downloaded"),
    # Size: the same commands on a few images and steps instead of thousands.
    Substitution("--per-class 600", "--per-class 3", "4,800 images take a minute to write"),
    Substitution("--per-class 100", "--per-class 2", "fewer images, same command"),
    Substitution("--per-class 25", "--per-class 1", "fewer images, same command"),
    Substitution("--per-class 10", "--per-class 2", "fewer images, same command"),
    Substitution("--epochs 20", "--epochs 1", "training takes minutes"),
    Substitution("--epochs 30", "--epochs 1", "training takes minutes"),
    Substitution("--steps 128", "--steps 2", "each optimisation step costs a forward and backward pass"),
    Substitution("--steps 256", "--steps 2", "each optimisation step costs a forward and backward pass"),
    Substitution("steps=128", "steps=2", "each optimisation step costs a forward and backward pass"),
    Substitution("steps=256", "steps=2", "each optimisation step costs a forward and backward pass"),
    Substitution("--size 128", "--size 32", "smaller filter-pattern images, same command"),
    Substitution("--grid 8x8", "--grid 2x2", "four filters instead of 64"),
    Substitution("filters=range(64)", "filters=range(4)", "four filters instead of 64"),
    Substitution("--octaves 4", "--octaves 1 --steps 2", "each octave is 20 steps of the optimisation"),
    Substitution("octaves=4)", "octaves=1, steps=2)", "each octave is 20 steps of the optimisation"),
    Substitution('methods=["gradcam", "scorecam"])',
                 'methods=["gradcam", "scorecam"], filter_steps=4, atlas_images=24)',
                 "the report's filter patterns take 96 steps and its atlas 200 generated images"),
    Substitution("--shapes 200", "--shapes 24", "fewer generated images, same command"),
    Substitution("shapes=200", "shapes=24", "fewer generated images, same code"),
    Substitution("shapes_dataset(1000", "shapes_dataset(20", "fewer generated images, same code"),
    Substitution("ShapesTorchDataset(10_000", "ShapesTorchDataset(20", "fewer generated images, same code"),
    # Places: the test writes only inside its own temporary folder.
    Substitution("/tmp/", "tmp/", "the test writes only inside its temporary folder"),
]

#: Commands (matched at the start, after substitution) that cannot run inside a test, and why.
NOT_RUN = {
    "make test": "it runs the whole suite, this test included",
    "make demo": "it creates .venv with pip (network); the next block runs its `convlens report` as written",
    "pip install": "it needs the network",
    "apt-get": "it needs the network and root",
    "make lint": "it checks this checkout's source, not an example; `make test` runs it before the suite",
    ".venv/bin/python -m pytest": "it runs tests of the suite from the checkout's .venv, which the test folder lacks",
}

#: The reader's own files: written into a block's folder when the block names them.
FILES = {
    "cat.jpg": "photo:chelsea",
    "cat.mask.png": "mask:chelsea",
    "dog.jpg": "photo:coffee",
    "dog.png": "photo:coffee",
    "pic.png": "photo:astronaut",
    "picture.png": "shape:0",
    "star.png": "shape:5",
    "labels.txt": "labels",
    "model.pt": "checkpoint",
    "weights.pth": "resnet18-state-dict",
    "model.keras": "keras:3",
    "cats_and_dogs.h5": "keras:1",
}

#: The reader's own Python objects: defined before a block that names them runs.
OBJECTS = {
    "my_module": """
        import torch
        my_module = torch.nn.Sequential(  # any CNN of the reader's
            torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(), torch.nn.Linear(8, 5))
        """,
    "detector": """
        import torch

        class _Detector(torch.nn.Module):  # a model with several outputs, the classes under "logits"
            def __init__(self):
                super().__init__()
                self.backbone = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
                self.head = torch.nn.Linear(8, 4)
                self.boxes = torch.nn.Linear(8, 4)

            def forward(self, x):
                features = self.backbone(x).mean((2, 3))
                return {"logits": self.head(features), "boxes": self.boxes(features)}

        detector = _Detector()
        """,
}


def substitute(code: str) -> str:
    for substitution in SUBSTITUTIONS:
        code = code.replace(substitution.old, substitution.new)
    return code


def names(code: str, candidates) -> list[str]:
    """The candidates ``code`` names as a whole word or file name."""
    return [name for name in candidates if re.search(rf"(?<![\w/.-]){re.escape(name)}(?![\w.-])", code)]


def _keras_model(path: Path, classes: int) -> None:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras  # a test dependency (pyproject: test)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
        keras.layers.GlobalAveragePooling2D(name="gap"),
        keras.layers.Dense(classes, activation="sigmoid" if classes == 1 else "softmax", name="head"),
    ])
    model.save(path)


def make_file(name: str, folder: Path) -> None:
    """Write the stand-in for the reader's file ``name`` into ``folder``."""
    path = folder / name
    kind, _, arg = FILES[name].partition(":")
    if kind == "photo":
        from PIL import Image
        from skimage import data

        photo = Image.fromarray(getattr(data, arg)())
        # A third of scikit-image's size: deepdream and the overlays work at the photo's own size.
        photo.resize((photo.width // 3, photo.height // 3), Image.BILINEAR).save(path)
    elif kind == "mask":  # the object's mask beside its photo: white where the object is (here, the middle)
        import numpy as np
        from PIL import Image
        from skimage import data

        height, width = (side // 3 for side in getattr(data, arg)().shape[:2])
        inside = np.zeros((height, width), np.uint8)
        inside[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 255
        Image.fromarray(inside).save(path)
    elif kind == "shape":
        from PIL import Image

        from convlens.data import generate_shape

        Image.fromarray(generate_shape(0, size=128, class_index=int(arg)).image).save(path)
    elif kind == "labels":
        path.write_text("apple\nbanana\ncherry\n")  # the three classes of the model.keras stand-in
    elif kind == "checkpoint":
        shutil.copy(ROOT / "src" / "convlens" / "assets" / "shapes_model.pt", path)
    elif kind == "resnet18-state-dict":
        import torch
        import torchvision

        torch.manual_seed(0)
        torch.save(torchvision.models.resnet18().state_dict(), path)
    elif kind == "keras":
        with warnings.catch_warnings():  # Keras calls .h5 "legacy"; it is still what many readers have
            warnings.simplefilter("ignore")
            _keras_model(path, int(arg))
    else:
        raise AssertionError(f"unknown stand-in kind {kind!r} for {name}")


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    # This checkout's sources, whichever checkout the environment was installed from.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    refuse = "http://127.0.0.1:9"  # the discard port: nothing listens, a connection fails at once
    env.update(HTTP_PROXY=refuse, HTTPS_PROXY=refuse, http_proxy=refuse, https_proxy=refuse,
               NO_PROXY="", no_proxy="", MPLBACKEND="Agg", KERAS_BACKEND="torch",
               # WORKERS blocks share the cores, so one thread each; and test machines are shared with
               # other jobs, where spinning OpenMP threads made commands up to 5x slower.
               OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS="1")
    return env


def commands(block: Block) -> list[tuple[int, str]]:
    """``(page line, command)`` for each command of a shell block; continuation lines joined."""
    found: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for offset, line in enumerate(block.code.splitlines(), start=block.line + 1):
        if not pending:
            start = offset
        if line.rstrip().endswith("\\"):
            pending.append(line.rstrip()[:-1])
            continue
        command = " ".join(part.strip() for part in [*pending, line]).strip()
        pending = []
        if command and not command.startswith("#"):
            found.append((start, command))
    return found


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


@dataclass(frozen=True)
class Outcome:
    status: str   # "passed", "failed" or "skipped"
    message: str = ""


def run_shell(block: Block, folder: Path) -> Outcome:
    """Run each command in ``folder``; the first failure ends the block."""
    skipped = []
    for line, command in commands(block):
        command = substitute(command)
        reason = next((why for start, why in NOT_RUN.items() if command.startswith(start)), None)
        if reason:
            skipped.append(f"{block.source}:{line} `{command}`: {reason}")
            continue
        try:
            done = subprocess.run(["bash", "-c", command], cwd=folder, env=environment(), capture_output=True,
                                  text=True, timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            return Outcome("failed", f"{block.source}:{line}: `{command}` took over {TIMEOUT} s")
        if done.returncode != 0:
            return Outcome("failed", f"{block.source}:{line}: `{command}` exited with status {done.returncode}\n"
                                     f"{_tail(done.stdout)}\n{_tail(done.stderr)}")
    if skipped and len(skipped) == len(commands(block)):
        return Outcome("skipped", "; ".join(skipped))
    return Outcome("passed", "; ".join(skipped))


RUNNER = """
import sys
namespace = {"__name__": "__main__"}
exec(compile(open(sys.argv[1]).read(), "stand-ins (tests/test_readme.py)", "exec"), namespace)
exec(compile(open(sys.argv[2]).read(), sys.argv[3], "exec"), namespace)
"""


def run_python(block: Block, folder: Path) -> Outcome:
    code = substitute(block.code)
    prelude = "\n".join(textwrap.dedent(OBJECTS[name]) for name in names(code, OBJECTS))
    (folder / "standins.py").write_text(prelude)
    # Blank lines in front, so that line numbers in a traceback are the page's.
    (folder / "block.py").write_text("\n" * block.line + code)
    try:
        done = subprocess.run([sys.executable, "-c", RUNNER, "standins.py", "block.py", block.source], cwd=folder,
                              env=environment(), capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return Outcome("failed", f"the Python block at {block.source}:{block.line} took over {TIMEOUT} s")
    if done.returncode != 0:
        return Outcome("failed", f"the Python block at {block.source}:{block.line} failed\n{_tail(done.stderr)}")
    return Outcome("passed")


def run_block(block: Block, folder: Path, cache: Path) -> Outcome:
    """Write the stand-in files ``block`` names into ``folder`` (from ``cache``), then run it there."""
    for name in names(substitute(block.code), FILES):
        shutil.copy(cache / name, folder / name)
    return (run_python if RUN[block.info] == "python" else run_shell)(block, folder)


@pytest.fixture(scope="session")
def started(request, tmp_path_factory) -> dict[Block, Future]:
    """Every block this session selected, started on ``WORKERS`` threads; each test waits for its own."""
    selected = [item.callspec.params["block"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_readme_block_runs"]
    cache = tmp_path_factory.mktemp("readme-standins")
    for name in {name for block in selected for name in names(substitute(block.code), FILES)}:
        make_file(name, cache)  # here, not in the threads: each file once, and Keras stays in one thread
    pool = ThreadPoolExecutor(WORKERS)
    request.addfinalizer(lambda: pool.shutdown(cancel_futures=True))
    return {block: pool.submit(run_block, block, tmp_path_factory.mktemp(f"{Path(block.source).stem}-{block.line}"),
                               cache)
            for block in selected}


def test_every_block_says_what_it_is():
    """Each fence names its language: run (python, bash, sh, shell) or shown only (text)."""
    unmarked = [str(block) for block in BLOCKS if block.info not in RUN and block.info not in SHOWN_ONLY]
    assert not unmarked, (f"fence these blocks with one of {sorted(RUN)} (run by tests/test_readme.py) "
                          f"or {sorted(SHOWN_ONLY)} (output, not run): {unmarked}")


def test_every_stand_in_is_still_used():
    """A substitution or stand-in that no block needs any more is stale: remove it."""
    code = "\n".join(block.code for block in RUNNABLE)
    stale = [s.old for s in SUBSTITUTIONS if s.old not in code]
    stale += [name for name in FILES if not names(substitute(code), [name])]
    stale += [name for name in OBJECTS if not names(code, [name])]
    assert not stale, f"no block of the README or docs/ uses these stand-ins of tests/test_readme.py: {stale}"


@pytest.mark.parametrize("block", RUNNABLE, ids=str)
def test_readme_block_runs(block: Block, started: dict[Block, Future]):
    outcome = started[block].result()
    if outcome.status == "failed":
        pytest.fail(outcome.message, pytrace=False)
    if outcome.status == "skipped":
        pytest.skip(outcome.message)


def test_readme_and_pyproject_agree_on_the_python_version():
    """The Quick start's "Needs Python X.Y" is pyproject's ``requires-python``, and this interpreter meets it."""
    import tomllib

    required = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    stated = re.search(r"Needs Python (\d+)\.(\d+)", README.read_text(encoding="utf-8"))
    assert stated, "the README's Quick start no longer says which Python it needs"
    assert required == f">={stated.group(1)}.{stated.group(2)}"
    assert sys.version_info[:2] >= (int(stated.group(1)), int(stated.group(2)))


def test_failures_name_the_readme_line(tmp_path):
    """The harness itself: blocks, joined commands and failures keep the README's line numbers."""
    text = "intro\n```bash\necho a \\\n    b\n\n# a comment\nfalse\n```\n```text\nout\n```\n```python\nx = 1\nraise ValueError(x)\n```\n"
    blocks = readme_blocks(text)
    assert [(block.line, block.info) for block in blocks] == [(2, "bash"), (9, "text"), (12, "python")]
    assert commands(blocks[0]) == [(3, "echo a b"), (7, "false")]
    shell = run_shell(blocks[0], tmp_path)
    assert shell.status == "failed" and shell.message.startswith("README.md:7: `false` exited with status 1")
    python = run_python(blocks[2], tmp_path)
    assert python.status == "failed" and 'File "README.md", line 14' in python.message
    page, = readme_blocks("# A page\n\n```python\nraise ValueError\n```\n", "docs/page.md")
    assert str(page) == "docs/page.md:3 (python)"
    assert 'File "docs/page.md", line 4' in run_python(page, tmp_path).message

