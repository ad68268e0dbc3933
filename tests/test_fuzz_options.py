"""Every number option of every command, given nonsense: one line and exit 2, or a valid run, never anything else.

The options are found by walking the click command typer builds (a new option is
tried the moment it is declared). Each gets negative, zero, huge, NaN, infinite
and non-numeric values on the smallest run of its command (a tiny model, one
small picture). The outcome must be exit 2 with exactly one stderr line, or exit 0;
a run that would take hours or all the memory must be refused by a bound the
option declares, so each invocation has a wall-clock limit.
"""

from __future__ import annotations

import re
import signal
import typing

import numpy as np
import pytest
import torch
import typer.main
from PIL import Image
from torch import nn

from convlens.cli import app

#: Seconds one invocation may run: the smallest run of any command takes a few.
LIMIT_S = 30
INT_VALUES = ("-1", "0", str(10**18), "nan", "abc")
FLOAT_VALUES = ("-1", "0", "1e308", "nan", "inf", "-inf", "abc")

#: The smallest run of each command; {tiny} is a small eager CNN, {pic} a 20x16 picture, {out} a fresh folder.
TINY = ("{tiny}", "--trust-code", "--input-size", "16")
BASE = {
    "scan": ("scan", *TINY, "--shapes", "4", "--size", "24", "--layers", "2", "--out", "{out}/atlas.sqlite"),
    "dissect": ("dissect", *TINY, "--shapes", "4", "--size", "24", "--layers", "2", "--no-figures", "--out", "{out}/d"),
    "examples": ("examples", "{atlas}", "--layer", "2", "--units", "0", "--steps", "2", "--trust-code",
                 "--out", "{out}/x"),
    "evaluate": ("evaluate", *TINY, "{data}", "--methods", "gradcam", "--metrics", "deletion", "--out", "{out}/e"),
    "explain": ("explain", *TINY, "{pic}", "--methods", "gradcam", "--out", "{out}/x"),
    "activations": ("activations", *TINY, "{pic}", "--layers", "2", "--out", "{out}/a"),
    "filters": ("filters", *TINY, "--layers", "2", "--grid", "1x1", "--steps", "2", "--size", "16", "--out", "{out}/f"),
    "class-model": ("class-model", *TINY, "--classes", "0", "--steps", "2", "--size", "16", "--out", "{out}/c"),
    "deepdream": ("deepdream", *TINY[:2], "{pic}", "--layers", "2", "--octaves", "1", "--steps", "2",
                  "--out", "{out}/d.png"),
    "predict": ("predict", *TINY, "{pic}"),
    "factorize": ("factorize", *TINY, "{data}/0.png", "{data}/1.png", "--components", "2", "--out", "{out}/k"),
    "shapes": ("shapes", "{out}/s", "--per-class", "2", "--size", "24", "--classes", "circle,cross", "--split", ""),
    # serve: started on a free port and stopped at once (see stop_servers_at_once)
    "serve": ("serve", *TINY, "--data", "{data}", "--port", "0", "--cache", "{out}/cache"),
    "tcav": ("tcav", *TINY, "--concepts", "{concepts}", "--random", "{pool}", "--random-size", "10", "--inputs",
             "{data}", "--classes", "0", "--layers", "2", "--no-figures", "--out", "{out}/t"),
    "train": ("train", "{shapes}", "--out", "{out}/t", "--epochs", "1", "--input-size", "16", "--widths", "4",
              "--batch-size", "8", "--no-augment"),
}


def _number_options() -> list[tuple[str, str, type]]:
    """``(command, option, int or float)`` for every number option, found in the CLI itself."""
    found = []
    group = typer.main.get_command(app)
    for name, command in sorted(group.commands.items()):
        for param in command.params:
            annotation = param.type_descriptor.annotation
            kinds = [t for t in (typing.get_args(annotation) or (annotation,)) if t in (int, float)]
            if kinds and param.opts[0].startswith("--"):
                found.append((name, param.opts[0], kinds[0]))
    return found


OPTIONS = _number_options()


@pytest.fixture(autouse=True)
def stop_servers_at_once(monkeypatch):
    """``convlens serve`` would serve until Ctrl-C: here it stops as soon as it serves."""
    from convlens.serve.server import Server

    monkeypatch.setattr(Server, "wait", Server.stop)


def test_every_command_with_a_number_option_has_a_smallest_run():
    assert {command for command, _, _ in OPTIONS} <= set(BASE)
    assert len(OPTIONS) >= 60  # the walk finds them (64 when written)


@pytest.fixture(scope="module")
def places(tmp_path_factory):
    from convlens.cli import main

    root = tmp_path_factory.mktemp("numbers")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()
    torch.save(net, root / "tiny.pt")
    Image.new("RGB", (20, 16), (200, 30, 30)).save(root / "pic.png")
    (root / "data").mkdir()
    rng = np.random.default_rng(0)
    for index in range(2):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "data" / f"{index}.png")
    for folder, count in (("concepts/c", 10), ("pool", 20)):  # tcav: 10 images a concept, two random sets' worth
        (root / folder).mkdir(parents=True)
        for index in range(count):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / folder / f"{index}.png")
    values = {"tiny": root / "tiny.pt", "pic": root / "pic.png", "data": root / "data", "atlas": root / "atlas.sqlite",
              "shapes": root / "shapes", "concepts": root / "concepts", "pool": root / "pool"}
    for args in (BASE["scan"], BASE["shapes"]):
        with pytest.raises(SystemExit) as done:
            main([a.format(**values, out=root) for a in args])
        assert done.value.code in (0, None)
    (root / "s").rename(root / "shapes")
    return values, root


@pytest.mark.parametrize("command", sorted(BASE))
def test_the_smallest_run_of_each_command_succeeds(command, places, cli, tmp_path):
    """So that an option's "exit 0" outcomes are runs, not refusals of the base arguments."""
    values, _ = places
    code, _, err = cli(*[a.format(**values, out=tmp_path) for a in BASE[command]])
    assert code == 0, err


class _TooLong(Exception):
    pass


def _alarm(signum, frame):
    raise _TooLong


@pytest.mark.parametrize("command,option,kind", OPTIONS, ids=[f"{c} {o}" for c, o, _ in OPTIONS])
def test_a_number_option_refuses_nonsense_on_one_line(command, option, kind, places, cli, tmp_path):
    values, _ = places
    for number, value in enumerate(INT_VALUES if kind is int else FLOAT_VALUES):
        out = tmp_path / str(number)
        args = [a.format(**values, out=out) for a in BASE[command]] + [option, value]
        previous = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, LIMIT_S)
        try:
            code, _, err = cli(*args)
        except _TooLong:
            pytest.fail(f"convlens {command} {option} {value} ran past {LIMIT_S} s: it needs a bound")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        lines = [line for line in err.strip().splitlines()
                 if line and not re.match(r"\[\d+/\d+\] |convlens: warning: ", line)]
        if code == 0:
            continue
        assert code == 2, f"{command} {option} {value}: exit {code}\n{err}"
        assert len(lines) == 1 and lines[0].startswith("convlens: error: "), f"{command} {option} {value}:\n{err}"
        if value in ("nan", "inf", "-inf") and kind is float:
            assert f"'{option}'" in lines[0] or option in lines[0], lines[0]
