"""The one place where convlens touches a model's internals.

Every method that needs a layer's output (heatmaps, activation grids, filter
patterns, metrics) gets it from :func:`capture`; nothing else in the package
registers a hook. The contract:

* The model is *borrowed*: it runs in eval mode with its parameters frozen,
  and on every exit path, exceptions included, each module's ``training`` flag,
  each parameter's ``requires_grad`` and each buffer's value are put back and
  every hook is removed. The caller's input tensor is never modified.
* Recorded outputs are channels-first ``(N, C, H, W)`` whatever the framework,
  decided here, once, by :func:`spatial_view`: a channels-last (Keras)
  model's 4-D outputs are permuted; in a PyTorch model a channels-last stage
  output ``(N, H, W, C)`` (timm Swin) is recognised by its spatial size and
  permuted, and a token sequence ``(N, P + h*w, C)`` (ViT blocks, with ``P``
  class/register tokens in front) becomes ``(N, C, h, w)``. Any other output
  (logits, attention tensors ``(N, heads, T, T)``) is recorded as it is and
  is not a spatial map: no method may take it as a layer.
* With ``graph=True`` the recorded outputs stay in the autograd graph, so a
  method takes ``torch.autograd.grad(score, rec.outputs[name])`` and pays for
  the backward pass down to that layer only, with no parameter gradients.
  Frozen parameters or a caller inside ``torch.no_grad()`` do not stop this:
  grad mode is switched on locally and the first recorded output becomes a
  leaf that requires grad.
* The module after a hooked layer receives a copy of its output, so an
  in-place operation there (``ReLU(inplace=True)``, ``out += identity``)
  cannot overwrite what was recorded.
* With ``stop=True`` the forward pass ends as soon as every requested layer
  has produced its output; layers after the last one never run.

Example::

    with capture(model, ["layer4"], graph=True) as rec:
        scores = rec.forward(x)
    acts = rec.outputs["layer4"]
    grads, = torch.autograd.grad(scores[:, 3].sum(), acts)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import nn

from .errors import TORCHSCRIPT_FAILED, ConvlensError, did_you_mean, first_line

if TYPE_CHECKING:
    from .models.model import Model

LayerRef = str | nn.Module
#: ``fn(module, inputs, output) -> new output`` applied to a module's output.
OutputRewrite = Callable[[nn.Module, tuple[Any, ...], torch.Tensor], torch.Tensor]


class SpatialView(NamedTuple):
    """A layer output seen as a channels-first map, and the way back to the framework's tensor."""

    map: torch.Tensor  # (N, C, h, w)
    kind: str  # "channels_first", "channels_last" or "tokens"
    prefix: int = 0  # tokens in front of the grid (class, register tokens), for "tokens"

    def restore(self, spatial: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
        """``spatial`` (shaped like ``map``) back in the layout of ``original``."""
        if self.kind == "channels_first":
            return spatial
        if self.kind == "channels_last":
            return spatial.permute(0, 2, 3, 1)
        tokens = spatial.flatten(2).transpose(1, 2)
        return torch.cat([original[:, : self.prefix], tokens], dim=1) if self.prefix else tokens


def _grid_error(size: Sequence[int], grid: Sequence[int]) -> float:
    """How far ``grid`` (h, w) is from ``size`` (H, W) sampled with one integer stride; <= 1 is plausible.

    A convolution with stride ``s`` gives about ``H / s`` rows: a few fewer without padding
    (Inception's valid convolutions lose up to ~3 at 299 px), which the tolerance allows.
    """
    (height, width), (h, w) = size, grid
    if h < 1 or w < 1:
        return math.inf
    best = math.inf
    for stride in {max(1, round(height / h)), max(1, round(width / w))}:
        error = max(abs(height / stride - h) / (1.5 + 0.1 * h), abs(width / stride - w) / (1.5 + 0.1 * w))
        best = min(best, error)
    return best


def _token_grid(tokens: int, size: Sequence[int], prefixes: Sequence[int]) -> tuple[int, int, int] | None:
    """``(prefix, h, w)`` with ``prefix + h*w == tokens`` and ``h/w`` the input's aspect, or ``None``."""
    height, width = size
    for prefix in prefixes:
        count = tokens - prefix
        if count < 2:
            continue
        h = max(1, round(math.sqrt(count * height / width)))
        for candidate in (h, h - 1, h + 1):
            if candidate >= 1 and count % candidate == 0 and _grid_error(size, (candidate, count // candidate)) <= 1:
                return prefix, candidate, count // candidate
    return None


def spatial_view(
    output: torch.Tensor,
    input_size: Sequence[int],
    *,
    batch: int | None = None,
    channels_last: bool = False,
    prefix_tokens: int | None = None,
) -> SpatialView | None:
    """``output`` as a channels-first ``(N, C, h, w)`` map, or ``None`` when it is not one.

    Args:
        output: a layer's output tensor.
        input_size: ``(H, W)`` of the model input, to tell spatial axes from others.
        batch: the input's batch size: an output with another first dimension (Swin's
            windows folded into the batch) is not one map per image.
        channels_last: the framework is channels-last (Keras): every 4-D output is ``(N, H, W, C)``.
        prefix_tokens: tokens in front of a ViT's patch grid, when the model says (timm's
            ``num_prefix_tokens``); else 0 and 1 are tried.
    """
    if batch is not None and (output.ndim < 1 or output.shape[0] != batch):
        return None
    if output.ndim == 4:
        if channels_last:
            return SpatialView(output.permute(0, 3, 1, 2), "channels_last")
        first, last = _grid_error(input_size, output.shape[2:]), _grid_error(input_size, output.shape[1:3])
        if min(first, last) > 1:
            return None
        # (N, 8, 8, 8) fits both readings: channels-first, PyTorch's own layout, wins a tie.
        return (
            SpatialView(output, "channels_first")
            if first <= last
            else SpatialView(output.permute(0, 3, 1, 2), "channels_last")
        )
    if output.ndim == 3 and not channels_last:
        prefixes = (prefix_tokens,) if prefix_tokens is not None else (0, 1)
        grid = _token_grid(output.shape[1], input_size, prefixes)
        if grid is None:
            return None
        prefix, h, w = grid
        patches = output[:, prefix:]
        return SpatialView(patches.transpose(1, 2).reshape(output.shape[0], output.shape[2], h, w), "tokens", prefix)
    return None


def prefix_tokens(module: nn.Module) -> int | None:
    """How many class/register tokens precede a ViT's patch grid, when the model says (timm)."""
    count = getattr(module, "num_prefix_tokens", None)
    return int(count) if isinstance(count, int) else None


class _StopForward(Exception):
    """Raised inside a hook to end the forward pass early; caught by Recorder.forward."""


@contextlib.contextmanager
def borrow(module: nn.Module, *, freeze: bool = True) -> Iterator[nn.Module]:
    """Run ``module`` in eval mode (parameters frozen) and restore its state afterwards.

    Restores every submodule's ``training`` flag, every parameter's
    ``requires_grad`` and every buffer's value, also when an exception flies.
    """
    training = [(m, m.training) for m in module.modules()]
    requires_grad = [(p, p.requires_grad) for p in module.parameters()]
    buffers = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        module.eval()
        if freeze:
            for p, _ in requires_grad:
                p.requires_grad_(False)
        yield module
    finally:
        for m, flag in training:
            m.training = flag
        for p, flag in requires_grad:
            p.requires_grad_(flag)
        with torch.no_grad():
            for b, saved in buffers:
                if b.shape == saved.shape:
                    b.copy_(saved)


def merge_rewrites(
    base: Mapping[nn.Module, OutputRewrite], extra: Mapping[nn.Module, OutputRewrite] | None
) -> dict[nn.Module, OutputRewrite]:
    """``base`` and ``extra`` output rewrites in one mapping; on a shared module ``extra`` runs on ``base``'s result."""
    merged = dict(base)
    for module, fn in (extra or {}).items():
        first = merged.get(module)
        merged[module] = fn if first is None else _chained(first, fn)
    return merged


def _chained(first: OutputRewrite, then: OutputRewrite) -> OutputRewrite:
    """The rewrite that runs ``then`` on ``first``'s result."""

    def both(mod: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return then(mod, inputs, first(mod, inputs, output))

    return both


def _module_of(model: Model | nn.Module) -> nn.Module:
    """The ``nn.Module`` that runs: a :class:`convlens.Model`'s network, or the bare module itself."""
    inner = getattr(model, "module", None) if hasattr(model, "layout") else None
    if isinstance(inner, nn.Module):
        return inner
    if isinstance(model, nn.Module):
        return model
    raise ConvlensError(f"cannot capture a {type(model).__name__}: it holds no nn.Module")


def named_layers(model: Model | nn.Module) -> dict[str, nn.Module]:
    """Layers by the framework's own names: ``named_modules()`` or Keras layer names."""
    if not isinstance(model, nn.Module):
        return model.named_layers()
    return {name: m for name, m in model.named_modules() if name}


def resolve_layers(model: Model | nn.Module, layers: Sequence[LayerRef]) -> dict[str, nn.Module]:
    """Map each layer reference (name or module) to ``(name, module)``; unknown names raise."""
    table = named_layers(model)
    by_module = {id(m): n for n, m in table.items()}
    resolved: dict[str, nn.Module] = {}
    for ref in layers:
        if isinstance(ref, nn.Module):
            name = by_module.get(id(ref))
            if name is None:
                raise ConvlensError("the layer module passed is not part of this model")
            resolved[name] = ref
        elif ref in table:
            resolved[ref] = table[ref]
        else:
            raise ConvlensError(
                f"unknown layer {ref!r}{did_you_mean(str(ref), table)} (run 'convlens layers MODEL' to list them)"
            )
    return resolved


def not_run(name: str) -> ConvlensError:
    """The one error for a requested layer the forward pass never reached."""
    return ConvlensError(f"layer {name!r} did not run in the forward pass; choose a layer the model uses")


def not_spatial(name: str, shape: tuple[int, ...] | None, suggestion: str | None = None) -> ConvlensError:
    """The one error for a layer whose output is no ``(N, C, h, w)`` map; ``suggestion`` names one that is."""
    such_as = f"such as {suggestion!r} " if suggestion else ""
    return ConvlensError(
        f"layer {name!r} has no spatial output (shape {shape}); "
        f"choose a convolutional layer {such_as}(see 'convlens layers MODEL')"
    )


class Recorder:
    """What :func:`capture` hands back: recorded outputs and a forward that may stop early.

    :meth:`output`, :meth:`spatial_output` and :meth:`spatial_outputs` read the
    recorded outputs with the one check every method needs: the layer ran, and
    (for the spatial ones) its output is a map.
    """

    def __init__(self, module: nn.Module, names: list[str], stop: bool):
        self.module = module
        self.outputs: dict[str, torch.Tensor] = {}
        self._names = names
        self._stop = stop
        self._pending: set[str] = set(names)
        self.input_size: tuple[int, int] = (0, 0)
        self.batch = 0
        #: Names whose recorded output is a spatial map ``(N, C, h, w)`` (see :func:`spatial_view`).
        self.spatial: set[str] = set()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Run the model on channels-first ``x``: its whole output (a tensor, or a tuple/dict of them),
        ``None`` when stopped early."""
        self.outputs.clear()
        self.spatial.clear()
        self._pending = set(self._names)
        self.input_size = (int(x.shape[-2]), int(x.shape[-1]))
        self.batch = int(x.shape[0])
        try:
            return self.module(x, *args, **kwargs)
        except _StopForward:
            return None
        except Exception as err:  # a scripted model's failure: its own error, on one line
            if not str(err).startswith(TORCHSCRIPT_FAILED):
                raise
            raise ConvlensError(
                f"the model failed on a {self.input_size[0]}x{self.input_size[1]} input: {first_line(err)}"
            ) from None

    def output(self, name: str) -> torch.Tensor:
        """The recorded output of ``name``; a layer the pass never reached is a user error."""
        if name not in self.outputs:
            raise not_run(name)
        return self.outputs[name]

    def spatial_output(self, name: str, suggest: Callable[[], str | None] | None = None) -> torch.Tensor:
        """The recorded ``(N, C, h, w)`` map of ``name``; a layer that did not run or is not spatial is a user error.

        ``suggest`` gives a layer to name in the error, called only then (finding one may cost a pass).
        """
        output = self.output(name)
        if name not in self.spatial:
            raise not_spatial(name, tuple(output.shape), suggest() if suggest is not None else None)
        return output

    def spatial_outputs(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """:meth:`spatial_output` of each of ``names``, checking first that every one of them ran."""
        for name in names:
            self.output(name)
        return {name: self.spatial_output(name) for name in names}

    def _record(self, name: str) -> None:
        self._pending.discard(name)
        if self._stop and not self._pending:
            raise _StopForward


@contextlib.contextmanager
def capture(
    model: Model | nn.Module,
    layers: Sequence[LayerRef] = (),
    *,
    graph: bool = False,
    stop: bool = False,
    rewrite: Mapping[nn.Module, OutputRewrite] | None = None,
) -> Iterator[Recorder]:
    """Record the outputs of ``layers`` while the borrowed model runs.

    Args:
        model: a :class:`convlens.Model` or a bare ``nn.Module`` (channels-first).
        layers: layer names as the framework names them, or the modules themselves.
        graph: keep recorded outputs in the autograd graph so gradients can be
            taken with respect to them (grad mode is enabled inside the block).
        stop: end the forward pass right after the last requested layer.
        rewrite: modules whose output is replaced by ``fn(module, inputs, output)``
            during the pass (guided backprop's ReLUs, a softmax skipped for logits).

    Yields:
        A :class:`Recorder`; call ``rec.forward(x)`` with a channels-first batch.
    """
    module = _module_of(model)
    channels_last = getattr(model, "layout", "channels_first") == "channels_last"
    resolved = resolve_layers(model, list(layers))
    recorder = Recorder(module, list(resolved), stop)
    record = _Recording(recorder, rewrite, graph, channels_last, prefix_tokens(module))
    handles: list[torch.utils.hooks.RemovableHandle] = []
    with contextlib.ExitStack() as stack:
        stack.enter_context(borrow(module))
        if graph:
            stack.enter_context(torch.enable_grad())
        try:
            _refuse_torchscript(list(resolved.values()) + list(rewrite or {}))
            _install_hooks(handles, module, resolved, rewrite, record)
            yield recorder
        finally:  # every hook goes, on every exit path; borrow() puts the model's state back
            for handle in handles:
                handle.remove()


def _refuse_torchscript(hooked: list[nn.Module]) -> None:
    if any(isinstance(m, torch.jit.ScriptModule) for m in hooked):
        raise ConvlensError(
            "a TorchScript model cannot be hooked, so its layers cannot be captured; "
            "load the eager model instead: its state dict with --arch (or the module in memory)"
        )


def _install_hooks(
    handles: list[torch.utils.hooks.RemovableHandle],
    module: nn.Module,
    resolved: dict[str, nn.Module],
    rewrite: Mapping[nn.Module, OutputRewrite] | None,
    record: _Recording,
) -> None:
    """Register the hooks, each handle appended as soon as it exists (so a failure midway leaves none behind)."""
    if resolved:
        # The input's size tells spatial axes from others (spatial_view); read it from whoever calls the model.
        handles.append(module.register_forward_pre_hook(record.note_input))
    for name, mod in resolved.items():
        handles.append(mod.register_forward_hook(record.hook(name)))
    for mod, fn in (rewrite or {}).items():
        if mod not in resolved.values():
            handles.append(mod.register_forward_hook(fn))  # same signature as a forward hook


class _Recording(NamedTuple):
    """The forward hooks of one :func:`capture`: what they record into, and how."""

    recorder: Recorder
    rewrite: Mapping[nn.Module, OutputRewrite] | None
    graph: bool
    channels_last: bool
    prefix: int | None

    def note_input(self, mod: nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook on the model: the batch's size and spatial size, whoever calls the model."""
        if args and isinstance(args[0], torch.Tensor) and args[0].ndim == 4:
            self.recorder.input_size = (int(args[0].shape[-2]), int(args[0].shape[-1]))
            self.recorder.batch = int(args[0].shape[0])

    def hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...], Any], torch.Tensor]:
        """The forward hook of layer ``name``: records its output and hands the next module what it gets."""

        def hook(mod: nn.Module, inputs: tuple[Any, ...], output: Any) -> torch.Tensor:
            if not isinstance(output, torch.Tensor):
                raise ConvlensError(
                    f"layer {name!r} returns {type(output).__name__}, not a tensor; choose another layer"
                )
            if self.rewrite is not None and mod in self.rewrite:
                output = self.rewrite[mod](mod, inputs, output)
            passed = self.store(name, output)
            self.recorder._record(name)
            return passed

        return hook

    def store(self, name: str, output: torch.Tensor) -> torch.Tensor:
        """Record ``output`` channels-first as ``name``; returns what the next module receives."""
        recorder = self.recorder
        view = spatial_view(
            output,
            recorder.input_size,
            batch=recorder.batch,
            channels_last=self.channels_last,
            prefix_tokens=self.prefix,
        )
        stored = output if view is None else view.map
        if view is not None and view.map.shape[-1] * view.map.shape[-2] > 1:
            recorder.spatial.add(name)
        if not self.graph:
            recorder.outputs[name] = stored.detach().clone()
            return output
        if not stored.requires_grad:
            stored = stored.detach().requires_grad_()
        recorder.outputs[name] = stored
        # The next module gets a copy: an in-place op there must not
        # overwrite the recorded tensor (or its version for autograd).
        return (stored if view is None else view.restore(stored, output)).clone()
