"""Make silent numeric bugs loud: strict dtype promotion and rank promotion raise in every test."""

import os
import tempfile

# Several tests need more than one CPU device (expert parallelism); this must happen before jax starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import pytest  # noqa: E402
try:  # a machine with jax but without the test extras (benchmarks/device_check.sh on a GPU) skips the
    from hypothesis import settings  # noqa: E402  hypothesis-based files, not the whole suite
except ImportError:
    settings = None

# Compiled programs are reused across tests (and across the subprocesses the CLI tests start) through
# jax's persistent compilation cache: many tests train the same micro model.
_CACHE = os.environ.setdefault("PRECISION_LAB_CACHE", os.path.join(tempfile.gettempdir(), "precision_lab_test_cache"))
jax.config.update("jax_compilation_cache_dir", _CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")

if settings is not None:
    settings.register_profile("default", deadline=None, print_blob=True)
    settings.register_profile("ci", deadline=None, print_blob=True, derandomize=True)
    settings.load_profile("ci" if os.environ.get("CI") else "default")


@pytest.fixture
def rng():
    import numpy as np

    return np.random.default_rng(0)
