"""What the explorer's page shows, computed: images, predictions, heatmaps, activation grids, unit maps.

:class:`Explorer` holds the one model of a server (loaded once) and answers every
view as PNG bytes or plain JSON-ready dicts; it knows nothing of HTTP (the routes
are :mod:`convlens.serve.app`). Every user mistake is a :class:`ConvlensError`
with a one-line message: :class:`NotFound` (an image that is not there) and
:class:`TooLarge` (an upload over the limit) say which HTTP status fits.

Images come from the folder given as DATA (every path confined to it: no
absolute path, no ``..``, no symbolic link that leads out) or from uploads,
decoded by the same bounded reader as the CLI (:func:`convlens.images.load_image`).
Heatmaps take the CLI's path, :func:`convlens.heatmaps.explain_many`: one checking
pass settles layer and target, then the method runs on that plan.

The model is borrowed by one request at a time (``Explorer.lock``): capturing
sets and restores the model's state, which two threads must not interleave.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import io
import math
import os
import shlex
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path, PurePosixPath

from PIL import Image

from ..errors import ConvlensError
from ..images import load_image
from ..models import Model, as_model, summarize

#: Uploads kept in memory (the oldest is dropped first) and decoded pictures kept for quick repeated views.
MAX_UPLOADS = 32
MAX_PICTURES = 16
#: The longest side of the pictures the page gets back.
VIEW_SIDE = 512
#: The upload limit by default (bytes).
MAX_UPLOAD_BYTES = 20 * 1024 * 1024


class NotFound(ConvlensError):
    """An image, unit or job that is not there (HTTP 404)."""


class TooLarge(ConvlensError):
    """An upload over the size limit (HTTP 413)."""


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def parse_target(text: str | None):
    """``""``/``top1`` -> None (the top class); ``"3"`` -> 3; anything else a class name."""
    text = (text or "").strip()
    if not text or text.lower() in ("top1", "top-1"):
        return None
    if text.lower() == "all":  # one map per class is the CLI's --targets all; a view shows one class
        raise ConvlensError("the explorer shows one class at a time; pass a class index or name (or top1)")
    return int(text) if text.lstrip("-").isdigit() else text


def _counted(progress):
    """:func:`~convlens.heatmaps.explain_many`'s steps as the jobs' ``progress(done, total)``: the method's own
    counts (one method on one image is one step)."""
    if progress is None:
        return None
    return lambda step: progress(step.part, step.parts) if step.part else None


@dataclasses.dataclass
class Picture:
    """An image the page can show: the RGB picture, its mask when known, and where it came from."""

    id: str
    image: Image.Image
    mask: object = None  # (H, W) bool array or None
    path: Path | None = None


class Explorer:
    """One model and its data, behind the explorer's page.

    Args:
        model: a :class:`convlens.Model` (or anything :func:`convlens.load_model` takes).
        data: a folder of images (class folders or not); masks ``<image>.mask.png`` beside them are used.
        atlas: an atlas store (``convlens scan``) or a dissection folder holding ``atlas.sqlite``.
        cache: the folder for cached filter patterns and trust views (default: a temporary folder).
        source: how the CLI names the model, for the reproducing ``convlens explain`` command.
        max_upload: the largest upload accepted, in bytes.
    """

    def __init__(
        self, model, data=None, atlas=None, *, cache=None, source: str | None = None, max_upload: int = MAX_UPLOAD_BYTES
    ):
        from ..atlas.store import model_fingerprint

        self.model: Model = model if isinstance(model, Model) else as_model(model)
        self.source = source or self.model.name
        self.data = self._data_root(data)
        self.max_upload = int(max_upload)
        self.lock = threading.RLock()
        self.summary = summarize(self.model)
        self.fingerprint = model_fingerprint(self.model.module)
        self._own_cache = None
        if cache is None:
            self._own_cache = tempfile.TemporaryDirectory(prefix="convlens-serve-")
            cache = self._own_cache.name
        self.cache = Path(cache)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.uploads: OrderedDict[str, Image.Image] = OrderedDict()
        self._pictures: OrderedDict[str, Picture] = OrderedDict()
        self._remembering = threading.Lock()  # the page's threads and the job thread share the picture cache
        self._methods: list[dict] | None = None
        self._probing = threading.Lock()
        self.atlas = None
        if atlas is not None:
            from .atlas_view import AtlasView

            self.atlas = AtlasView(atlas, self.model)
        # Long jobs (filter patterns, trust views, dissections) run on their own copy: the page stays quick meanwhile.
        self.job_model, self.job_lock = self._job_copy()

    def use_atlas(self, atlas) -> None:
        """Make ``atlas`` (a store or a dissection folder of this model) the one the unit pages read."""
        from .atlas_view import AtlasView

        self.atlas = AtlasView(atlas, self.model)

    # -- setup ------------------------------------------------------------------------------------
    @staticmethod
    def _data_root(data) -> Path | None:
        if data is None:
            return None
        root = Path(data)
        if not root.is_dir():
            raise ConvlensError(f"--data {data} is not a folder; pass a folder of images")
        return root.resolve()

    def _job_copy(self) -> tuple[Model, threading.RLock]:
        if self.model.keras_model is not None:  # Keras models do not deep-copy reliably: share, take turns
            return self.model, self.lock
        try:
            return dataclasses.replace(self.model, module=copy.deepcopy(self.model.module)), threading.RLock()
        except Exception:
            return self.model, self.lock

    def close(self) -> None:
        if self._own_cache is not None:
            self._own_cache.cleanup()
            self._own_cache = None

    @property
    def layers(self) -> list[str]:
        """The layers with a spatial output, in order: the ones heatmaps and activation grids can use."""
        return list(self.summary.spatial_layers)

    def check_layer(self, layer: str) -> str:
        from ..errors import did_you_mean

        if layer not in self.layers:
            more = " ..." if len(self.layers) > 12 else ""
            raise ConvlensError(
                f"unknown layer {layer!r}{did_you_mean(layer, self.layers)}; the layers with a "
                f"spatial output are {', '.join(self.layers[:12])}{more}"
            )
        return layer

    # -- the model --------------------------------------------------------------------------------
    def info(self) -> dict:
        """Name, input size, classes, layers (auto marked) and every registered method with whether it applies."""
        return {
            "name": self.model.name,
            "source": self.source,
            "input_size": list(self.model.input_size),
            "classes": list(self.model.labels or [f"class {i}" for i in range(self._class_count())]),
            "layers": self.layers,
            "auto_layer": self.summary.auto_layer,
            "methods": self.methods(),
            "fingerprint": self.fingerprint,
            "atlas": self.atlas.describe() if self.atlas else None,
            "data": self.data is not None,
        }

    def _class_count(self) -> int:
        import torch

        with self.lock, torch.no_grad():
            gray = self._gray()
            return int(self.model.scores(self.model(self.model.preprocess([gray]))).shape[-1])

    def _gray(self) -> Image.Image:
        """A mid-gray image of the model's input size: the probe that runs a method or the model once."""
        height, width = self.model.input_size
        return Image.new("RGB", (width, height), (128, 128, 128))

    def methods(self) -> list[dict]:
        """Every registered method, each tried once on a gray image at the auto layer: ``applies`` and ``reason``.

        The slow kinds are not run: Score-CAM and Ablation-CAM need only a spatial layer, which the
        auto layer is; the gradient methods with sample counts run with the smallest.
        """
        with self._probing:  # once, even when the first page load and the start-up warm-up ask together
            if self._methods is None:
                self._methods = self._probe_methods()
            return self._methods

    def _probe_methods(self) -> list[dict]:
        from ..heatmaps import METHODS, explain_many, style_for
        from ..render.overlay import STYLES, colorbar_css

        gray = self._gray()
        cheapest = {"n_samples": 1, "steps": 2}
        tried = [name for name, method in METHODS.items() if method.kind != "perturbation"]
        options = {name: {k: v for k, v in cheapest.items() if k in METHODS[name].option_names()} for name in tried}
        with self.lock:
            skipped = explain_many(self.model, [gray], tried, options=options, skip_inapplicable=True).skipped
        found = []
        for name, method in METHODS.items():
            reason = skipped.get(name)
            style = style_for(name)
            found.append(
                {
                    "name": name,
                    "kind": method.kind,
                    "applies": reason is None,
                    "reason": reason,
                    "uses_layer": method.uses_layer,
                    "style": style,
                    "colorbar": colorbar_css(STYLES[style]),
                }
            )
        return found

    # -- images -----------------------------------------------------------------------------------
    def images(self) -> list[dict]:
        """The images under DATA (masks left out) and the uploads, as ``{"id", "name", "mask"}``."""
        from ..data.folders import IMAGE_SUFFIXES
        from ..data.shapes import is_mask_file, mask_path

        listed = []
        if self.data is not None:
            for path in sorted(self.data.rglob("*")):
                if path.suffix.lower() not in IMAGE_SUFFIXES or is_mask_file(path) or not self._inside(path):
                    continue
                relative = path.relative_to(self.data).as_posix()
                listed.append({"id": relative, "name": relative, "mask": mask_path(path).is_file()})
        listed += [{"id": key, "name": f"upload {key[7:15]}", "mask": False} for key in self.uploads]
        return listed

    def _inside(self, path: Path) -> bool:
        try:
            return self.data is not None and path.is_file() and path.resolve().is_relative_to(self.data)
        except OSError:
            return False

    def confine(self, image: str) -> Path:
        """The file ``image`` names under DATA; anything pointing elsewhere is refused on one line."""
        if self.data is None:
            raise NotFound(f"no image folder was given (start with --data DIR); cannot open {image!r}")
        text = (image or "").replace("\\", "/")
        if "\x00" in text or len(text) > 1024:
            raise ConvlensError(
                "image must be a path relative to the data folder, without NUL bytes, at most 1024 characters"
            )
        relative = PurePosixPath(text)
        if not text or relative.is_absolute() or (relative.parts and ":" in relative.parts[0]):
            raise ConvlensError(f"image {image!r} must be a path relative to the data folder")
        if ".." in relative.parts:
            raise ConvlensError(f"image {image!r} leaves the data folder ('..' is not allowed)")
        path = self.data.joinpath(*relative.parts)
        try:
            resolved = path.resolve()
            if not resolved.is_relative_to(self.data):
                raise ConvlensError(f"image {image!r} leads outside the data folder (a symbolic link out of it)")
            found = resolved.is_file()
        except (OSError, RuntimeError) as err:  # a link loop, a name too long for the file system
            why = getattr(err, "strerror", None) or err
            raise ConvlensError(f"image {image[:80]!r} cannot be opened: {why}") from None
        if not found:
            raise NotFound(f"image not found in the data folder: {image}")
        return resolved

    def picture(self, image: str) -> Picture:
        """The decoded image ``image`` (a DATA-relative path or an upload id)."""
        with self._remembering:
            if image in self._pictures:
                self._pictures.move_to_end(image)
                return self._pictures[image]
        if image.startswith("upload:"):
            if image not in self.uploads:
                raise NotFound(f"no upload {image!r} (uploads are kept while the server runs, {MAX_UPLOADS} at most)")
            found = Picture(image, self.uploads[image])
        else:
            from ..data.shapes import read_mask

            path = self.confine(image)
            found = Picture(image, load_image(path), read_mask(path), path)
        with self._remembering:
            self._pictures[image] = found
            while len(self._pictures) > MAX_PICTURES:
                self._pictures.popitem(last=False)
        return found

    def upload(self, content: bytes, name: str = "upload") -> dict:
        """Decode an uploaded file with the CLI's bounded image reader and keep it; never anything but an image."""
        if len(content) > self.max_upload:
            raise TooLarge(f"upload {name!r} is {len(content):,} bytes, over the limit of {self.max_upload:,}")
        if not content:
            raise ConvlensError(f"upload {name!r} is empty; send the bytes of a PNG or JPEG file")
        key = "upload:" + hashlib.sha256(content).hexdigest()[:16]
        if key not in self.uploads:
            handle, temporary = tempfile.mkstemp(prefix="upload-", dir=self.cache)
            try:
                with os.fdopen(handle, "wb") as out:
                    out.write(content)
                try:
                    picture = load_image(temporary)
                except ConvlensError as err:  # the message names our temporary file: name the upload instead
                    message = str(err).replace(repr(temporary), repr(name)).replace(temporary, name)
                    raise ConvlensError(message) from None
            finally:
                os.unlink(temporary)
            self.uploads[key] = picture
            while len(self.uploads) > MAX_UPLOADS:
                dropped, _ = self.uploads.popitem(last=False)
                self._pictures.pop(dropped, None)
        return {
            "id": key,
            "name": f"upload {key[7:15]}",
            "width": self.uploads[key].width,
            "height": self.uploads[key].height,
        }

    def original(self, image: str) -> bytes:
        from ..render.overlay import bounded

        return png_bytes(bounded(self.picture(image).image, VIEW_SIDE))

    # -- views ------------------------------------------------------------------------------------
    def predictions(self, image: str, top: int = 5) -> list[dict]:
        picture = self.picture(image)
        with self.lock:
            found = self.model.predict([picture.image], top_k=top)[0]
        return [{"index": p.index, "label": p.label, "probability": p.probability} for p in found]

    def check_heatmap(self, image: str, method: str, layer: str, opacity: float):
        """The method and the picture of a heatmap request, once its layer and opacity are known to be fine."""
        from ..heatmaps import get_method, style_for
        from ..render.overlay import check_style

        chosen = get_method(method)
        if layer != "auto":
            self.check_layer(layer)
        check_style(None, opacity, style_for(chosen))
        return chosen, self.picture(image)

    def heatmap(
        self,
        image: str,
        method: str = "gradcam",
        layer: str = "auto",
        target: str | None = None,
        opacity: float = 0.4,
        *,
        progress=None,
        job: bool = False,
    ) -> tuple[bytes, dict]:
        """The overlay PNG of one method's map, and what it shows (method, layer, target, flat).

        ``job``: run on the jobs' copy of the model (a slow method in the background); ``progress(done, total)``
        is handed to the method.
        """
        from ..heatmaps import explain_many, style_for
        from ..render.overlay import overlay_heatmap

        chosen, picture = self.check_heatmap(image, method, layer, opacity)
        style = style_for(chosen)
        model, lock = (self.job_model, self.job_lock) if job else (self.model, self.lock)
        with lock:  # the CLI's path: one checking pass settles layer and target, the method runs on its plan
            found = explain_many(
                model,
                [picture.image],
                [chosen.name],
                layer=layer,
                targets=parse_target(target),
                progress=_counted(progress),
            )
        result = found.results[chosen.name][0]
        drawn = overlay_heatmap(
            picture.image,
            result.maps[0],
            transform=self.model.transform,
            alpha=opacity,
            style=style,
            max_side=VIEW_SIDE,
        )
        info = {
            "method": chosen.name,
            "layer": result.layer,
            "target": result.targets[0],
            "target_name": result.target_names[0],
            "predicted": found.predicted[0],
            "flat": bool(result.flat[0]),
            "style": style,
            "command": self.command(picture, chosen.name, layer, target, opacity),
        }
        return png_bytes(drawn), info

    def command(self, picture: Picture, method: str, layer: str, target: str | None, opacity: float) -> str:
        """The ``convlens explain`` command that draws the same picture."""
        where = str(picture.path) if picture.path else "UPLOADED.png"
        parts = ["convlens", "explain", self.source, where, "--methods", method]
        if layer != "auto":
            parts += ["--layers", layer]
        if parse_target(target) is not None:
            parts += ["--targets", str(target)]
        if abs(opacity - 0.4) > 1e-9:
            parts += ["--alpha", f"{opacity:g}"]
        return " ".join(shlex.quote(part) for part in parts)

    def _layer_maps(self, image: str, layer: str):
        from ..inside import activations

        self.check_layer(layer)
        picture = self.picture(image)
        with self.lock:
            return activations(self.model, picture.image, [layer])[layer][0].float().cpu()

    def activation_grid(self, image: str, layer: str) -> tuple[bytes, dict]:
        """Every channel of ``layer`` tiled (convlens.render.grid), and the layout that finds a clicked channel."""
        from ..render.grid import activation_grid

        maps = self._layer_maps(image, layer)
        channels, height, width = maps.shape
        columns = min(channels, 16 if channels <= 256 else 32)
        scale = max(1, math.ceil(24 / min(height, width)))
        grid = activation_grid(maps, None, per_row=columns, min_tile=24, margin=1)
        layout = {
            "layer": layer,
            "channels": channels,
            "columns": columns,
            "tile_width": width * scale,
            "tile_height": height * scale,
            "margin": 1,
            "width": grid.width,
            "height": grid.height,
        }
        return png_bytes(grid), layout

    def check_unit(self, layer: str, unit: int, channels: int) -> None:
        if not 0 <= unit < channels:
            raise ConvlensError(f"unit {unit} is out of range: layer {layer!r} has {channels} units (0-{channels - 1})")

    def unit_map(self, image: str, layer: str, unit: int) -> tuple[bytes, dict]:
        """One channel's map over the image (scaled by its own maximum), and its numbers on this image."""
        from ..render.overlay import overlay_heatmap

        maps = self._layer_maps(image, layer)
        self.check_unit(layer, unit, maps.shape[0])
        channel = maps[unit]
        top = float(channel.max())
        shown = (channel.clamp(min=0) / top) if top > 0 else channel.clamp(min=0) * 0
        drawn = overlay_heatmap(
            self.picture(image).image, shown, transform=self.model.transform, alpha=0.5, max_side=VIEW_SIDE
        )
        return png_bytes(drawn), {
            "layer": layer,
            "unit": unit,
            "max": top,
            "mean": float(channel.mean()),
            "channels": maps.shape[0],
        }

    def unit(self, layer: str, unit: int) -> dict:
        """What the atlas knows of a unit (dissection label and IoU, selectivity, top images), if there is one."""
        self.check_layer(layer)
        channels = self._channels(layer)
        self.check_unit(layer, unit, channels)
        found = {"layer": layer, "unit": unit, "channels": channels, "atlas": None}
        if self.atlas is not None:
            found["atlas"] = self.atlas.unit(layer, unit)
        return found

    def _channels(self, layer: str) -> int:
        row = next(row for row in self.summary.rows if row.name == layer)
        if row.output_shape is None:  # a spatial layer always has one: only an unchecked name gets here
            raise ConvlensError(f"layer {layer!r} has no recorded output shape, so no units to count")
        return int(row.output_shape[1] if row.layout == "channels_first" else row.output_shape[-1])
