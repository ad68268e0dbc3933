"""`load_model`: one call for torchvision names, PyTorch files, Keras files and in-memory models.

Security: a *pickled module* (a ``torch.save(model)`` file) is a pickled Python
object, and unpickling it runs whatever code the file names. So it is refused
unless the caller opts in with ``trust_code=True`` (CLI: ``--trust-code``).
State dicts and convlens checkpoints are read without running code from the file,
through ``torch.load(weights_only=True)``. A *TorchScript file* is code too: without
the opt-in it loads only when its code holds nothing but tensor operations, checked
before it runs (:mod:`convlens.models.torchscript`). Only opt in for files from
sources you trust; better, save ``model.state_dict()`` and load it with ``arch``.
"""

from __future__ import annotations

import os
import re
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from ..errors import ConvlensError, did_you_mean, first_line
from .keras import is_keras_model, load_keras_file, wrap_keras
from .model import Model, detect_output
from .nets import ShapesNet
from .tasks import detector_size, load_task_model, set_detector_size, task_info, task_names, task_of
from .torchscript import load_torchscript
from .transforms import IMAGENET_MEAN, IMAGENET_STD, make_transform

KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")
#: Suffixes of model files: a source ending in one of these is a path, never a model name.
MODEL_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".ts", ".jit", ".tar", *KERAS_SUFFIXES)
#: Models shipped inside convlens (``convlens.assets``), loadable by these names.
BUNDLED_MODELS = ("shapes",)

#: Architectures convlens builds itself, by name: ``fn(**kwargs) -> nn.Module``. Add your own here
#: (``ARCHITECTURES["mynet"] = MyNet``) to load state dicts with ``arch="mynet"``.
#: torchvision's own names are looked up through ``torchvision.models``.
ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"shapesnet": ShapesNet}


def torchvision_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _read_labels(labels: list[str] | str | os.PathLike[str] | None) -> list[str] | None:
    if labels is None or isinstance(labels, list):
        return labels
    path = Path(labels)
    if not path.is_file():
        raise ConvlensError(f"labels file not found: {path}")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def load_model(
    source: Any,  # a name, a path, an nn.Module or a Keras model
    *,
    weights: str | os.PathLike[str] | None = "default",
    arch: str | None = None,
    labels: list[str] | str | os.PathLike[str] | None = None,
    preprocessing: str | None = None,
    device: str | torch.device | None = None,
    input_size: int | tuple[int, int] | None = None,
    output: int | str | None = None,
    trust_code: bool = False,
) -> Model:
    """Load a CNN from a torchvision name, a file, or a model object.

    Args:
        source: a torchvision architecture name (``"resnet50"``); ``"shapes"``,
            the demo classifier shipped with convlens; a path to a
            TorchScript file, a state dict (with ``arch``), a convlens
            checkpoint, a pickled module (only with ``trust_code``), or a
            Keras ``.keras``/``.h5`` file; or an ``nn.Module``/Keras model
            already in memory.
        weights: for a torchvision name: ``"default"`` (torchvision's weights
            API, downloaded once), ``"none"`` (random init) or a path to a state
            dict. For a bare ``arch`` this is the state dict to load.
        arch: architecture name of a state-dict file.
        labels: class names, or a text file with one per line.
        preprocessing: Keras only: ``rescale`` (default), ``raw``, ``tf``, ``torch``, ``caffe``.
        device: where to put the model (default: where it is, CPU for files).
        input_size: ``H`` or ``(H, W)`` to run the model at. Default: what the model
            says (torchvision's weights, a timm ``pretrained_cfg``, a convlens checkpoint,
            a Keras input shape); a plain PyTorch module without one runs at 224.
            A Keras model with a fixed input shape cannot change it.
        output: for a model that returns several outputs (tuple, list or dict), the
            index or key of the one that holds the class scores.
        trust_code: allow a pickled module (``torch.save(model)``), whose loading
            runs code from the file, and a TorchScript file whose code does more
            than tensor maths (reads or writes files, calls the network, runs code
            while loading). Off by default: such a file is refused with a
            :class:`ConvlensError` naming what it would do. State dicts and
            convlens checkpoints never need it.

    Example:
        >>> model = load_model("resnet18", weights="none")
        >>> model.input_size
        (224, 224)
    """
    names = _read_labels(labels)
    model = _from_memory(source, names, preprocessing)
    if model is None:
        model = _from_name_or_file(source, weights, arch, names, preprocessing, input_size, trust_code)
    if input_size is not None:
        model = resized(model, input_size)
    if output is not None:
        model.select = output
    if device is not None:
        model.to(device)
    return model


def _from_memory(source: Any, names: list[str] | None, preprocessing: str | None) -> Model | None:
    """A model object already in memory (a :class:`Model`, an ``nn.Module``, a Keras model), wrapped;
    ``None`` when ``source`` is a name or a path."""
    if isinstance(source, Model):
        return source
    if is_keras_model(source):
        return wrap_keras(source, preprocessing=preprocessing, labels=names)
    if isinstance(source, nn.Module):
        return from_module(source, labels=names)
    return None


def _from_name_or_file(
    source: Any,
    weights: str | os.PathLike[str] | None,
    arch: str | None,
    names: list[str] | None,
    preprocessing: str | None,
    input_size: int | tuple[int, int] | None,
    trust_code: bool,
) -> Model:
    """The model a file path or a name gives: a file first, then the bundled, task and torchvision names."""
    path = Path(source)
    if path.suffix.lower() in KERAS_SUFFIXES:
        if not path.is_file():
            raise ConvlensError(f"model file not found: {path}")
        return load_keras_file(path, preprocessing, names)
    if path.is_file():
        return _load_torch_file(path, arch, names, trust_code)
    if str(source) in BUNDLED_MODELS:
        from ..assets import demo_model_path

        model = _load_torch_file(demo_model_path(), None, names)
        model.name = str(source)
        return model
    if str(source) in task_names():
        return load_task_model(str(source), weights, names, None if input_size is None else _size_pair(input_size))
    if str(source) in torchvision_names() or str(source) in ARCHITECTURES:
        return _load_named(str(source), weights, names)
    raise _not_found(source, path)


def _not_found(source: Any, path: Path) -> ConvlensError:
    """Why nothing loads from ``source``: a missing file, a folder, or an unknown name with the nearest ones."""
    if _looks_like_path(source):  # a typo in a path should not read as an unknown model name
        if path.is_dir():
            return ConvlensError(f"{path} is a folder; pass a model file inside it")
        return ConvlensError(f"model file not found: {path}")
    return ConvlensError(
        f"unknown model {str(source)!r}"
        f"{did_you_mean(str(source), [*BUNDLED_MODELS, *torchvision_names(), *task_names(), *ARCHITECTURES])}"
        " (pass a torchvision name, or a path to a .pt/.pth/.keras/.h5 file)"
    )


def _size_pair(size: int | Sequence[int]) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(int(v) for v in size)
    if len(pair) != 2 or min(pair) < 1:
        raise ConvlensError(f"an input size is H or (H, W) with positive sides, got {size!r}")
    return pair


def resized(model: Model, input_size: int | Sequence[int]) -> Model:
    """``model`` with its preprocessing rebuilt for another input size (same normalisation and crop ratio)."""
    size = _size_pair(input_size)
    if size == tuple(model.input_size):
        return model
    spec = model.info.get("transform")
    if spec is None or model.info.get("fixed_input_size"):
        raise ConvlensError(
            f"{model.name} has a fixed input size of {model.input_size[0]}x{model.input_size[1]}; "
            "it cannot run at another one"
        )
    model.transform, model.preprocessing = make_transform(size, **spec)
    model.input_size = size
    if model.info.get("task") == "detect":
        set_detector_size(model.module, size)
    return model


def _looks_like_path(source: object) -> bool:
    """Whether ``source`` names a file rather than a model: a path object, a separator, or a model-file suffix."""
    text = str(source)
    return (
        isinstance(source, os.PathLike)
        or any(sep in text for sep in ("/", "\\", os.sep))
        or Path(text).suffix.lower() in MODEL_SUFFIXES
    )


def as_model(model: Any) -> Model:
    """A :class:`Model` as given; a bare ``nn.Module`` or Keras model wrapped as :func:`load_model` does.

    The methods' entry points call this, so each of them takes a module as readily as a Model.
    """
    if isinstance(model, Model):
        return model
    if isinstance(model, nn.Module):  # Keras 3 models on the torch backend are modules too
        return load_model(model)
    raise ConvlensError(
        f"expected a convlens Model or an nn.Module, got {type(model).__name__}; load it with convlens.load_model first"
    )


def from_module(
    module: nn.Module,
    name: str | None = None,
    labels: list[str] | None = None,
    input_size: int | Sequence[int] | None = None,
) -> Model:
    """Wrap an in-memory PyTorch module.

    Its input size, normalisation and crop come from the module when it says
    (a timm model's ``pretrained_cfg``), else from ``input_size`` (default 224)
    with ImageNet's mean and std and a plain resize of the whole picture: no
    crop is assumed for a module that does not say it was trained with one.
    A torchvision detector normalises itself: it gets pictures in [0, 1], and its own
    resize is set to the input size (default: its own short side), so it resizes nothing
    more (:mod:`convlens.models.tasks`). A segmenter's class map is its ``out``.
    """
    spec = _timm_spec(module) or {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "crop": None}
    task = task_of(module)
    if task == "detect":  # it normalises and resizes itself: convlens resizes to the size it runs at
        spec = {"mean": None, "std": None, "crop": None, "source": "detector, which normalises itself"}
        if input_size is None:
            input_size = detector_size(module)[0]
        set_detector_size(module, _size_pair(input_size))
    fixed = spec.pop("fixed", False)
    size = _size_pair(input_size) if input_size is not None else spec.pop("size", (224, 224))
    spec.pop("size", None)
    transform, described = make_transform(size, **spec)
    extra = task_info(module, task) if task else {}
    return Model(
        module=module,
        name=name or type(module).__name__,
        transform=transform,
        input_size=size,
        labels=labels,
        output=detect_output(module),
        preprocessing=described,
        info={"transform": spec, **({"fixed_input_size": True} if fixed else {}), **extra},
        select="out" if task == "segment" else None,
    )


def _timm_spec(module: nn.Module) -> dict[str, Any] | None:
    """Input size, mean, std and crop ratio from a timm model's ``pretrained_cfg``, if it has one."""
    cfg = getattr(module, "pretrained_cfg", None)
    if not isinstance(cfg, dict) or "input_size" not in cfg:
        return None
    _, height, width = cfg["input_size"]
    embed: Any = getattr(module, "patch_embed", None)  # a timm PatchEmbed
    fixed = bool(getattr(embed, "strict_img_size", False) and getattr(embed, "img_size", None))
    if fixed:
        height, width = embed.img_size  # a ViT built for another size than its config's only runs at that one
    return {
        "size": (int(height), int(width)),
        "mean": tuple(cfg.get("mean", IMAGENET_MEAN)),
        "std": tuple(cfg.get("std", IMAGENET_STD)),
        "crop": cfg.get("crop_pct"),
        "source": "timm pretrained_cfg",
        "fixed": fixed,
    }


def _load_named(name: str, weights: str | os.PathLike[str] | None, labels: list[str] | None) -> Model:
    if name in ARCHITECTURES:
        module = ARCHITECTURES[name]()
        if weights not in (None, "none", "default"):
            _load_state_dict(module, _read_state_dict(Path(weights)), Path(weights), name)
        return from_module(module, name=name, labels=labels)

    default = torchvision.models.get_model_weights(name).DEFAULT
    if weights in (None, "none"):
        module = torchvision.models.get_model(name, weights=None)
    elif weights == "default":
        try:
            module = torchvision.models.get_model(name, weights=default)
        except (OSError, RuntimeError) as err:  # URLError is an OSError; a bad cache file a RuntimeError
            raise ConvlensError(
                f"cannot download the default weights of {name} ({first_line(err)}); "
                f"pass a local weights file with --weights PATH, or --weights none for random weights"
            ) from None
    else:
        module = torchvision.models.get_model(name, weights=None)
        _load_state_dict(module, _read_state_dict(Path(weights)), Path(weights), name)
    preset = default.transforms()
    crop = preset.crop_size[0]
    resize = preset.resize_size[0]
    spec = {
        "mean": tuple(preset.mean),
        "std": tuple(preset.std),
        "crop": crop / resize,
        "source": f"torchvision {default}",
    }
    return Model(
        module=module,
        name=name,
        transform=preset,
        input_size=(crop, crop),
        labels=labels or list(default.meta.get("categories") or []) or None,
        output="logits",
        info={"weights": str(weights), "transform": spec},
        preprocessing=make_transform((crop, crop), **spec)[1],
    )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConvlensError(f"weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if _needs_full_unpickler(err):
            raise ConvlensError(
                f"weights file {path} is a pickled Python object{_imports(err)}, not plain weights, "
                "and reading it would run code from the file; save model.state_dict() and pass "
                "that file"
            ) from None
        raise ConvlensError(f"cannot read weights file {path}: {first_line(err)}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConvlensError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    return state


def _load_state_dict(module: nn.Module, state: dict[str, torch.Tensor], path: Path, arch: str) -> None:
    own = module.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        k = mismatched[0]
        raise ConvlensError(
            f"weights file {path} does not fit architecture {arch}: {k} has shape "
            f"{tuple(state[k].shape)}, the model expects {tuple(own[k].shape)}"
        )
    result = module.load_state_dict(state, strict=False)
    problems = []
    if result.missing_keys:
        problems.append(f"{len(result.missing_keys)} missing (e.g. {result.missing_keys[0]})")
    if result.unexpected_keys:
        problems.append(f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[0]})")
    if problems:
        raise ConvlensError(f"weights file {path} does not fit architecture {arch}: keys " + ", ".join(problems))


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.endswith("constants.pkl") for name in archive.namelist())


def _needs_full_unpickler(err: Exception) -> bool:
    """Whether torch's safe unpickler refused the file for asking for something only a full one gives
    (a global to import), not for being unreadable (torch says ``weights_only`` in both cases)."""
    return "Unsupported global" in str(err)


def _imports(err: Exception) -> str:
    """``", which imports NAME"``: what the file asks to import, when torch's refusal says."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    return f", which imports {found.group(1)}" if found else ""


def _refuse_pickle(path: Path, err: Exception) -> ConvlensError:
    """The one-line refusal of a file that only a full (code-running) unpickler can read."""
    return ConvlensError(
        f"{path} is a pickled Python object (such as a full module saved with torch.save(model)){_imports(err)}, and "
        "loading it runs code from the file; if you trust its source pass trust_code=True (CLI: --trust-code), "
        "or save model.state_dict() instead and load that with arch/--arch"
    )


def _load_torch_file(path: Path, arch: str | None, labels: list[str] | None, trust_code: bool = False) -> Model:
    if _is_torchscript(path):
        return from_module(load_torchscript(path, trust_code), name=path.name, labels=labels)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as safe_err:
        # With the opt-in, anything the safe unpickler refuses is worth a full try (torch names
        # weights_only in all its refusals); without it, only a file asking for imports is a pickle.
        wants_full = "weights_only" in str(safe_err) if trust_code else _needs_full_unpickler(safe_err)
        if not wants_full:
            raise ConvlensError(f"cannot read model file {path}: {first_line(safe_err)}") from None
        # The safe unpickler refused something: only a full unpickler can read this file, and a
        # full unpickler calls whatever the file names, so that is the caller's decision, not ours.
        if not trust_code:
            raise _refuse_pickle(path, safe_err) from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:
            raise ConvlensError(f"cannot read model file {path}: {first_line(err)}") from None
    if isinstance(obj, nn.Module):
        return from_module(obj, name=path.name, labels=labels)
    if isinstance(obj, dict) and "convlens" in obj:
        return _from_checkpoint(obj, path, labels)
    if isinstance(obj, dict):
        if arch is None:
            raise ConvlensError(f"{path} holds a state dict; name its architecture with --arch (e.g. --arch resnet18)")
        model = _load_named(arch, "none", labels)
        state = obj.get("state_dict", obj)
        _load_state_dict(model.module, state, path, arch)
        model.name = path.name
        return model
    raise ConvlensError(f"{path} holds a {type(obj).__name__}, not a model or a state dict")


def _from_checkpoint(checkpoint: dict[str, Any], path: Path, labels: list[str] | None) -> Model:
    """A checkpoint written by ``convlens train``: architecture, weights and preprocessing in one file."""
    arch = checkpoint.get("arch")
    if arch not in ARCHITECTURES:
        raise ConvlensError(f"checkpoint {path} needs architecture {arch!r}, which this convlens does not know")
    try:
        module = ARCHITECTURES[arch](**checkpoint.get("arch_kwargs", {}))
    except TypeError as err:
        raise ConvlensError(f"checkpoint {path} does not fit architecture {arch}: {err}") from None
    _load_state_dict(module, checkpoint["state_dict"], path, arch)
    size = tuple(checkpoint.get("input_size", (128, 128)))
    norm = checkpoint.get("normalize") or {}
    spec: dict[str, Any] = {
        "mean": norm.get("mean"),
        "std": norm.get("std"),
        "crop": None,
        "source": "convlens checkpoint",
    }
    transform, described = make_transform(size, **spec)
    info = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer", "convlens")}
    return Model(
        module=module,
        name=path.name,
        transform=transform,
        input_size=size,
        labels=labels or checkpoint.get("labels"),
        output=checkpoint.get("output", "logits"),
        info={**info, "transform": spec},
        preprocessing=described,
    )
