"""Test setup: 8 fake CPU devices (sharding tests), float32 matmuls, no persistent compilation cache in-process."""

import os

from cli_env import TEST_XLA_FLAGS  # tests/cli_env.py: why these flags

# 8 fake CPU devices, and the flags that make the tests' tiny programs compile faster.
os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
# No persistent compilation cache inside the test processes. A pytest process loads thousands of executables, and
# reading one back from the cache aborted the process ("Fatal Python error: Aborted" in XLA's
# `deserialize_executable`, tests/test_lora.py line 75) twice in CI and once here. The reads were always after many
# other test files had run in the same process; with one folder per worker, or with test_lora alone on a warm
# cache, it did not happen. In-process, jit's own caches already reuse programs. Subprocess runs (tests/cli_env.py)
# are short-lived and keep the shared cache.
jax.config.update("jax_enable_compilation_cache", False)
os.environ["JSMAUG_COMPILATION_CACHE"] = "off"  # in-process training runs too (jsmaug/train/programs.py)


import gc  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402

# Every compiled program stays alive in jax's caches for the whole worker process (module-level functions such as
# `model.forward` hold their executables), and each takes about 6 memory mappings (measured: 300 small programs,
# 437 -> 2,303 maps; freed with the programs). A 2-core CI worker compiles thousands: near Linux's default
# vm.max_map_count (65,530), an mmap in XLA fails and the process dies, late in the run. That is the likely cause
# of the crashes at tests/test_lora.py line 75: "Aborted" in `deserialize_executable` (stop 46) and a segmentation
# fault in `backend_compile_and_load` (a fresh-clone check of stop 49). So after a test file whose process holds
# more than MAPS_CLEAR mappings, jax's caches are cleared (programs shared between files recompile once).
MAPS_CLEAR = int(os.environ.get("JSMAUG_TEST_MAPS_CLEAR", "25000"))


def memory_maps() -> int:
    try:
        with open("/proc/self/maps") as fh:
            return sum(1 for _ in fh)
    except OSError:  # not Linux
        return 0


@pytest.fixture(autouse=True, scope="module")
def _bounded_compiled_programs(request):
    yield
    n = memory_maps()
    if n > MAPS_CLEAR:
        jax.clear_caches()
        gc.collect()
        warnings.warn(f"conftest: {n} memory maps after {request.node.name}; cleared jax's caches -> "
                      f"{memory_maps()}", stacklevel=1)


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.slow` tests (real weights, long runs) run only with JSMAUG_SLOW=1; CI runs the rest."""
    if os.environ.get("JSMAUG_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: set JSMAUG_SLOW=1 to run (real weights or a long run)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
