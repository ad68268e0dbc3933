"""Resuming ``evaluate`` safely: the run's fingerprint and its journal.

A run in ``out_dir`` is continued only by a run with the same fingerprint
(:func:`run_fingerprint`, kept in ``run.json``): the same weights and
preprocessing, methods, metrics, images and masks, and options. Anything else
is refused with one line saying what differs. The journal (:class:`Journal`)
keeps its whole lines of this run and drops damaged ones, which are then
recomputed; each line carries the fingerprint's digest (:func:`run_id`), so
the journal can be trusted even when ``run.json`` itself was damaged.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConvlensError
from ..fileio import signals_held, write_text, writing
from ..models import Model

#: Bumped when the fingerprint's contents change, so an older run is never taken for a match.
FINGERPRINT_VERSION = 1
#: Everything ``evaluate`` writes into ``out_dir``: what ``restart=True`` removes.
OUTPUT_FILES = (
    "run.json",
    "journal.jsonl",
    "results.csv",
    "summary.md",
    "summary.html",
    "deletion.png",
    "insertion.png",
)


class Journal:
    """The append-only record of finished (image, method) pairs of one run.

    Reading it keeps the lines that are whole records of run ``run_id`` and
    drops the rest: a torn last line, a garbled line anywhere, NUL bytes that a
    crash left where data should have been, lines of another run. ``dropped``
    counts the damaged lines and ``foreign`` the other run's; when there are
    any, the file is rewritten (atomically) with only the kept lines, so new
    lines are never appended after garbage.
    """

    def __init__(self, path: Path, run_id: str):
        self.path = path
        self.run_id = run_id
        self.records: list[dict] = []
        self.dropped = self.foreign = 0
        if not path.exists():
            return
        raw = path.read_bytes()
        for line in raw.split(b"\n"):
            # NUL runs are blocks a crash allocated but never wrote: around a line they are trimmed,
            # on their own they count as one damaged line (how many records they replaced is unknowable)
            text = line.strip(b"\x00 \t\r")
            if not text:
                self.dropped += b"\x00" in line
                continue
            record = _parse_record(text)
            if record is None:
                self.dropped += 1
            elif record.get("run") != run_id:
                self.foreign += 1
            else:
                self.records.append(record)
        if self.dropped or self.foreign or (not raw.endswith(b"\n") and raw):
            write_text(path, "".join(json.dumps(r) + "\n" for r in self.records))

    def done(self) -> set[tuple[str, str]]:
        return {(r["image"], r["method"]) for r in self.records}

    def append(self, record: dict) -> None:
        """Add one whole line; a write the disk refuses takes its part-line back and raises one ConvlensError line."""
        record = {**record, "run": self.run_id}
        line = (json.dumps(record) + "\n").encode("utf-8")
        with writing(self.path), signals_held():
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                end = os.lseek(fd, 0, os.SEEK_END)
                try:
                    written = 0
                    while written < len(line):  # unbuffered: a failed write leaves no buffer to flush later
                        written += os.write(fd, line[written:])
                    os.fsync(fd)
                except OSError:  # a full disk may take half the line: cut it off, the journal stays whole lines
                    os.ftruncate(fd, end)
                    raise
            finally:
                os.close(fd)
        self.records.append(record)


def _parse_record(line: bytes) -> dict | None:
    """One journal line as a record, or ``None`` when it is not a whole one."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    if not (
        isinstance(record, dict)
        and isinstance(record.get("image"), str)
        and isinstance(record.get("method"), str)
        and isinstance(record.get("target"), int)
        and isinstance(record.get("values"), dict)
        and isinstance(record.get("curves"), dict)
    ):
        return None
    return record


def model_fingerprint(model: Model) -> dict:
    """What makes a model give the values it gives: its weights (sha256 of every tensor) and its preprocessing.

    Hashing the weights rather than a file catches another model saved under
    the same file name, and works for named and in-memory models alike; a
    model with fresh random weights (``--weights none``) is a new model each time.
    Tensors are taken in the module's own order without their names: Keras
    numbers layer names per process (``conv2d_1``), which changes no value.
    """
    digest = hashlib.sha256()
    for tensor in model.module.state_dict().values():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tuple(tensor.shape)} {tensor.dtype}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return {
        "weights_sha256": digest.hexdigest(),
        "input_size": list(model.input_size),
        "preprocessing": _describe(model.transform),
    }


def _describe(transform) -> str:
    """A transform as text that is the same in every process (no memory addresses)."""
    if type(transform).__repr__ is not object.__repr__:
        return repr(transform)  # torchvision's Compose lists every step with its parameters
    settings = {k: v for k, v in sorted(getattr(transform, "__dict__", {}).items()) if not k.startswith("_")}
    return f"{type(transform).__qualname__}{settings}"


def data_fingerprint(images: Sequence[tuple[str, Path]], masks: Sequence[np.ndarray | None]) -> dict:
    """``(name, path)`` of each image by name, size and modification time, and the masks by content, as digests.

    Sizes and times rather than contents: reading every file again on each
    resume would cost as long as a pass over the data. A copied or touched
    file therefore counts as changed, which errs on the side of refusing.
    """
    files, drawn = hashlib.sha256(), hashlib.sha256()
    for (name, path), mask in zip(images, masks):
        info = path.stat()
        files.update(f"{name}\t{info.st_size}\t{info.st_mtime_ns}\n".encode())
        drawn.update(b"-" if mask is None else f"{mask.shape}".encode() + np.packbits(mask).tobytes())
    return {"images": len(images), "files_sha256": files.hexdigest(), "masks_sha256": drawn.hexdigest()}


def run_fingerprint(
    model: Model,
    methods: Sequence[str],
    metrics: Sequence[str],
    images: Sequence[tuple[str, Path]],
    masks: Sequence[np.ndarray | None],
    limit: int | None,
    seed: int = 0,
    targets=None,
) -> dict:
    """Everything a resumed run must share with the run it continues: model, methods, metrics, data, options.

    Methods given as functions are known by their names only. The seed of the
    ``limit`` sample is kept only with a limit: without one it chooses nothing;
    the target only when one is given (:func:`target_fingerprint`), so a run of
    the default target keeps the fingerprint it had before targets were options.
    """
    options: dict[str, Any] = {"limit": limit} if limit is None else {"limit": limit, "seed": seed}
    if targets is not None:
        options["targets"] = target_fingerprint(targets)
    return {
        "version": FINGERPRINT_VERSION,
        "model": model_fingerprint(model),
        "methods": list(methods),
        "metrics": list(metrics),
        "data": data_fingerprint(images, masks),
        "options": options,
    }


def target_fingerprint(target) -> str:
    """A target as text that is the same in every process: a class as itself; a Region, Box or Similarity
    by its settings, with arrays, tensors and pictures by a digest of their values and files by name, size
    and modification time (as the images are)."""
    if target is None or isinstance(target, (int, float, str, os.PathLike)):
        return str(target)
    if isinstance(target, (list, tuple)):
        return "[" + ", ".join(_setting(value) for value in target) + "]"
    if isinstance(target, torch.Tensor) or hasattr(target, "__array__") or hasattr(target, "tobytes"):
        values = np.ascontiguousarray(target.detach().cpu().numpy() if isinstance(target, torch.Tensor) else target)
        return f"array{values.shape} sha256 {hashlib.sha256(values.tobytes()).hexdigest()[:16]}"
    settings = {key: value for key, value in vars(target).items() if not key.startswith("_")}
    return f"{type(target).__name__}(" + ", ".join(f"{key}={_setting(value)}" for key, value in settings.items()) + ")"


def _setting(value) -> str:
    if isinstance(value, (str, os.PathLike)) and Path(value).is_file():
        info = Path(value).stat()
        return f"{value} ({info.st_size} bytes, mtime {info.st_mtime_ns})"
    return target_fingerprint(value)


def run_id(fingerprint: dict) -> str:
    """A short digest of the fingerprint, stamped on every journal line."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def _differences(old: dict, new: dict) -> list[str]:
    """What differs between two fingerprints, in words."""
    if not isinstance(old, dict) or old.get("version") != new["version"]:
        return ["it was made by another convlens version"]
    changes = []
    model_old, model_new = old.get("model") or {}, new["model"]
    if model_old.get("weights_sha256") != model_new["weights_sha256"]:
        changes.append(
            f"model: other weights (sha256 {str(model_old.get('weights_sha256'))[:12]} → "
            f"{model_new['weights_sha256'][:12]})"
        )
    if any(model_old.get(k) != model_new[k] for k in ("input_size", "preprocessing")):
        changes.append("model: other preprocessing or input size")
    changes.extend(
        f"{key}: {','.join(map(str, old.get(key) or []))} → {','.join(new[key])}"
        for key in ("methods", "metrics")
        if old.get(key) != new[key]
    )
    data_old, data_new = old.get("data") or {}, new["data"]
    if data_old.get("images") != data_new["images"]:
        changes.append(f"data: {data_old.get('images')} → {data_new['images']} images")
    elif data_old.get("files_sha256") != data_new["files_sha256"]:
        changes.append("data: image files renamed, edited or copied (names, sizes or times differ)")
    if data_old.get("masks_sha256") != data_new["masks_sha256"] and data_old.get("images") == data_new["images"]:
        changes.append("data: other masks")
    before_options = old.get("options") or {}
    for key in dict.fromkeys([*new["options"], *before_options]):
        before, value = before_options.get(key), new["options"].get(key)
        if before != value:
            changes.append(f"--{key}: {'none' if before is None else before} → {'none' if value is None else value}")
    return changes or ["settings differ"]


def check_settings(out_dir: Path, fingerprint: dict) -> bool:
    """Refuse a resume with other settings; write ``run.json`` for a new run. False when it was damaged."""
    path = out_dir / "run.json"
    if not path.exists():
        write_text(path, json.dumps(fingerprint, indent=2))
        return True
    try:
        previous = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        previous = None
    if not isinstance(previous, dict):  # truncated or garbled: the journal lines' own digests decide
        write_text(path, json.dumps(fingerprint, indent=2))
        return False
    if previous != fingerprint:
        raise ConvlensError(
            f"{out_dir} holds a run with other settings ({'; '.join(_differences(previous, fingerprint))}"
            "); pass a new --out, or --restart to discard that run"
        )
    return True


def clear_run(out_dir: Path) -> None:
    """Remove what an earlier run wrote into ``out_dir`` (and nothing else)."""
    for name in OUTPUT_FILES:
        (out_dir / name).unlink(missing_ok=True)
