"""Keras 3 models on the torch backend (``pip install convlens[keras]``).

Under ``KERAS_BACKEND=torch`` a Keras model is an ``nn.Module`` whose layers
fire forward hooks, but its tensors are channels-last ``(N, H, W, C)``. The
model is wrapped once in :class:`ChannelsLastAdapter`; :func:`convlens.capture`
permutes recorded 4-D outputs, so every method sees channels-first tensors.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import torch
from torch import nn

from ..errors import ConvlensError, first_line
from .model import ChannelsLastAdapter, Model
from .transforms import KERAS_MODES, KerasTransform


def import_keras():
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


def is_keras_model(obj) -> bool:
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
        raise ConvlensError(f"{path} cannot be read as a Keras file: it is not {expected} (corrupt, truncated, "
                            "or not a .keras/.h5 model); save the model again with model.save()")
    keras = import_keras()
    try:
        keras_model = keras.saving.load_model(str(path), compile=False)
    except Exception as err:  # Keras raises many types for a bad file
        raise ConvlensError(f"cannot load Keras model {path}: {first_line(err)}") from None
    return wrap_keras(keras_model, name=path.name, preprocessing=preprocessing, labels=labels)


def _first_layers(keras_model):
    return [layer for layer in keras_model.layers if type(layer).__name__ != "InputLayer"]


def wrap_keras(keras_model, name: str | None = None, preprocessing: str | None = None,
               labels: list[str] | None = None) -> Model:
    """Wrap an in-memory Keras model as a :class:`Model`."""
    import_keras()
    shape = keras_model.input_shape
    if isinstance(shape, list):
        raise ConvlensError("models with several inputs are not supported; pass a single-input image model")
    if len(shape) != 4 or shape[1] is None or shape[2] is None:
        raise ConvlensError(f"expected a channels-last image input (None, H, W, C), got {shape}")
    layers = _first_layers(keras_model)
    if preprocessing is None:
        starts_rescaled = bool(layers) and type(layers[0]).__name__ == "Rescaling"
        preprocessing = "raw" if starts_rescaled else "rescale"
    if preprocessing not in KERAS_MODES:
        raise ConvlensError(f"unknown preprocessing {preprocessing!r}; choose one of {', '.join(KERAS_MODES)}")
    last = layers[-1] if layers else None
    activation = getattr(getattr(last, "activation", None), "__name__", "")
    if type(last).__name__ == "Softmax":
        activation = "softmax"
    output = activation if activation in ("softmax", "sigmoid") else "logits"
    size = (int(shape[1]), int(shape[2]))
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
        info={"preprocessing": preprocessing},
    )


def keras_layers(keras_model) -> dict[str, nn.Module]:
    """Every layer by its Keras name, nested models flattened, input layers left out."""
    table: dict[str, nn.Module] = {}

    def walk(model):
        for layer in model.layers:
            if type(layer).__name__ == "InputLayer":
                continue
            table[layer.name] = layer
            if hasattr(layer, "layers"):
                walk(layer)

    walk(keras_model)
    return table


def keras_logit_rewrites(keras_model) -> dict[nn.Module, object]:
    """Replace a final softmax/sigmoid by the identity, giving the pre-activation logits."""
    last = _first_layers(keras_model)[-1]
    if type(last).__name__ in ("Softmax", "Activation"):
        return {last: lambda mod, inputs, output: inputs[0]}
    if type(last).__name__ == "Dense":
        def dense_logits(mod, inputs, output):
            logits = torch.matmul(inputs[0], mod.kernel.value)
            return logits + mod.bias.value if mod.use_bias else logits

        return {last: dense_logits}
    raise ConvlensError(
        f"cannot take logits before the final {type(last).__name__} layer's activation; "
        "end the model with Dense or Activation"
    )
