"""Writing outputs so that nothing is ever half-written: a temporary name, then a rename.

Commands check where they will write before they start the work
(:func:`check_output_dir`, :func:`check_output_file`), write each file under a
temporary name (:func:`atomic_path`), and a set of files that belongs together
into a temporary folder that only moves into place once it is complete
(:func:`staged_folder`).

A write that fails because the disk is full, over quota or read-only
(:data:`DISK_ERRORS`) becomes one :class:`ConvlensError` line naming the file
(:func:`writing`, used by both), and the temporary name is removed on every way
out, a signal included: the clean-up runs with SIGINT and SIGTERM held
(:func:`signals_held`), so an interruption cannot cut it short.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from .errors import ConvlensError

#: errno values that mean the place being written cannot take the file (full, over quota, read-only, too big).
DISK_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})

_DISK_ADVICE = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for the file system",
    errno.EROFS: "read-only file system",
}


def disk_error(err: OSError, path: str | os.PathLike, *, option: str = "--out") -> str:
    """The one line for a write that ``err`` (errno in :data:`DISK_ERRORS`) stopped: what, where, what to do.

    Example::

        disk_error(OSError(errno.ENOSPC, "No space left on device"), "out/report.html")
        # 'no space left on device while writing out/report.html; nothing half-written was left;
        #  free some space or choose another --out'  (one line)
    """
    fallback = (err.strerror or str(err)).lower()
    what = _DISK_ADVICE.get(err.errno, fallback) if err.errno is not None else fallback
    todo = f"choose another {option}" if err.errno == errno.EROFS else f"free some space or choose another {option}"
    return f"{what} while writing {path}; nothing half-written was left; {todo}"


class DiskError(ConvlensError):
    """A write stopped by a full, over-quota or read-only disk (:func:`writing`); ``error`` is the OSError."""

    def __init__(self, error: OSError, path: str | os.PathLike, option: str = "--out"):
        super().__init__(disk_error(error, path, option=option))
        self.error, self.path, self.option = error, path, option


@contextlib.contextmanager
def writing(path: str | os.PathLike, *, option: str = "--out") -> Iterator[None]:
    """Turn a full, over-quota or read-only disk (:data:`DISK_ERRORS`) met in the block into one :class:`DiskError`.

    Other errors pass unchanged. Nested, the outermost names the place: a file
    written inside a :func:`staged_folder` is reported as the folder the user
    asked for, not as its temporary name. Example::

        with writing("out/journal.jsonl"), open("out/journal.jsonl", "a") as handle:
            handle.write(line)
    """
    try:
        yield
    except DiskError as err:
        raise DiskError(err.error, path, option) from None
    except OSError as err:
        if err.errno not in DISK_ERRORS:
            raise
        raise DiskError(err, path, option) from None


#: The signals ``convlens`` turns into an exception (see :func:`convlens.cli.main`).
HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM for the block: a clean-up or a set of renames is never cut in half.

    A signal that arrives meanwhile is delivered when the block ends, so an
    interruption still interrupts, just after the clean-up.
    """
    if not hasattr(signal, "pthread_sigmask"):  # Windows: nothing to hold
        yield
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; it replaces ``path`` only if the block succeeds.

    Example::

        with atomic_path("out/map.png") as tmp:
            image.save(tmp, format="PNG")
    """
    path = Path(path)
    tmp = None
    with writing(path):
        try:
            with signals_held():  # a signal between creating the name and knowing it would leave it behind
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
                os.close(fd)
            yield Path(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; outputs get the usual mode
            os.replace(tmp, path)
        finally:
            with signals_held():
                if tmp is not None and os.path.exists(tmp):
                    os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def save_image(image, path: str | os.PathLike) -> Path:
    """Save a PIL image atomically; the format follows the suffix."""
    path = Path(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format=(path.suffix.lstrip(".") or "png").upper().replace("JPG", "JPEG"))
    return path


def check_output_dir(path: str | os.PathLike, *, option: str = "--out") -> Path:
    """Make sure files can be written into the folder ``path`` (existing or to be created); write nothing.

    Raises :class:`ConvlensError`, naming ``option``, when ``path`` is a file,
    lies under a file, or its nearest existing folder does not take new files
    (read-only, no permission). Commands call it before any work, so a bad
    output place costs nothing.
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise ConvlensError(f"{option} {path} is a link to a place that does not exist; pass another {option}")
    if path.exists() and not path.is_dir():
        raise ConvlensError(f"{option} {path} is a file, not a folder; pass a folder name")
    _check_folder(path, f"{option} {path}", option)
    return path


def check_output_file(path: str | os.PathLike, *, option: str = "--out") -> Path:
    """Make sure the file ``path`` can be written (its folder existing or to be created); write nothing."""
    path = Path(path)
    if path.is_dir():
        raise ConvlensError(f"{option} {path} is a folder, not a file; pass a file name")
    _check_folder(path.parent, f"{option} {path}", option)
    return path


def _check_folder(folder: Path, shown: str, option: str) -> None:
    """``folder`` exists and takes files, or the nearest existing folder above it does."""
    existing = folder
    try:
        while not existing.exists():  # a path under a file does not exist either: walk up to what does
            existing = existing.parent
    except OSError as err:  # e.g. a folder on the way that may not be listed
        raise ConvlensError(f"cannot write {shown}: {err.strerror or err}; pass another {option}") from None
    if not existing.is_dir():
        raise ConvlensError(f"cannot write {shown}: {existing} is a file, not a folder; pass another {option}")
    try:  # os.access answers for the real user and ignores read-only mounts; trying is the only sure test
        fd, probe = tempfile.mkstemp(prefix=".convlens-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ConvlensError(
            f"cannot write {shown}: {existing} does not take new files ({err.strerror or err}); pass another {option}"
        ) from None


@contextlib.contextmanager
def staged_folder(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``folder``; its files move into ``folder`` only if the block succeeds.

    On any error the temporary folder (and any parent folder made for it) is
    removed, so ``folder`` holds either the whole set or none of it: a disk
    that fills up half-way leaves nothing behind. A new ``folder`` appears in
    one rename; into an existing one the files are renamed one by one, which
    needs no free space. Only files directly in the staged folder are moved.

    Example::

        with staged_folder("maps") as stage:
            save_image(overlay, stage / "cat_gradcam.png")
    """
    folder = Path(folder)
    created = []
    stage = None
    try:
        with writing(folder):
            with signals_held():  # a signal between making a folder and noting it would leave the folder behind
                for parent in reversed(folder.parents):
                    if not parent.exists():
                        parent.mkdir()
                        created.append(parent)
                stage = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".part", dir=folder.parent))
            yield stage
            with signals_held():  # the renames: all of them, or (after an error) none left half-way
                if folder.is_dir():
                    for entry in sorted(stage.iterdir()):
                        os.replace(entry, folder / entry.name)
                    stage.rmdir()
                else:
                    os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes 0700 folders; outputs get the usual mode
                    os.rename(stage, folder)
    except BaseException:
        with signals_held():
            if stage is not None:
                shutil.rmtree(stage, ignore_errors=True)
            for parent in reversed(created):
                with contextlib.suppress(OSError):
                    parent.rmdir()
        raise


def distinct_stems(paths: Sequence[str | os.PathLike]) -> list[str]:
    """A short, distinct output name per input path: the file's stem, with as many parent folders as it
    takes to tell it from the other inputs, joined by ``_``.

    ``data/circle/00000.png`` and ``data/cross/00000.png`` become ``circle_00000``
    and ``cross_00000``; a stem no other input shares stays as it is. Paths are
    compared made absolute, so ``a.png`` and ``./a.png`` are the same file, and
    the same file given again gets ``-2``, ``-3``, ... (as does any name that
    would still clash, e.g. ``x.png`` beside ``x.jpg``).

    Example::

        distinct_stems(["data/circle/00000.png", "data/cross/00000.png", "cat.jpg"])
        # ['circle_00000', 'cross_00000', 'cat']
    """
    tokens = []
    for path in paths:
        absolute = Path(os.path.abspath(path))
        tokens.append([*absolute.parent.parts[1:], absolute.stem])  # parts[0] is the root, never a name
    names = []
    for mine in tokens:
        others = [theirs for theirs in tokens if theirs != mine]
        depth = 1
        while depth < len(mine) and any(theirs[-depth:] == mine[-depth:] for theirs in others):
            depth += 1
        names.append("_".join(mine[-depth:]))
    used: set[str] = set()
    unique = []
    for name in names:
        candidate, count = name, 1
        while candidate in used:
            count += 1
            candidate = f"{name}-{count}"
        used.add(candidate)
        unique.append(candidate)
    return unique
