"""Keras 3 models on the torch backend (``pip install convlens[keras]``).

Under ``KERAS_BACKEND=torch`` a Keras model is an ``nn.Module`` whose layers
fire forward hooks, but its tensors are channels-last ``(N, H, W, C)``. The
model is wrapped once in :class:`ChannelsLastAdapter`; :func:`convlens.capture`
permutes recorded 4-D outputs, so every method sees channels-first tensors.
"""

from __future__ import annotations

import os
import re
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ConvlensError, ConvlensWarning, first_line
from .model import ChannelsLastAdapter, Model, OutputKind
from .transforms import KERAS_MODES, KerasTransform

if TYPE_CHECKING:
    from ..capture import OutputRewrite

# Keras ships no type information: its models and layers are ``Any`` here.


def import_keras() -> Any:
    """Import Keras on its torch backend, or say how to get it."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except ImportError:
        raise ConvlensError("Keras models need Keras 3: pip install 'convlens[keras]'") from None
    if keras.backend.backend() != "torch":
        raise ConvlensError(
            f"Keras is running on the {keras.backend.backend()!r} backend; "
            "set KERAS_BACKEND=torch before Keras is first imported"
        )
    return keras


def is_keras_model(obj: object) -> bool:
    keras = __import__("sys").modules.get("keras")
    return keras is not None and isinstance(obj, keras.Model)


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def _is_hdf5(path: Path) -> bool:
    """HDF5's signature sits at byte 0, or after a user block at 512, 1024, 2048, ... bytes."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        offset = 0
        while offset + len(_HDF5_SIGNATURE) <= size:
            handle.seek(offset)
            if handle.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE:
                return True
            offset = 512 if offset == 0 else offset * 2
    return False


def load_keras_file(path: Path, preprocessing: str | None = None, labels: list[str] | None = None) -> Model:
    """Load a ``.keras`` (zip) or ``.h5``/``.hdf5`` (HDF5) model file and wrap it."""
    # Keras calls a .keras file that is not a zip archive "File not found", which sends the
    # user looking for a path problem; check the container ourselves and say what is wrong.
    is_zip_format = path.suffix.lower() == ".keras"
    if not (zipfile.is_zipfile(path) if is_zip_format else _is_hdf5(path)):
        expected = "a zip archive" if is_zip_format else "an HDF5 file"
        raise ConvlensError(
            f"{path} cannot be read as a Keras file: it is not {expected} (corrupt, truncated, "
            "or not a .keras/.h5 model); save the model again with model.save()"
        )
    keras = import_keras()
    unsafe = _unsafe_members(path) if is_zip_format else []
    try:
        with warnings.catch_warnings():  # zipfile warns once per unsafe member; we say it once, below
            warnings.filterwarnings("ignore", message="Skipping invalid path during archive extraction")
            # Lambda layers are Python code in the file: safe_mode=True is stated, not defaulted, and held in a
            # scope of our own, because Keras lets a global keras.config.enable_unsafe_deserialization() (called
            # by anything else in the process) override the argument
            with _safe_mode_scope():
                keras_model = keras.saving.load_model(str(path), compile=False, safe_mode=True)
    except Exception as err:  # Keras raises many types for a bad file
        raise ConvlensError(f"cannot load Keras model {path}: {first_line(err)}") from None
    if unsafe:
        warnings.warn(
            f"{path} contains {len(unsafe)} member(s) with unsafe paths (such as {unsafe[0]!r}), which were skipped",
            ConvlensWarning,
            stacklevel=2,
        )
    return wrap_keras(keras_model, name=path.name, preprocessing=preprocessing, labels=labels)


def _safe_mode_scope() -> Any:
    """Keras's own scope that sets its global safe-mode flag for the duration (restored after)."""
    from keras.src.saving.serialization_lib import SafeModeScope

    return SafeModeScope(True)


def _unsafe_members(path: Path) -> list[str]:
    """Member names of a zip archive that would land outside the folder it is extracted to."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return [
        name
        for name in names
        if name.startswith(("/", "\\")) or ".." in re.split(r"[/\\]", name) or re.match(r"[A-Za-z]:", name)
    ]


def _first_layers(keras_model: Any) -> list[Any]:
    return [layer for layer in keras_model.layers if type(layer).__name__ != "InputLayer"]


#: Image side for a model whose input declares no size (ImageNet's usual crop).
DEFAULT_SIZE = 224

#: Layers that are the identity at inference (data augmentation): looked through when finding preprocessing.
_INFERENCE_IDENTITY = (
    "RandomFlip",
    "RandomRotation",
    "RandomZoom",
    "RandomTranslation",
    "RandomContrast",
    "RandomBrightness",
    "RandomErasing",
    "RandomGaussianBlur",
    "RandomSharpness",
    "GaussianNoise",
    "GaussianDropout",
    "Dropout",
    "SpatialDropout2D",
    "Identity",
)
#: keras.applications networks without preprocessing layers, by their default model name, and the mode
#: their ``preprocess_input`` implements; only named in the reason, never chosen from a name alone
#: (a user's own model may carry the name).
_APPLICATION_MODES = (
    (r"resnet\d+v2", "ResNet V2", "tf"),
    (r"resnet\d+", "ResNet", "caffe"),
    (r"vgg\d+", "VGG", "caffe"),
    (r"densenet\d+", "DenseNet", "torch"),
    (r"mobilenet", "MobileNet", "tf"),
    (r"xception", "Xception", "tf"),
    (r"inception", "Inception", "tf"),
    (r"nasnet", "NASNet", "tf"),
)


def _leading_layers(model: Any) -> Iterator[Any]:
    """The layers an input meets first, in order, nested models opened up."""
    for layer in model.layers:
        if type(layer).__name__ == "InputLayer":
            continue
        if hasattr(layer, "layers"):
            yield from _leading_layers(layer)
        else:
            yield layer


def _as_floats(value: Any) -> list[float]:
    """A layer's number, list or tensor as plain floats."""
    return [float(v) for v in torch.as_tensor(value).detach().cpu().reshape(-1).tolist()]


def _numbers(value: Any) -> str:
    return ", ".join(f"{v:.4g}" for v in _as_floats(value))


def _describe(layer: Any) -> str:
    if type(layer).__name__ == "Rescaling":
        return f"Rescaling(scale={_numbers(layer.scale)}, offset={_numbers(layer.offset)})"
    return f"Normalization(mean={_numbers(layer.mean)})"


def detect_preprocessing(keras_model: Any) -> tuple[str, str]:
    """The input scaling a Keras model expects, read from its first layers: ``(mode, reason)``.

    keras.applications' EfficientNet, EfficientNetV2, MobileNetV3 and ConvNeXt
    (and many user models) preprocess inside the model, with ``Rescaling`` and
    ``Normalization`` layers right after the input (possibly inside a nested
    model, possibly after augmentation layers that do nothing at inference):

    * a leading ``Rescaling`` (``1/255``; ``1/127.5 - 1``) takes 0-255 pixels: ``raw``;
    * a leading ``Normalization`` takes the pixels its statistics describe:
      0-255 when its mean exceeds 1.5 (ConvNeXt's 123.7, 116.3, 103.5): ``raw``;
      otherwise 0-1: ``rescale``;
    * no such layer: ``rescale`` (x/255), with a hint when the model carries the
      name of a keras.applications network whose ``preprocess_input`` differs.
    """
    found = []
    for layer in _leading_layers(keras_model):
        kind = type(layer).__name__
        if kind == "Rescaling" or (
            kind == "Normalization" and getattr(layer, "mean", None) is not None and not getattr(layer, "invert", False)
        ):
            found.append(layer)
        elif kind not in _INFERENCE_IDENTITY:
            break
    if found:
        chain = " + ".join(_describe(layer) for layer in found)
        first = found[0]
        if type(first).__name__ == "Normalization" and max(abs(m) for m in _as_floats(first.mean)) <= 1.5:
            return "rescale", f"the model starts with {chain}, statistics of 0-1 pixels: x/255"
        return "raw", f"the model starts with {chain} and takes 0-255 pixels"
    reason = "no Rescaling or Normalization layer at the model's input: x/255"
    names = [keras_model.name.lower()] + [layer.name.lower() for layer in _first_layers(keras_model)[:1]]
    for pattern, network, mode in _APPLICATION_MODES:
        if any(re.match(pattern, name) for name in names):
            return "rescale", f"{reason}; keras.applications' {network} expects --preprocessing {mode}"
    return "rescale", reason


def wrap_keras(
    keras_model: Any, name: str | None = None, preprocessing: str | None = None, labels: list[str] | None = None
) -> Model:
    """Wrap an in-memory Keras model as a :class:`Model`.

    ``preprocessing`` ``None`` reads it from the model (:func:`detect_preprocessing`);
    ``model.info["preprocessing"]`` and ``["preprocessing_reason"]`` say what was chosen and why.
    The model's declared input size is the only one it is fed (``info["fixed_input_size"]``);
    a model that declares none takes :data:`DEFAULT_SIZE` images by default, and any other size.
    """
    import_keras()
    shape = keras_model.input_shape
    if isinstance(shape, list):
        raise ConvlensError("models with several inputs are not supported; pass a single-input image model")
    if len(shape) != 4 or shape[3] is None:
        raise ConvlensError(f"expected a channels-last image input (None, H, W, C), got {shape}")
    layers = _first_layers(keras_model)
    if preprocessing is None:
        preprocessing, reason = detect_preprocessing(keras_model)
    else:
        reason = "as requested"
    if preprocessing not in KERAS_MODES:
        raise ConvlensError(f"unknown preprocessing {preprocessing!r}; choose one of {', '.join(KERAS_MODES)}")
    last = layers[-1] if layers else None
    activation = getattr(getattr(last, "activation", None), "__name__", "")
    if type(last).__name__ == "Softmax":
        activation = "softmax"
    output: OutputKind = "softmax" if activation == "softmax" else "sigmoid" if activation == "sigmoid" else "logits"
    # A declared size is the only one the model is fed; without one (keras.applications built without
    # input_shape, e.g. MobileNetV3) any size runs, and images are resized to ImageNet's 224 by default.
    fixed = shape[1] is not None and shape[2] is not None
    size = (int(shape[1] or DEFAULT_SIZE), int(shape[2] or DEFAULT_SIZE))
    return Model(
        module=ChannelsLastAdapter(keras_model),
        name=name or keras_model.name,
        transform=KerasTransform(size, preprocessing, channels=int(shape[3])),
        input_size=size,
        labels=labels,
        layout="channels_last",
        output=output,
        framework="keras",
        keras_model=keras_model,
        info={"preprocessing": preprocessing, "preprocessing_reason": reason, "fixed_input_size": fixed},
    )


def keras_layers(keras_model: Any) -> dict[str, nn.Module]:
    """Every layer by its Keras name, nested models flattened, input layers left out."""
    table: dict[str, nn.Module] = {}

    def walk(model: Any) -> None:
        for layer in model.layers:
            if type(layer).__name__ == "InputLayer":
                continue
            table[layer.name] = layer
            if hasattr(layer, "layers"):
                walk(layer)

    walk(keras_model)
    return table


def keras_logit_rewrites(keras_model: Any) -> dict[nn.Module, OutputRewrite]:
    """Replace a final softmax/sigmoid by the identity, giving the pre-activation logits."""
    last = _first_layers(keras_model)[-1]
    if type(last).__name__ in ("Softmax", "Activation"):
        return {last: lambda mod, inputs, output: inputs[0]}
    if type(last).__name__ == "Dense":

        def dense_logits(mod: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            logits = torch.matmul(inputs[0], mod.kernel.value)
            return logits + mod.bias.value if mod.use_bias else logits  # a Keras Dense layer: untyped

        return {last: dense_logits}
    raise ConvlensError(
        f"cannot take logits before the final {type(last).__name__} layer's activation; "
        "end the model with Dense or Activation"
    )
