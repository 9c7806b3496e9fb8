"""Test setup: 8 fake CPU devices (sharding tests), float32 matmuls, a shared compilation cache."""

import os

# 8 fake CPU devices; LLVM at -O0: the tests' programs are tiny, and compiling them is most of a cold run's time
# (-O0 took a cold run of test_packing + test_step from 269 s to 214 s on a 2-core CPU, 2026-11-30).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# One cache folder per pytest-xdist worker: jax writes a cache entry in place, so a worker reading an entry the other
# is still writing aborted the process (a landing check, 2026-12-06, in test_lora).
jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(__file__), "..", ".jax_cache",
                                                            os.environ.get("PYTEST_XDIST_WORKER", "main")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.slow` tests (real weights, long runs) run only with JSMAUG_SLOW=1; CI runs the rest."""
    if os.environ.get("JSMAUG_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set JSMAUG_SLOW=1 to run (real weights or a long run)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
