"""What the commands share: option declarations, the one way the CLI opens a model, help layout, threads.

Nothing here imports torch at import time: ``convlens --help`` and a mistyped
option must answer before the heavy libraries would have loaded. The commands
import what they need when they run.
"""

from __future__ import annotations

import copy
import functools
import inspect
import math
import os
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, cast, overload

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

from ..errors import ConvlensError

if TYPE_CHECKING:
    from typer.core import _TyperParameter

    from ..models import Model

ModelArg = Annotated[
    str,
    typer.Argument(
        help="A torchvision name (resnet50), 'shapes' (the bundled demo model), a .pt/.pth/TorchScript file, "
        "a convlens checkpoint, or a Keras .keras/.h5 file.",
        show_default=False,
    ),
]
ImagesArg = Annotated[list[Path], typer.Argument(help="Image files (PNG, JPEG, ...).", show_default=False)]
WeightsOpt = Annotated[
    str,
    typer.Option(
        "--weights", help="For a torchvision name: 'default' (download once), 'none' (random), or a state-dict file."
    ),
]
ArchOpt = Annotated[str | None, typer.Option("--arch", help="Architecture of a state-dict file, e.g. resnet18.")]
LabelsOpt = Annotated[Path | None, typer.Option("--labels", help="Text file with one class name per line.")]
PreprocessingOpt = Annotated[
    str | None, typer.Option("--preprocessing", help="Keras models: rescale (x/255, default), raw, tf, torch or caffe.")
]
TrustCodeOpt = Annotated[
    bool,
    typer.Option(
        "--trust-code",
        help="Allow a pickled module (torch.save(model)), or a TorchScript file whose code does more than "
        "tensor maths (files, network): only for files you trust. State dicts and checkpoints never "
        "need it.",
    ),
]
InputSizeOpt = Annotated[
    str | None,
    typer.Option(
        "--input-size",
        metavar="SIZE",
        help="H or HxW to run the model at (default: what the model says; 224 for a plain module).",
    ),
]
OutputOpt = Annotated[
    str | None,
    typer.Option(
        "--output",
        metavar="KEY",
        help="Models with several outputs (tuple, list, dict): the index or key of the class scores.",
    ),
]
DeviceOpt = Annotated[
    str | None,
    typer.Option("--device", metavar="DEVICE", help="cpu, cuda, cuda:1, ... (default: cuda when present, else cpu)."),
]
ColormapOpt = Annotated[str, typer.Option("--colormap", help="A matplotlib colormap, e.g. jet, viridis, magma.")]
#: The old spelling of --colormap (activations had it), still accepted and left out of --help.
CmapAliasOpt = Annotated[str | None, typer.Option("--cmap", hidden=True)]


# -- option groups: options several commands share, declared once ---------------------------------------
class OptionGroup:
    """Options several commands share, declared once and received as one value.

    A subclass lists its options in ``OPTIONS`` (name: typer annotation and
    default, in ``--help`` order). A command takes the group as a parameter whose
    default is an instance, ``without`` the options it has no use for and with
    its own defaults, and is decorated with :func:`grouped`:

        @app.command()
        @grouped
        def layers(model: ModelArg, opts: ModelOptions = ModelOptions(without=("labels",), weights="none")):
            loaded = opts.open(model)

    typer reads a command's options from its signature, so without this eleven
    commands repeated the same eight model options.
    """

    OPTIONS: ClassVar[dict[str, tuple[Any, Any]]] = {}

    def __init__(self, without: tuple[str, ...] = (), **defaults: Any) -> None:
        unknown = (set(without) | set(defaults)) - set(self.OPTIONS)
        if unknown:
            raise TypeError(f"{type(self).__name__} has no options {sorted(unknown)}")
        #: The option values: the defaults in a declaration, what the user gave in a command.
        self.values = {
            name: defaults.get(name, default) for name, (_, default) in self.OPTIONS.items() if name not in without
        }

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(f"{type(self).__name__} has no option {name!r}")

    def parameters(self) -> list[inspect.Parameter]:
        """The options as the signature parameters typer reads."""
        return [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=self.OPTIONS[name][0], default=default)
            for name, default in self.values.items()
        ]

    def given(self, values: dict[str, Any]) -> OptionGroup:
        """This group with the values a command received."""
        chosen = copy.copy(self)
        chosen.values = {name: values[name] for name in self.values}
        return chosen


def grouped(command: Callable) -> Callable:
    """Put the options of each :class:`OptionGroup` parameter of ``command`` in its place, for typer to read."""
    signature = inspect.signature(command, eval_str=True)
    groups = {p.name: p.default for p in signature.parameters.values() if isinstance(p.default, OptionGroup)}
    if not groups:
        raise TypeError(f"{command.__name__} has no OptionGroup parameter")
    parameters = []
    for parameter in signature.parameters.values():
        if parameter.name in groups:
            parameters += groups[parameter.name].parameters()
        else:  # keyword-only: typer passes every value by name, and required options may follow defaults
            parameters.append(parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY))
    names = [p.name for p in parameters]
    if len(set(names)) != len(names):
        raise TypeError(f"{command.__name__}: an option group repeats a parameter name")

    @functools.wraps(command)
    def run(**values: Any) -> Any:
        for name, group in groups.items():
            values[name] = group.given({option: values.pop(option) for option in group.values})
        return command(**values)

    # what typer reads; functools.wraps' type declares no __signature__, which inspect honours on any callable
    run.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    run.__annotations__ = {p.name: p.annotation for p in parameters}
    return run


class ModelOptions(OptionGroup):
    """How to load and place a model: ``--weights`` ... ``--device``."""

    OPTIONS: ClassVar[dict[str, tuple[Any, Any]]] = {
        "weights": (WeightsOpt, "default"),
        "arch": (ArchOpt, None),
        "labels": (LabelsOpt, None),
        "preprocessing": (PreprocessingOpt, None),
        "trust_code": (TrustCodeOpt, False),
        "input_size": (InputSizeOpt, None),
        "output": (OutputOpt, None),
        "device": (DeviceOpt, None),
    }

    def load_options(self) -> dict[str, Any]:
        """Keyword arguments for :func:`convlens.load_model` (``--device`` apart: see :meth:`place`)."""
        options = {name: value for name, value in self.values.items() if name != "device"}
        if "input_size" in options:
            options["input_size"] = parse_size(options["input_size"])
        return options

    def open(self, source: str) -> Model:
        """:func:`convlens.load_model` with these options, on ``--device``."""
        from ..models import load_model

        return self.place(load_model(source, **self.load_options()))

    def place(self, model: Model) -> Model:
        """Move ``model`` to ``--device`` (default: the GPU when there is one), one line if it cannot go there."""
        use_threads()  # torch is loaded by now: give it the thread count chosen for this machine
        import torch

        from ..errors import first_line

        device = self.values.get("device") or ("cuda" if torch.cuda.is_available() else None)
        if device is not None:
            try:
                model.to(device)
            except (RuntimeError, AssertionError) as err:  # an unknown or absent device
                raise ConvlensError(f"cannot use device {device!r}: {first_line(err)}") from None
        return model


# -- bounds of the number options: beyond them a run would take hours or all the memory -----------------------
#: Seeds: what numpy's and torch's generators both take, and what a person types.
SEED_MAX = 2**32 - 1
#: Gradient-ascent steps (filters, class models, DeepDream, example patterns).
STEPS_MAX = 100_000
#: Side of an image convlens makes (generated shapes, optimised patterns), in pixels.
SIDE_MAX = 4096
#: Images per forward pass.
BATCH_MAX = 65_536
#: Worker processes or Ray actors.
WORKERS_MAX = 256
#: Training epochs.
EPOCHS_MAX = 10_000
#: Images kept per unit or shown per class.
TOP_MAX = 10_000
#: GPUs per Ray actor.
GPUS_MAX = 64
#: Images generated for a run (scan, dissect --shapes; shapes --per-class).
IMAGES_MAX = 10_000_000


# -- small parsers ---------------------------------------------------------------------------------------
def parse_size(text: str | None) -> tuple[int, int] | None:
    """``"224"`` -> ``(224, 224)``, ``"224x160"`` -> ``(224, 160)``, ``None`` -> ``None``."""
    if text is None:
        return None
    parts = text.lower().replace("x", ",").split(",")
    try:
        sizes = [int(p) for p in parts if p.strip()]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) < 1:
        raise ConvlensError(f"--input-size must look like 224 or 224x160, got {text!r}")
    return (sizes[0], sizes[-1])


def comma_list(text: str | None) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``; empty or ``None`` -> ``[]``."""
    return [part.strip() for part in (text or "").split(",") if part.strip()]


@overload
def named_list(text: str, option: str, example: str) -> list[str]: ...
@overload
def named_list(text: None, option: str, example: str) -> None: ...
@overload
def named_list(text: str | None, option: str, example: str) -> list[str] | None: ...
def named_list(text: str | None, option: str, example: str) -> list[str] | None:
    """A list option's names: ``None`` when the option was not given, a one-line error when given but empty.

    ``option`` and ``example`` make the message: ``--layers needs at least one name, e.g. --layers layer4``.
    """
    if text is None:
        return None
    names = comma_list(text)
    if not names:
        raise ConvlensError(f"{option} needs at least one name, e.g. {option} {example}; got {text!r}")
    return names


TASK_TARGET_EXAMPLES = "e.g. region:3, box:0, box:dog@10,20,80,90, similar:ref.png"


def parse_task_target(text: str):
    """``region:CLASS[:MASK.png]``, ``box:INDEX``, ``box:LABEL@x0,y0,x1,y1``, ``similar:REF.png|REF.npy``
    as a :class:`~convlens.targets.Region`, :class:`~convlens.targets.Box` or :class:`~convlens.targets.Similarity`;
    ``None`` for anything else (a class). ``explain`` and ``evaluate`` read ``--targets`` with it."""
    from ..targets import Box, Region, Similarity

    kind, _, rest = text.strip().partition(":")
    kind = kind.lower()
    if kind not in ("region", "box", "similar") or not rest.strip():
        if kind in ("region", "box", "similar"):
            raise ConvlensError(
                f"--targets {text!r} names no {'class' if kind == 'region' else kind}; " + TASK_TARGET_EXAMPLES
            )
        return None
    rest = rest.strip()
    if kind == "similar":
        return Similarity(rest)
    if kind == "region":
        name, _, mask = rest.partition(":")
        return Region(int(name) if name.lstrip("-").isdigit() else name, mask=mask or None)
    label, at, box = rest.partition("@")
    if not at:
        if not label.isdigit():
            raise ConvlensError(
                f"--targets box:{label} is not a detection index; use box:INDEX or "
                "box:LABEL@x0,y0,x1,y1 (the box in the model input's pixels)"
            )
        return Box(int(label))
    try:
        coords = [float(v) for v in box.split(",")]
    except ValueError:
        coords = []
    if len(coords) != 4:
        raise ConvlensError(f"--targets box:{rest} needs four numbers after '@': box:LABEL@x0,y0,x1,y1")
    return Box(int(label) if label.isdigit() else label, iou_with=coords)


def parse_one_target(text: str | None):
    """One target for every image: ``top1`` (or nothing) -> ``None``, a class index or name, or a task target
    (:func:`parse_task_target`); ``all`` and one-per-image lists are refused (``evaluate`` scores a folder)."""
    task = parse_task_target(text or "")
    if task is not None:
        return task
    parts = comma_list(text)
    if not parts or (len(parts) == 1 and parts[0].lower() in ("top1", "top-1")):
        return None
    if len(parts) > 1 or parts[0].lower() == "all":
        raise ConvlensError(
            f"--targets {text!r}: evaluate scores one target on every image of the folder: top1, a "
            f"class index or name, or {TASK_TARGET_EXAMPLES.removeprefix('e.g. ')}"
        )
    return int(parts[0]) if parts[0].lstrip("-").isdigit() else parts[0]


# -- help without type clutter ---------------------------------------------------------------------------
#: typer prints a type beside every parameter (``--trust-code <bool>``, ``--out <path>``); a value is
#: named like click does (``--out PATH``) and a flag gets nothing, as it takes no value.
_VALUE_NAMES = {"str": "TEXT", "int": "INTEGER", "float": "NUMBER", "Path": "PATH"}


def _unwrap(text: str | None) -> str | None:
    """A docstring's paragraphs each on one line: typer's rich help keeps the source's line breaks mid-sentence."""
    if not text:
        return text
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in inspect.cleandoc(text).split("\n\n"))


def _quiet_types(params: list[Any]) -> None:
    for param in params:
        if isinstance(param, TyperArgument):
            param.metavar = param.metavar or param.name.upper()
            # the name already says what goes there; an instance attribute replaces typer's method for this one
            param.display_type_rich = lambda ctx: None  # type: ignore[method-assign]  # this one instance, on purpose
        elif param.is_flag or param.count:
            param.metavar = ""
        elif param.metavar is None:
            bare = param.bare_type()
            param.metavar = _VALUE_NAMES.get(bare, bare.upper())


class _QuietHelp:
    """Help that names values (``--out PATH``), shows flags bare (``--trust-code``) and unwraps paragraphs."""

    # what the mixin reads of the click command it is mixed into (typer's vendored click)
    help: str | None
    params: list[Any]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help = _unwrap(self.help)
        _quiet_types(self.params)

    def get_help_option(self, ctx):  # click builds it on first use, after __init__
        option = super().get_help_option(ctx)
        if option is not None:
            _quiet_types([option])
        return option


class Command(_QuietHelp, TyperCommand):
    """A ``convlens`` command (:class:`typer.core.TyperCommand` with :class:`_QuietHelp`).

    A number option given NaN or an infinity is refused before the command runs:
    no option of convlens means anything with them, and ranges let NaN through
    (every comparison with it is false).
    """

    def invoke(self, ctx: Any) -> Any:
        for param in self.params:
            value = ctx.params.get(param.name)
            if isinstance(value, float) and not math.isfinite(value):
                # a typer command's parameters are typer's (TyperArgument, TyperOption)
                raise typer.BadParameter(
                    f"{value} is not a finite number", ctx=ctx, param=cast("_TyperParameter", param)
                )
        return super().invoke(ctx)


class Group(_QuietHelp, TyperGroup):
    """The ``convlens`` group of commands, with the same help layout."""


# -- threads -------------------------------------------------------------------------------------------------
def thread_count(cpus: int, quota: float | None = None, requested: str | None = None) -> int | None:
    """How many threads torch should use: ``None`` to leave the user's ``OMP_NUM_THREADS`` in charge.

    ``cpus`` are the CPUs this process may run on (``os.sched_getaffinity``), ``quota``
    the CPUs its cgroup may use (``cpu.max``, ``None`` when unlimited). torch's own
    default follows the host's cores, which in a container limited to two CPUs
    means dozens of threads waiting on each other; the smaller of the two is used.

    Busy CPUs (the load average) are not subtracted: it did not help when
    measured. Beside two CPU-bound processes on a 2-CPU machine, Score-CAM,
    Grad-CAM and saliency on the bundled model (OMP_WAIT_POLICY=PASSIVE) took a
    median 25.8 s with 2 threads and 30.1 s with 1 (three runs each, on a machine
    other jobs also used). In a container the load average also counts the whole
    host's processes, and would starve a job that has its CPUs to itself.
    Inter-op threads are left alone too: convlens's commands never start
    torch's inter-op pool (``torch.set_num_interop_threads`` still accepts a
    value after Score-CAM, Grad-CAM, saliency and integrated gradients ran).
    """
    if requested:
        return None
    count = cpus if quota is None else min(cpus, math.ceil(quota))
    return max(1, count)


def _cgroup_cpus(path: str = "/sys/fs/cgroup/cpu.max") -> float | None:
    """CPUs allowed by cgroup v2's ``cpu.max`` (``"200000 100000"`` -> 2.0), ``None`` when unlimited or unknown."""
    try:
        quota, period = Path(path).read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        return None


def wait_passively(environ: MutableMapping[str, str] | None = None) -> None:
    """Make idle OpenMP threads sleep instead of spinning, unless the user chose ``OMP_WAIT_POLICY``.

    Called by :func:`convlens.cli.main` before any command imports torch, since
    OpenMP reads the variable once, when it starts. Beside two CPU hogs on a
    2-CPU machine, ``convlens report`` took 91.6 s spinning and 46.0 s passive
    (``benchmarks/bench_busy.py``; alone it took 23.8 s and 30.3 s: sleeping threads
    wake more slowly, the price of not taking CPU from others); child processes (data loaders, Ray
    workers) inherit the setting.
    """
    (os.environ if environ is None else environ).setdefault("OMP_WAIT_POLICY", "PASSIVE")


def machine_threads(environ: Mapping[str, str] | None = None) -> int | None:
    """:func:`thread_count` for this process: its CPU affinity, its cgroup quota, ``OMP_NUM_THREADS``."""
    variables = os.environ if environ is None else environ
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return thread_count(cpus, _cgroup_cpus(), variables.get("OMP_NUM_THREADS"))


def use_threads() -> None:
    """Give torch the count of :func:`machine_threads`; called where a command starts to need torch.

    Set in this process only, not exported as ``OMP_NUM_THREADS``: child processes
    choose their own (torch's data-loader workers use one thread, Ray sets its workers').
    """
    count = machine_threads()
    if count is not None:
        import torch

        torch.set_num_threads(count)
