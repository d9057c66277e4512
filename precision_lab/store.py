"""An embedded results store: one JSON file per finished run, readable without a server.

Layout of a store directory DIR (by default a sweep's `--out` directory):

    DIR/sweep.json                                  the expanded sweep spec (manifest)
    DIR/runs/<run_id>.json                          one record per finished run
    DIR/runs/<run_id>.metrics-<digest>.npz          its per-step metrics (optional)

Why files and not a database: a sweep is many independent processes (shards, resumed runs) on one
filesystem, and readers are notebooks. One file per run needs no locking and no server, and every write
is atomic: write a temporary file in the same directory, fsync it, then rename it into place. A SIGKILL
at any moment therefore leaves either the whole record or nothing (at worst a dot-prefixed `*.tmp` file,
which readers ignore).

Writers never collide: run ids are unique and deterministic (see `precision_lab.sweep`), a record is
linked into place only if no record of that id exists (os.link fails atomically otherwise), storing the
same id again with identical content is a no-op, and with different content raises `RecordConflict`
unless `overwrite=True`.

Per-step metrics can be large, so they live in a separate `.npz` file (plain numpy, no pickles), written
BEFORE the record; the record names it (`metrics_file`) and carries its content hash (`metrics_sha256`).
The metrics file name contains that hash, so a record always points at exactly the metrics it was stored
with, even when a crash interrupts an overwrite or two writers race on one id: a crash can only leave an
unreferenced metrics file behind, never a record with the wrong metrics.

NaN and infinities: JSON has no NaN, so every non-finite float in a record is stored as one of the
strings "NaN", "Infinity", "-Infinity" (the spellings Python's and JavaScript's JSON dialects use, which
duckdb and pandas can cast to a double). `get`, `records`, `to_rows` and `load_results` turn them back
into floats; those three strings are therefore reserved and a record may not contain them as text.
numpy scalars become Python numbers and numpy arrays become (nested) lists.

Reading a store:

    from precision_lab.store import ResultsStore, load_results
    import pandas as pd
    df = pd.DataFrame(load_results("runs/z_loss"))        # one row per run, nested keys as "a.b.c"
    store = ResultsStore("runs/z_loss")
    loss = store.metrics(df.run_id[0])["loss"]             # per-step arrays, dict of np.ndarray

    -- duckdb, straight from the files (non-finite values come back as the strings above):
    SELECT run_id, config.train.z_loss, TRY_CAST(final_loss AS DOUBLE) AS final_loss
    FROM read_json_auto('runs/z_loss/runs/*.json');

    # plain Python: every record is a JSON object
    import json, glob
    rows = [json.load(open(p)) for p in sorted(glob.glob("runs/z_loss/runs/*.json"))]
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import io
import json
import math
import os
import re
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from precision_lab.errors import UserError

# The strings that stand for non-finite floats in stored JSON (see the module docstring).
NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}

# Keys the store adds to every record; a caller's record may not use them for anything else.
STORE_KEYS = ("run_id", "metrics_file", "metrics_sha256")

# Run ids become file names, so keep them to a portable alphabet and never start them with a dot
# (dot-prefixed names are the store's temporary files).
_RUN_ID = re.compile(r"[A-Za-z0-9_=+,-][A-Za-z0-9._=+,-]{0,199}")


class RecordConflict(UserError):
    """A run id is already stored with different content (and `overwrite` was not asked for)."""


# -- JSON-safe encoding -----------------------------------------------------------------------------------


def to_jsonable(value: Any, where: str = "record") -> Any:
    """Convert `value` to plain JSON types: numpy scalars/arrays to numbers/lists, non-finite floats to
    the strings "NaN"/"Infinity"/"-Infinity". `where` names the value in error messages."""
    if value is None or isinstance(value, (bool, np.bool_)):
        return None if value is None else bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        x = float(value)
        if math.isnan(x):
            return "NaN"
        if math.isinf(x):
            return "Infinity" if x > 0 else "-Infinity"
        return x
    if isinstance(value, str):
        if value in NONFINITE:
            # A literal "NaN" string would come back as a float: refuse rather than change it silently.
            raise ValueError(f"{where}: the string {value!r} is reserved for non-finite floats in the store")
        return value
    if isinstance(value, np.ndarray) or (hasattr(value, "__array__") and hasattr(value, "dtype")):
        arr = np.asarray(value)
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"{where}: cannot store an array of dtype {arr.dtype} (use bool, int or float)")
        return to_jsonable(arr.tolist(), where)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: key {k!r} is not a string (JSON objects have string keys)")
            out[k] = to_jsonable(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"{where}: cannot store a value of type {type(value).__name__} as JSON")


def from_jsonable(value: Any) -> Any:
    """Inverse of `to_jsonable` for what JSON can carry: restore the non-finite float strings."""
    if isinstance(value, str):
        return NONFINITE.get(value, value)
    if isinstance(value, dict):
        return {k: from_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_jsonable(v) for v in value]
    return value


def canonical_json(value: Any) -> str:
    """Compact, key-sorted JSON of a JSON-safe value: equal values give equal strings (used for hashing)."""
    encoded = to_jsonable(value)
    return json.dumps(encoded, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts into one level with dotted keys ({"a": {"b": 1}} -> {"a.b": 1}); lists stay."""
    out: dict[str, Any] = {}
    for k, v in record.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


# -- atomic file writes -----------------------------------------------------------------------------------


def _temp_path(final: Path) -> Path:
    # Same directory as the target (rename is atomic only within one filesystem), a name no reader
    # globs for (dot prefix, .tmp suffix), and unique across processes and threads.
    return final.with_name(f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _fsync_dir(directory: Path) -> None:
    # Make the rename itself durable; not every platform can open a directory, which is fine.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_temp(final: Path, data: bytes) -> Path:
    tmp = _temp_path(final)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def atomic_write(final: Path, data: bytes) -> None:
    """Write `data` to `final` so that readers see the old file or the new one, never a partial one."""
    tmp = _write_temp(final, data)
    try:
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(final.parent)


def _link_new(final: Path, data: bytes) -> bool:
    """Create `final` with `data` atomically, only if it does not exist; False if it already existed."""
    tmp = _write_temp(final, data)
    try:
        try:
            # link() never replaces an existing file: of two racing writers exactly one wins.
            os.link(tmp, final)
        except FileExistsError:
            return False
        except OSError:
            # Filesystems without hard links: fall back to a check-then-rename (a narrow race window).
            if final.exists():
                return False
            os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    _fsync_dir(final.parent)
    return True


# -- metrics files ----------------------------------------------------------------------------------------


def _metric_arrays(metrics: Mapping[str, Any]) -> dict[str, np.ndarray]:
    arrays = {}
    for name in sorted(metrics):
        if not isinstance(name, str) or not name:
            raise TypeError(f"metrics: name {name!r} must be a non-empty string")
        arr = np.asarray(metrics[name])
        # Only plain numpy dtypes, so any numpy can read the file (bfloat16 etc.: cast to float32 first).
        if arr.dtype.kind not in "biufc":
            raise TypeError(f"metrics[{name!r}]: cannot store dtype {arr.dtype} (use bool, int or float)")
        arrays[name] = np.ascontiguousarray(arr)
    return arrays


def metrics_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """sha256 of the arrays' names, dtypes, shapes and bytes (an .npz file's bytes carry timestamps)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    return h.hexdigest()


# -- the store --------------------------------------------------------------------------------------------


class ResultsStore:
    """A directory of run records (see the module docstring). Safe for many concurrent processes."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.runs_dir = self.path / "runs"
        self.manifest_path = self.path / "sweep.json"

    def __repr__(self) -> str:
        return f"ResultsStore({str(self.path)!r})"

    # -- paths --------------------------------------------------------------------------------------------
    def _record_path(self, run_id: str) -> Path:
        if not isinstance(run_id, str) or not _RUN_ID.fullmatch(run_id):
            raise UserError(
                f"{self.runs_dir}: run_id {run_id!r} is not a valid id; "
                "valid: 1-200 characters of A-Z a-z 0-9 . _ = + , - not starting with a dot"
            )
        return self.runs_dir / f"{run_id}.json"

    # -- writing ------------------------------------------------------------------------------------------
    def put(
        self,
        run_id: str,
        record: Mapping[str, Any],
        metrics: Mapping[str, Any] | None = None,
        *,
        overwrite: bool = False,
    ) -> bool:
        """Store one finished run atomically: its metrics file first, then its record.

        Returns True if written, False if an identical record was already stored (a no-op). Raises
        `RecordConflict` if a different record of that id exists and `overwrite` is False.
        """
        final = self._record_path(run_id)
        clash = sorted(k for k in STORE_KEYS if k in record and not (k == "run_id" and record[k] == run_id))
        if clash:
            raise ValueError(f"run {run_id}: record keys {clash} are reserved for the store")
        doc = to_jsonable({k: v for k, v in record.items() if k != "run_id"}, f"run {run_id} record")
        doc["run_id"] = run_id

        arrays = None
        if metrics is not None:
            arrays = _metric_arrays(metrics)
            digest = metrics_digest(arrays)
            doc["metrics_file"] = f"{run_id}.metrics-{digest[:16]}.npz"
            doc["metrics_sha256"] = digest
        data = (json.dumps(doc, sort_keys=True, indent=1, allow_nan=False) + "\n").encode()

        old = self._read(final)
        if old is not None and not overwrite:
            if old == doc:
                return False
            raise self._conflict(run_id, final)

        self.runs_dir.mkdir(parents=True, exist_ok=True)
        if arrays is not None:
            self._write_metrics(self.runs_dir / doc["metrics_file"], arrays)

        if overwrite:
            atomic_write(final, data)
            # The old metrics file is unreferenced now (a different digest gives a different name).
            if old is not None and old.get("metrics_file") not in (None, doc.get("metrics_file")):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.runs_dir / old["metrics_file"])
            return True

        if _link_new(final, data):
            return True
        # Another process stored this id between our check and our link.
        winner = self._read(final)
        if winner == doc:
            return False
        if arrays is not None and winner.get("metrics_file") != doc["metrics_file"]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.runs_dir / doc["metrics_file"])
        raise self._conflict(run_id, final)

    def _conflict(self, run_id: str, final: Path) -> RecordConflict:
        return RecordConflict(
            f"{final}: run_id {run_id!r} is already stored with different content; "
            "valid choices: overwrite=True (replace it) or a fresh store directory"
        )

    def _write_metrics(self, final: Path, arrays: Mapping[str, np.ndarray]) -> None:
        if final.exists():
            return  # the name is the content hash: the same arrays are already there
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        atomic_write(final, buf.getvalue())

    def write_manifest(self, manifest: Mapping[str, Any]) -> bool:
        """Write (or update) DIR/sweep.json atomically; False if it already holds exactly this content."""
        doc = to_jsonable(manifest, "sweep manifest")
        if self._read(self.manifest_path) == doc:
            return False
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.manifest_path, (json.dumps(doc, indent=1, allow_nan=False) + "\n").encode())
        return True

    # -- reading ------------------------------------------------------------------------------------------
    @staticmethod
    def _read(path: Path) -> dict | None:
        """The raw (still encoded) JSON document at `path`, or None if there is none."""
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def manifest(self) -> dict | None:
        """The sweep manifest (DIR/sweep.json), or None if none was written."""
        doc = self._read(self.manifest_path)
        return None if doc is None else from_jsonable(doc)

    def has(self, run_id: str) -> bool:
        return self._record_path(run_id).exists()

    def ids(self) -> list[str]:
        """All stored run ids, sorted."""
        if not self.runs_dir.is_dir():
            return []
        names = (p.name for p in self.runs_dir.glob("*.json"))
        return sorted(name[: -len(".json")] for name in names if not name.startswith("."))

    def __iter__(self) -> Iterator[str]:
        return iter(self.ids())

    def __len__(self) -> int:
        return len(self.ids())

    def __contains__(self, run_id: object) -> bool:
        return isinstance(run_id, str) and self.has(run_id)

    def get(self, run_id: str) -> dict:
        """The stored record of `run_id` (non-finite floats restored). UserError if there is none."""
        path = self._record_path(run_id)
        doc = self._read(path)
        if doc is None:
            ids = self.ids()
            close = difflib.get_close_matches(run_id, ids, n=1, cutoff=0.5)
            hint = f"; closest match: {close[0]!r}" if close else ""
            raise UserError(f"{path}: run_id {run_id!r} is not in the store ({len(ids)} runs stored{hint})")
        return from_jsonable(doc)

    def records(self) -> list[dict]:
        """Every stored record, sorted by run id."""
        return [self.get(run_id) for run_id in self.ids()]

    def metrics(self, run_id: str) -> dict[str, np.ndarray]:
        """The per-step metrics of `run_id` ({} if it stored none), checked against the record's hash."""
        record = self.get(run_id)
        name = record.get("metrics_file")
        if name is None:
            return {}
        path = self.runs_dir / name
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        if metrics_digest(arrays) != record.get("metrics_sha256"):
            raise UserError(f"{path}: metrics do not match the sha256 in {run_id}.json (file corrupted?)")
        return dict(sorted(arrays.items()))

    def to_rows(self) -> list[dict]:
        """One flat dict per run (nested keys joined with dots), ready for `pandas.DataFrame(rows)`."""
        return [flatten(r) for r in self.records()]


def load_results(path: str | os.PathLike) -> list[dict]:
    """The rows of the store at `path` (see `ResultsStore.to_rows`): `pd.DataFrame(load_results(dir))`."""
    store = ResultsStore(path)
    if not store.path.is_dir():
        raise UserError(f"{store.path}: results store directory does not exist (expected DIR/runs/*.json)")
    if not store.runs_dir.is_dir() and not store.manifest_path.exists():
        raise UserError(f"{store.path}: not a results store (no sweep.json and no runs/ here); give the --out "
                        "folder of `precision-lab sweep`")
    return store.to_rows()
