"""Where a train step's time goes, by ablation: each part of the step timed alone, same model and batch.

    python tools/profile_step.py [--chunk 64]

Parts: the decoder layers' forward and backward (no vocabulary), their forward alone, the unembedding +
log-softmax forward and backward over every position, the same over completion positions only (the
trainer's `train.logps_chunk_size`), and the AdamW update. The model is bench.py's 29.8M-parameter step model
with its batch (4 pairs x 256 tokens, the second half of each row is the completion).
"""

from __future__ import annotations

import argparse
import sys

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jsmaug.models import (
    decoder as model,
    logps as logps_lib,  # noqa: E402
)
from jsmaug.perf import bench


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunk", type=int, default=64)
    args = ap.parse_args(argv)
    conf = bench.step_model_config()
    b = bench.synthetic_batch(np.random.default_rng(0), 4, 256, conf.vocab_size)
    params = model.init_params(conf, jax.random.key(0))
    h = jnp.asarray(np.random.default_rng(1).normal(size=(8, 256, conf.hidden_size)).astype(np.float32))

    def layers(p):
        x, aux, _ = model.forward_hidden(conf, p, b["input_ids"], segment_ids=b["segment_ids"],
                                         positions=b["positions"])
        return jnp.sum(x * x) + aux

    def logps(p, x, chunk):
        lp = logps_lib.sequence_logps_from_hidden(x, lambda y: model.unembed(conf, p, y), b["labels"],
                                                  b["loss_mask"], chunk_size=chunk).logps
        return jnp.sum(lp)

    opt = optax.adamw(1e-4)
    parts = {
        "layers fwd+bwd (no vocabulary)": (jax.jit(jax.grad(layers)), (params,)),
        "layers fwd": (jax.jit(layers), (params,)),
        "unembed + log-softmax fwd+bwd, every position": (
            jax.jit(jax.grad(lambda p, x: logps(p, x, None), argnums=(0, 1))), (params, h)),
        f"unembed + log-softmax fwd+bwd, completion only (chunk {args.chunk})": (
            jax.jit(jax.grad(lambda p, x: logps(p, x, args.chunk), argnums=(0, 1))), (params, h)),
        "AdamW update": (jax.jit(lambda g, s, p: opt.update(g, s, p)), (params, opt.init(params), params)),
    }
    print(f"# {bench.machine()}, {conf.num_params() / 1e6:.1f}M params, batch 8 x 256, "
          f"{int(np.sum(b['loss_mask']))} completion positions of {b['loss_mask'].size}")
    for name, (fn, fargs) in parts.items():
        print(f"{name:<60} {bench.timeit(fn, *fargs, reps=3, min_time=0.1):7.3f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
