"""The environment of the tests' subprocess runs (the CLI, the tools, several JAX processes): CPU, K fake devices,
the tests' XLA flags, and the shared compilation cache, so a second run of the same program does not compile."""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The tests' programs are tiny: LLVM's optimisation passes cost more than they save (tests/conftest.py).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def cli_env(devices: int = 1, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "JSMAUG_COMPILATION_CACHE"}  # conftest's, in-process only
    env = dict(env, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(ROOT / ".jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5", **extra)
    env["XLA_FLAGS"] = f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}"
    return env
