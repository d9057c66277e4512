"""Compiled programs kept on disk whole, so a warm run skips tracing and lowering as well as compiling.

JAX's persistent compilation cache (`train.enable_compilation_cache`) skips XLA's compile, but it is keyed by
the lowered program: every process still traces the ST-MoE model in Python and lowers it to StableHLO before
it can look the program up. For a `tiny` run that is most of the first chunk (issue 12 item 4;
benchmarks/RESULTS.md "Compile time"). This cache stores the compiled executable itself
(`jax.experimental.serialize_executable`) under a key that names everything the program is a function of:

  * what the caller says the program computes (`describe`: the run configuration, the model as resolved),
  * the arguments' tree structure, shapes, dtypes, weak types and shardings (the avals a compile sees),
  * the source of the whole `precision_lab` package (any edit gives new keys),
  * the versions of python, jax, jaxlib, numpy, ml_dtypes and optax, the devices, XLA_FLAGS and jax's
    configuration (dtype promotion, x64, default matmul precision, ...).

A key that misses, or an entry that cannot be read back, falls back to jax's own path (trace, lower, compile
through the persistent cache) and writes the entry anew (atomically: concurrent processes may share the
folder), unless jax's persistent cache served that compile: XLA:CPU (jaxlib 0.10) cannot serialize again an
executable it deserialized (the copy fails at run time: "Function wrapped_slice.1 not found"), so such a
program stays on jax's path, as fast as before this cache (so after an upgrade of the package, a program
jax's cache still holds is not kept here until that entry goes: delete jax's folder to start afresh).
The cache is on only where `enable()` named a folder (every `precision-lab` command does, beside jax's
cache) and `PRECISION_LAB_PROGRAM_CACHE` is not "0"; elsewhere a `CachedProgram` is its jitted function.
Runtime monkeypatching of the package is invisible to the key: set PRECISION_LAB_PROGRAM_CACHE=0 when
doing that. Entries are pickles: the folder is trusted like jax's own cache.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

_FOLDER: Path | None = None
_PERSISTENT_HITS = [0]  # compiles jax's persistent cache has served in this process
LOADS = [0]  # executables read back from a cache folder in this process (tests, benchmarks)


def _count_persistent_hits(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        _PERSISTENT_HITS[0] += 1


jax.monitoring.register_event_listener(_count_persistent_hits)

# jax configuration values that do not change a compiled program (where caches live, logging).
_CONFIG_IGNORED = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                   "jax_persistent_cache_min_entry_size_bytes", "jax_enable_compilation_cache",
                   "jax_explain_cache_misses", "jax_log_compiles", "jax_logging_level")


def enable(folder: str | os.PathLike | None) -> None:
    """Keep compiled programs under `folder` (None: off)."""
    global _FOLDER
    _FOLDER = Path(folder) if folder is not None else None
    if _FOLDER is not None:
        _FOLDER.mkdir(parents=True, exist_ok=True)


def folder() -> Path | None:
    return None if os.environ.get("PRECISION_LAB_PROGRAM_CACHE", "1") == "0" else _FOLDER


@functools.cache
def source_digest() -> str:
    """sha256 over every source file of the package (paths and contents)."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import jaxlib
    import ml_dtypes
    import numpy
    import optax
    return {"python": sys.version, "platform": platform.platform(), "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "numpy": numpy.__version__, "ml_dtypes": ml_dtypes.__version__,
            "optax": optax.__version__}


def environment() -> str:
    """What outside the program and its arguments decides the executable."""
    config = {k: repr(v) for k, v in sorted(jax.config.values.items()) if k not in _CONFIG_IGNORED}
    devices = [(d.platform, d.device_kind, d.id, getattr(d, "process_index", 0)) for d in jax.devices()]
    return json.dumps({"versions": _versions(), "devices": devices, "xla_flags": os.environ.get("XLA_FLAGS", ""),
                       "config": config, "source": source_digest()}, sort_keys=True)


def signature(args: tuple, flat=None) -> str:
    """The arguments as a compile sees them: tree structure, and per leaf shape, dtype, weak type, sharding.
    flat: `jax.tree.flatten(args)` when the caller already has it."""
    leaves, treedef = jax.tree.flatten(args) if flat is None else flat
    parts = [str(treedef)]
    for x in leaves:
        aval = jax.typeof(x) if hasattr(jax, "typeof") else jax.core.get_aval(x)
        parts.append(f"{aval.str_short()}|weak={getattr(aval, 'weak_type', False)}|"
                     f"{getattr(x, 'sharding', None)!r}")
    return "\n".join(parts)


class CachedProgram:
    """`jitted` (a `jax.jit` function), its executables kept in the program cache per argument signature.

    `describe()` returns a string naming what the program computes beyond its arguments (for a Trainer: its
    run configuration); two programs with the same `tag`, description and arguments must be the same program.
    """

    def __init__(self, jitted: Callable, tag: str, describe: Callable[[], str]):
        self.jitted = jitted
        self.tag = tag
        self.describe = describe
        self._executables: dict[str, Any] = {}
        self.loaded_from_disk = 0  # executables this object read back from the cache (tests, benchmarks)

    def __getattr__(self, name):  # lower, trace, eval_shape...: the jitted function's own
        return getattr(self.jitted, name)

    def __call__(self, *args):
        where = folder()
        if where is None:
            return self.jitted(*args)
        flat = jax.tree.flatten(args)  # once per call: the tracer check and the signature share it
        if any(isinstance(x, jax.core.Tracer) for x in flat[0]):
            return self.jitted(*args)  # inside a transformation (eval_shape, vmap...): jax's own path
        sig = signature(args, flat)
        exe = self._executables.get(sig)
        if exe is None:
            exe = self._executables[sig] = self._load_or_compile(where, sig, args)
        return exe(*args)

    def key(self, sig: str) -> str:
        h = hashlib.sha256()
        for part in (self.tag, self.describe(), sig, environment()):
            h.update(part.encode())
            h.update(b"\0")
        return h.hexdigest()

    def _load_or_compile(self, where: Path, sig: str, args: tuple):
        from jax.experimental import serialize_executable

        path = where / f"{self.tag}-{self.key(sig)}.pkl"
        if path.exists():
            try:
                payload, in_tree, out_tree, device_ids = pickle.loads(path.read_bytes())
                by_id = {d.id: d for d in jax.devices()}
                exe = serialize_executable.deserialize_and_load(  # on the devices it was compiled for
                    payload, in_tree, out_tree, execution_devices=[by_id[i] for i in device_ids])
                self.loaded_from_disk += 1
                LOADS[0] += 1
                os.utime(path)  # recently used: evicted last
                return exe
            except Exception:  # unreadable, truncated or from an incompatible build: compile it again
                pass
        hits = _PERSISTENT_HITS[0]
        exe = self.jitted.trace(*args).lower().compile()
        if _PERSISTENT_HITS[0] != hits:  # deserialized by jax: not serializable again (module docstring)
            return exe
        try:
            device_ids = [d.id for d in exe._executable.xla_executable.local_devices()]
            blob = pickle.dumps((*serialize_executable.serialize(exe), device_ids))
        except Exception:  # an executable this backend cannot serialize: run it, keep nothing
            return exe
        fd, tmp = tempfile.mkstemp(dir=where, prefix=f".{self.tag}-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)  # atomic: a concurrent reader sees the old entry or the whole new one
        except OSError:
            Path(tmp).unlink(missing_ok=True)
        evict(where)
        return exe


def max_bytes() -> int:
    """The folder's size cap: $PRECISION_LAB_PROGRAM_CACHE_MAX_BYTES, default 2 GiB (an executable of the
    `tiny` model is 1-8 MB; a sweep writes up to three per shape group)."""
    return int(os.environ.get("PRECISION_LAB_PROGRAM_CACHE_MAX_BYTES", 2 << 30))


def evict(where: Path, limit: int | None = None) -> None:
    """Delete the least recently used entries until the folder holds at most `limit` bytes, and the
    temporary files of writers killed mid-write (older than an hour)."""
    limit = max_bytes() if limit is None else limit
    for tmp in where.glob(".*.tmp"):
        try:
            if time.time() - tmp.stat().st_mtime > 3600:
                tmp.unlink()
        except FileNotFoundError:  # its writer finished or another process removed it
            pass
    entries = []
    for p in where.glob("*.pkl"):
        try:
            st = p.stat()
        except FileNotFoundError:  # another process evicted it
            continue
        entries.append((st.st_mtime, st.st_size, p))
    total = sum(size for _, size, _ in entries)
    for _, size, p in sorted(entries, key=lambda e: e[0]):
        if total <= limit:
            break
        p.unlink(missing_ok=True)
        total -= size
