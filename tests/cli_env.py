"""The environment of the tests' subprocess runs (the CLI, the tools, several JAX processes): CPU, K fake devices,
the tests' XLA flags, and the shared compilation cache, so a second run of the same program does not compile."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _test_xla_flags() -> str:
    """The tests' programs are tiny and compiling them is most of the suite's time: LLVM's optimisation passes
    cost more than they save (-O0: test_packing + test_step 269 -> 214 s cold, 2026-11-30), and so do XLA CPU's
    newer fusion emitters (`--xla_cpu_use_fusion_emitters=false`: test_step + test_generate 214 -> 150-157 s on
    2 workers, jaxlib 0.10.2, 2026-12-07). XLA aborts on a flag it does not know, so that one is passed only to
    the jaxlib it was measured on."""
    from importlib.metadata import PackageNotFoundError, version

    flags = "--xla_backend_optimization_level=0"
    try:
        if version("jaxlib").startswith("0.10."):
            flags += " --xla_cpu_use_fusion_emitters=false"
    except PackageNotFoundError:
        pass
    return flags


TEST_XLA_FLAGS = _test_xla_flags()


def cli_env(devices: int = 1, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "JSMAUG_COMPILATION_CACHE"}  # conftest's, in-process only
    env = dict(env, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(ROOT / ".jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", **extra)
    env["XLA_FLAGS"] = f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}"
    return env
