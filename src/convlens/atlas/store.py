"""The atlas store: one SQLite file (stdlib ``sqlite3``), queryable with any SQLite tool.

Schema (every table is plain rows; the only blob is the quantile sketch, a
zlib-compressed little-endian int64 array)::

    meta(key TEXT PRIMARY KEY, value TEXT)          -- format, model, fingerprints, data source, settings
    parts(job TEXT, part INTEGER, first INTEGER, stop INTEGER, images INTEGER)  -- committed parts
    images(image INTEGER PRIMARY KEY, key TEXT, label INTEGER)                  -- the dataset, in scan order
    classes(class INTEGER PRIMARY KEY, name TEXT)
    layers(layer TEXT PRIMARY KEY, position INTEGER, channels INTEGER, height INTEGER, width INTEGER,
           images INTEGER, count INTEGER, k INTEGER, sketch_bits INTEGER, sketch_exponent INTEGER)
    units(layer TEXT, unit INTEGER, mean REAL, std REAL, m2 REAL, max REAL, positive INTEGER,
          fraction_positive REAL, p50 REAL, p99 REAL, p995 REAL, selectivity REAL)
    tops(layer TEXT, unit INTEGER, rank INTEGER, image INTEGER, value REAL, y INTEGER, x INTEGER)
    class_means(layer TEXT, unit INTEGER, class INTEGER, images INTEGER, sum REAL, mean REAL)
    sketches(layer TEXT PRIMARY KEY, rows INTEGER, columns INTEGER, counts BLOB)  -- (channels, buckets)
    concepts(concept INTEGER PRIMARY KEY, name TEXT)
    concept_pixels(layer TEXT, concept INTEGER, pixels INTEGER, images INTEGER)
    overlaps(layer TEXT, unit INTEGER, concept INTEGER, intersection INTEGER, union_pixels INTEGER, iou REAL)
    dissection(layer TEXT, unit INTEGER, threshold REAL, unit_pixels INTEGER, label TEXT, iou REAL)
    tcav(class TEXT, concept TEXT, layer TEXT, score REAL, std REAL, random REAL, random_std REAL,
         p_value REAL, significant INTEGER, cav_accuracy REAL, runs INTEGER)  -- convlens tcav --store

The ``tcav`` table is made when ``convlens tcav --store`` first writes to a store (stores
written before it have none, and are read as before); a row replaces the one of the
same class, concept and layer.
``count`` is values seen per channel (images x height x width); ``y``/``x`` are
the position of the image's maximum in the layer's map; ``label`` is NULL
for a unit that detects no concept. Example query::

    SELECT layer, COUNT(DISTINCT label) FROM dissection WHERE label IS NOT NULL GROUP BY layer;

Each part of a scan is committed in one transaction together with the running
totals, so a crash leaves the store as it was after the last committed part,
and a scan started again on it resumes there. A store is fingerprinted (model
weights, layers, data, settings): resuming or reading it with another model,
other layers or other data is refused.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..errors import ConvlensError
from .accumulators import ConceptOverlap, LayerStats, SketchGrid
from .storefile import connect, kill_point, read_failure, remove_store, sqlite_failure

FORMAT = "convlens-atlas-1"

SCHEMA = """
CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE parts(job TEXT, part INTEGER, first INTEGER, stop INTEGER, images INTEGER, PRIMARY KEY(job, part));
CREATE TABLE images(image INTEGER PRIMARY KEY, key TEXT, label INTEGER);
CREATE TABLE classes(class INTEGER PRIMARY KEY, name TEXT);
CREATE TABLE layers(layer TEXT PRIMARY KEY, position INTEGER, channels INTEGER, height INTEGER, width INTEGER,
                    images INTEGER, count INTEGER, k INTEGER, sketch_bits INTEGER, sketch_exponent INTEGER);
CREATE TABLE units(layer TEXT, unit INTEGER, mean REAL, std REAL, m2 REAL, max REAL, positive INTEGER,
                   fraction_positive REAL, p50 REAL, p99 REAL, p995 REAL, selectivity REAL,
                   PRIMARY KEY(layer, unit));
CREATE TABLE tops(layer TEXT, unit INTEGER, rank INTEGER, image INTEGER, value REAL, y INTEGER, x INTEGER,
                  PRIMARY KEY(layer, unit, rank));
CREATE TABLE class_means(layer TEXT, unit INTEGER, class INTEGER, images INTEGER, sum REAL, mean REAL,
                         PRIMARY KEY(layer, unit, class));
CREATE TABLE sketches(layer TEXT PRIMARY KEY, rows INTEGER, columns INTEGER, counts BLOB);
CREATE TABLE concepts(concept INTEGER PRIMARY KEY, name TEXT);
CREATE TABLE concept_pixels(layer TEXT, concept INTEGER, pixels INTEGER, images INTEGER,
                            PRIMARY KEY(layer, concept));
CREATE TABLE overlaps(layer TEXT, unit INTEGER, concept INTEGER, intersection INTEGER, union_pixels INTEGER,
                      iou REAL, PRIMARY KEY(layer, unit, concept));
CREATE TABLE dissection(layer TEXT, unit INTEGER, threshold REAL, unit_pixels INTEGER, label TEXT, iou REAL,
                        PRIMARY KEY(layer, unit));
"""


#: Made on first use by :meth:`AtlasStore.commit_tcav`, so older stores need no migration.
TCAV_TABLE = (
    "CREATE TABLE IF NOT EXISTS tcav(class TEXT, concept TEXT, layer TEXT, score REAL, std REAL, "
    "random REAL, random_std REAL, p_value REAL, significant INTEGER, cav_accuracy REAL, runs INTEGER)"
)


def model_fingerprint(module: torch.nn.Module) -> str:
    """A hash of a module's parameters and buffers (names, shapes, dtypes, values)."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        if not isinstance(tensor, torch.Tensor):
            continue
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def _blob(array: np.ndarray) -> bytes:
    return zlib.compress(np.ascontiguousarray(array, dtype="<i8").tobytes(), 1)


def _unblob(blob: bytes, rows: int, columns: int) -> np.ndarray:
    try:
        return np.frombuffer(zlib.decompress(blob), dtype="<i8").reshape(rows, columns).astype(np.int64)
    except (zlib.error, ValueError, TypeError) as err:  # zlib's checksum catches a damaged blob
        raise sqlite3.DatabaseError(f"a quantile sketch is damaged ({err})") from None


class AtlasStore:
    """An open atlas file. :meth:`create_or_resume` for writing, :meth:`open` for reading."""

    def __init__(self, path: Path, connection: sqlite3.Connection):
        self.path = path
        self.db = connection

    # -- opening ----------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> AtlasStore:
        """Open an existing store for reading (read-only, checked); a missing, damaged or foreign file is one line."""
        path = Path(path)
        if not path.is_file():
            raise ConvlensError(f"atlas not found: {path} (write one with 'convlens scan')")
        return cls._checked(path, connect(path, write=False))

    @classmethod
    def _checked(cls, path: Path, connection: sqlite3.Connection) -> AtlasStore:
        store = cls(path, connection)
        try:
            fmt = store.meta().get("format")
        except sqlite3.DatabaseError:
            fmt = None
        if fmt != FORMAT:
            connection.close()
            raise ConvlensError(f"{path} is not a convlens atlas (an SQLite file written by 'convlens scan')")
        return store

    @classmethod
    def create_or_resume(
        cls, path: str | os.PathLike, meta: dict[str, str], *, checked: Sequence[tuple[str, str]] = ()
    ) -> AtlasStore:
        """Open ``path`` to continue it, or create it with ``meta``.

        ``checked`` lists ``(meta key, what it is)`` pairs that must match an existing
        store (model, layers, data): a mismatch is a one-line error and nothing is written.
        An existing store is checked (``PRAGMA quick_check``) before anything is written;
        a hot journal of a killed writer is rolled back by SQLite on opening.
        The caller holds :func:`~convlens.atlas.storefile.writer_lock`.
        """
        path = Path(path)
        if path.is_file() and path.stat().st_size == 0:  # a creation killed before its commit: nothing to keep
            remove_store(path)
        if path.exists():
            if not path.is_file():
                raise ConvlensError(f"{path} is not a file; pass the path of an atlas store (.sqlite)")
            store = cls._checked(path, connect(path, write=True))
            stored = store.meta()
            for key, what in checked:
                if stored.get(key) != meta.get(key):
                    store.close()
                    raise ConvlensError(
                        f"{path} was written for {what} {stored.get(key)!r}, not {meta.get(key)!r}; "
                        "pass another output path or delete that file"
                    )
            return store
        path.parent.mkdir(parents=True, exist_ok=True)
        connection = None
        try:
            connection = sqlite3.connect(path, isolation_level=None)
            connection.execute("BEGIN IMMEDIATE")
            for statement in SCHEMA.strip().split(";"):
                if statement.strip():
                    connection.execute(statement)
            connection.executemany("INSERT INTO meta VALUES (?, ?)", [("format", FORMAT), *meta.items()])
            kill_point("create", 0, "before")
            connection.execute("COMMIT")
        except sqlite3.Error as err:
            if connection is not None:
                connection.close()
            remove_store(path)
            raise sqlite_failure(path, err, new=True) from None
        return cls(path, connection)

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> AtlasStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def transaction(self, kill: tuple[str, int] | None = None) -> Iterator[sqlite3.Connection]:
        """All or nothing: the block's writes are committed together or rolled back.

        An SQLite error (disk full, I/O error) is a one-line :class:`ConvlensError`; the store
        is then as it was after the last commit. ``kill`` ``(job, part)`` names the test hook's
        points (:func:`~convlens.atlas.storefile.kill_point`).
        """
        try:
            self.db.execute("BEGIN IMMEDIATE")
            yield self.db
            if kill is not None:
                kill_point(*kill, "before")
            self.db.execute("COMMIT")
        except BaseException as err:
            if self.db.in_transaction:  # SQLite has already rolled back after some errors (SQLITE_FULL)
                try:
                    self.db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
            if isinstance(err, sqlite3.Error):
                raise sqlite_failure(self.path, err) from None
            raise
        if kill is not None:
            kill_point(*kill, "after")

    # -- reading ----------------------------------------------------------
    @contextmanager
    def reading(self) -> Iterator[None]:
        """Reads inside the block that hit damage SQLite's quick check cannot see are one-line errors."""
        try:
            yield
        except sqlite3.Error as err:
            raise read_failure(self.path, err) from None

    def meta(self) -> dict[str, str]:
        return dict(self.db.execute("SELECT key, value FROM meta"))

    def layer_names(self) -> list[str]:
        return [row[0] for row in self.db.execute("SELECT layer FROM layers ORDER BY position")]

    def done_parts(self, job: str) -> set[int]:
        return {row[0] for row in self.db.execute("SELECT part FROM parts WHERE job = ?", (job,))}

    def images(self) -> tuple[list[str], list[int]]:
        rows = self.db.execute("SELECT key, label FROM images ORDER BY image").fetchall()
        return [r[0] for r in rows], [r[1] for r in rows]

    def classes(self) -> list[str]:
        return [row[0] for row in self.db.execute("SELECT name FROM classes ORDER BY class")]

    def concepts(self) -> list[str]:
        return [row[0] for row in self.db.execute("SELECT name FROM concepts ORDER BY concept")]

    def load_stats(self, layer: str) -> LayerStats:
        """The scan totals of ``layer`` as a :class:`LayerStats`."""
        row = self.db.execute(
            "SELECT channels, height, width, images, count, k, sketch_bits, sketch_exponent "
            "FROM layers WHERE layer = ?",
            (layer,),
        ).fetchone()
        if row is None:
            known = ", ".join(self.layer_names()) or "none"
            raise ConvlensError(f"layer {layer!r} is not in the atlas {self.path} (its layers: {known})")
        channels, height, width, images, count, k, bits, exponent = row
        classes = len(self.classes())
        stats = LayerStats(channels, height, width, k, classes, SketchGrid(bits, exponent))
        stats.images, stats.count = images, count
        for unit, mean, m2, top, positive in self.db.execute(
            "SELECT unit, mean, m2, max, positive FROM units WHERE layer = ?", (layer,)
        ):
            stats.mean[unit], stats.m2[unit], stats.max[unit], stats.positive[unit] = mean, m2, top, positive
        for unit, rank, image, value, y, x in self.db.execute(
            "SELECT unit, rank, image, value, y, x FROM tops WHERE layer = ?", (layer,)
        ):
            stats.top_image[unit, rank], stats.top_value[unit, rank] = image, value
            stats.top_y[unit, rank], stats.top_x[unit, rank] = y, x
        for unit, label, images_seen, total in self.db.execute(
            "SELECT unit, class, images, sum FROM class_means WHERE layer = ?", (layer,)
        ):
            stats.class_sum[label, unit] = total
            stats.class_images[label] = images_seen
        sketch = self.db.execute("SELECT rows, columns, counts FROM sketches WHERE layer = ?", (layer,)).fetchone()
        if sketch is not None:
            stats.sketch = _unblob(sketch[2], sketch[0], sketch[1])
        return stats

    def load_overlap(self, layer: str) -> ConceptOverlap | None:
        """The dissection sums of ``layer``, or ``None`` before the dissection pass started."""
        pixels = self.db.execute(
            "SELECT concept, pixels, images FROM concept_pixels WHERE layer = ? ORDER BY concept", (layer,)
        ).fetchall()
        if not pixels:
            return None
        units = self.db.execute(
            "SELECT unit, unit_pixels FROM dissection WHERE layer = ? ORDER BY unit", (layer,)
        ).fetchall()
        overlap = ConceptOverlap(len(units), len(pixels))
        overlap.concept_pixels = np.array([p for _, p, _ in pixels], dtype=np.int64)
        overlap.unit_pixels = np.array([p for _, p in units], dtype=np.int64)
        overlap.images = pixels[0][2]
        for unit, concept, intersection in self.db.execute(
            "SELECT unit, concept, intersection FROM overlaps WHERE layer = ?", (layer,)
        ):
            overlap.intersection[unit, concept] = intersection
        return overlap

    def dissection(self, layer: str | None = None) -> list[tuple]:
        """Rows ``(layer, unit, threshold, label, iou)`` of the dissection table, by layer order and unit."""
        query = (
            "SELECT d.layer, d.unit, d.threshold, d.label, d.iou FROM dissection d JOIN layers l "
            "ON d.layer = l.layer" + (" WHERE d.layer = ?" if layer else "") + " ORDER BY l.position, d.unit"
        )
        return self.db.execute(query, (layer,) if layer else ()).fetchall()

    def tcav(self) -> list[tuple]:
        """Rows of the ``tcav`` table (``convlens tcav --store``), by class, concept, layer; ``[]`` without one."""
        if not self.db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'tcav'").fetchone():
            return []
        return self.db.execute("SELECT * FROM tcav ORDER BY class, concept, layer").fetchall()

    # -- writing ----------------------------------------------------------
    def commit_tcav(self, rows: Sequence[tuple], runs: int) -> None:
        """Write TCAV rows ``(class, concept, layer, score, std, random, random_std, p, significant, accuracy)``."""
        with self.transaction() as db:
            db.execute(TCAV_TABLE)
            for row in rows:
                db.execute("DELETE FROM tcav WHERE class = ? AND concept = ? AND layer = ?", row[:3])
            db.executemany(
                "INSERT INTO tcav VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [(*row[:8], int(row[8]), row[9], runs) for row in rows],
            )

    def write_images(self, keys: Sequence[str], labels: Sequence[int], classes: Sequence[str]) -> None:
        if self.db.execute("SELECT COUNT(*) FROM images").fetchone()[0]:
            return
        with self.transaction() as db:
            db.executemany("INSERT INTO images VALUES (?, ?, ?)", zip(range(len(keys)), keys, labels))
            db.executemany("INSERT INTO classes VALUES (?, ?)", enumerate(classes))

    def commit_scan(self, stats: dict[str, LayerStats], part: tuple[int, int, int] | None) -> None:
        """Write the running totals of every layer and mark ``part`` ``(part, first, stop)`` done, atomically."""
        with self.transaction(("scan", part[0]) if part is not None else None) as db:
            for position, (layer, s) in enumerate(stats.items()):
                self._write_layer(db, position, layer, s)
            if part is not None:
                db.execute("INSERT INTO parts VALUES ('scan', ?, ?, ?, ?)", (*part, part[2] - part[1]))

    def _write_layer(self, db: sqlite3.Connection, position: int, layer: str, s: LayerStats) -> None:
        for table in ("layers", "units", "tops", "class_means", "sketches"):
            db.execute(f"DELETE FROM {table} WHERE layer = ?", (layer,))
        db.execute(
            "INSERT INTO layers VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (layer, position, s.channels, s.height, s.width, s.images, s.count, s.k, s.grid.bits, s.grid.exponent),
        )
        quantiles = [s.quantile(q) for q in (0.5, 0.99, 0.995)] if s.count else [np.full(s.channels, np.nan)] * 3
        columns = [s.mean, s.std, s.m2, s.max, s.positive, s.fraction_positive, *quantiles, s.selectivity]
        db.executemany(
            "INSERT INTO units VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(layer, unit, *(_plain(column[unit]) for column in columns)) for unit in range(s.channels)],
        )
        filled = np.argwhere(s.top_image >= 0)
        db.executemany(
            "INSERT INTO tops VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    layer,
                    int(c),
                    int(r),
                    int(s.top_image[c, r]),
                    float(s.top_value[c, r]),
                    int(s.top_y[c, r]),
                    int(s.top_x[c, r]),
                )
                for c, r in filled
            ],
        )
        means = s.class_means
        db.executemany(
            "INSERT INTO class_means VALUES (?, ?, ?, ?, ?, ?)",
            [
                (
                    layer,
                    unit,
                    label,
                    int(s.class_images[label]),
                    float(s.class_sum[label, unit]),
                    _plain(means[label, unit]),
                )
                for label in range(s.class_images.size)
                for unit in range(s.channels)
            ],
        )
        db.execute("INSERT INTO sketches VALUES (?, ?, ?, ?)", (layer, *s.sketch.shape, _blob(s.sketch)))

    def commit_dissection(
        self,
        overlaps: dict[str, ConceptOverlap],
        thresholds: dict[str, np.ndarray],
        concepts: Sequence[str],
        part: tuple[int, int, int] | None,
        min_iou: float,
    ) -> None:
        """Write the dissection sums, each unit's label and IoU, and mark ``part`` done, atomically."""
        with self.transaction(("dissect", part[0]) if part is not None else None) as db:
            if not db.execute("SELECT COUNT(*) FROM concepts").fetchone()[0]:
                db.executemany("INSERT INTO concepts VALUES (?, ?)", enumerate(concepts))
            for layer, overlap in overlaps.items():
                for table in ("concept_pixels", "overlaps", "dissection"):
                    db.execute(f"DELETE FROM {table} WHERE layer = ?", (layer,))
                db.executemany(
                    "INSERT INTO concept_pixels VALUES (?, ?, ?, ?)",
                    [(layer, k, int(p), overlap.images) for k, p in enumerate(overlap.concept_pixels)],
                )
                iou = overlap.iou
                union = overlap.unit_pixels[:, None] + overlap.concept_pixels[None, :] - overlap.intersection
                db.executemany(
                    "INSERT INTO overlaps VALUES (?, ?, ?, ?, ?, ?)",
                    [
                        (layer, c, k, int(overlap.intersection[c, k]), int(union[c, k]), float(iou[c, k]))
                        for c in range(iou.shape[0])
                        for k in range(iou.shape[1])
                    ],
                )
                best = iou.argmax(axis=1) if iou.shape[1] else np.zeros(iou.shape[0], dtype=int)
                rows = []
                for c in range(iou.shape[0]):
                    value = float(iou[c, best[c]]) if iou.shape[1] else 0.0
                    label = concepts[best[c]] if iou.shape[1] and value > min_iou else None
                    rows.append((layer, c, float(thresholds[layer][c]), int(overlap.unit_pixels[c]), label, value))
                db.executemany("INSERT INTO dissection VALUES (?, ?, ?, ?, ?, ?)", rows)
            if part is not None:
                db.execute("INSERT INTO parts VALUES ('dissect', ?, ?, ?, ?)", (*part, part[2] - part[1]))


def _plain(value) -> float | int | None:
    """A NumPy scalar as a Python number; NaN as NULL (SQLite has no NaN)."""
    if isinstance(value, (np.integer, int)):
        return int(value)
    value = float(value)
    return None if np.isnan(value) else value
