"""Test setup: 8 fake CPU devices (sharding tests), float32 matmuls, a shared compilation cache."""

import os

# 8 fake CPU devices; LLVM at -O0: the tests' programs are tiny, and compiling them is most of a cold run's time
# (-O0 took a cold run of test_packing + test_step from 269 s to 214 s on a 2-core CPU, 2026-11-30).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(__file__), "..", ".jax_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
