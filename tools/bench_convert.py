"""Conversion throughput and memory: import (HF -> jsmaug) and export (jsmaug -> HF) of a synthetic multi-GB
Mixtral-shaped checkpoint, each measured in a fresh subprocess (so its peak RSS is its own).

    python tools/bench_convert.py [--layers 8] [--hidden 1024] [--intermediate 3584] [--dtype float32] [--dir D]

Prints one JSON line per figure and a table: GB/s both ways, peak RSS against the checkpoint size, the largest
tensor and one layer's stacked expert tensor. On a CPU backend the imported params themselves live in host
memory, so the figure that shows streaming is the peak RSS *above* the params (the transient overhead), which
must not grow with the number of layers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _child(mode: str, args) -> dict:
    import jax

    from jsmaug import hf
    from jsmaug.models import config as cfg_lib, decoder as model

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    d = Path(args.dir)
    if mode == "make":
        config = cfg_lib.tiny(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.intermediate,
                              num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                              num_local_experts=8, num_experts_per_tok=2, param_dtype=args.dtype)
        params = jax.jit(lambda k: model.init_params(config, k))(jax.random.key(0))
        hf.save(d / "hf", config, params, max_shard_size="1GB", overwrite=True)
        return {"bytes": sum(f.stat().st_size for f in (d / "hf").glob("*.safetensors"))}
    if mode == "import":
        t = time.time()
        config, params = hf.load(d / "hf")
        jax.block_until_ready(params)
        dt = time.time() - t
        nbytes = sum(x.nbytes for x in jax.tree.leaves(params))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        expert = params["layers"]["layer"]["block_sparse_moe"]["w1"]
        return {"seconds": dt, "bytes": nbytes, "peak_rss": peak, "base_rss": base,
                "layer_expert_bytes": expert.nbytes // config.num_hidden_layers,
                # the largest single HF tensor: the embedding / lm_head (V x D) at these shapes
                "largest_tensor_bytes": params["embed_tokens"].nbytes}
    if mode == "export":
        config, params = hf.load(d / "hf")
        jax.block_until_ready(params)
        after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        t = time.time()
        s = hf.save(d / "out", config, params, max_shard_size="1GB", overwrite=True)
        dt = time.time() - t
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"seconds": dt, "bytes": s["bytes"], "peak_rss": peak, "rss_after_load": after_load}
    raise ValueError(mode)


def _run(mode: str, args) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, __file__, "--child", mode, "--dir", args.dir, "--layers", str(args.layers),
           "--hidden", str(args.hidden), "--intermediate", str(args.intermediate), "--dtype", args.dtype]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"{mode} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=3584)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--dir", default=None)
    ap.add_argument("--child", default=None)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args)))
        return 0
    own = args.dir is None
    args.dir = args.dir or tempfile.mkdtemp(prefix="jsmaug-bench-convert-")
    try:
        made = _run("make", args)
        imp = _run("import", args)
        exp = _run("export", args)
    finally:
        if own:
            shutil.rmtree(args.dir, ignore_errors=True)
    gb = 1e9
    rows = [
        ("checkpoint size", made["bytes"] / gb, "GB"),
        ("largest single tensor (embedding)", imp["largest_tensor_bytes"] / gb, "GB"),
        ("one layer's stacked expert tensor (E x D x F)", imp["layer_expert_bytes"] / gb, "GB"),
        ("import throughput", imp["bytes"] / imp["seconds"] / gb, "GB/s"),
        ("import peak RSS", imp["peak_rss"] / gb, "GB"),
        ("import peak RSS above the imported params", (imp["peak_rss"] - imp["bytes"]) / gb, "GB"),
        ("export throughput", exp["bytes"] / exp["seconds"] / gb, "GB/s"),
        ("export peak RSS above the loaded model", (exp["peak_rss"] - exp["rss_after_load"]) / gb, "GB"),
    ]
    cfg = f"{args.layers} layers, hidden {args.hidden}, mlp {args.intermediate}, 8 experts, {args.dtype}"
    for name, v, unit in rows:
        print(json.dumps({"name": name, "value": round(v, 4), "unit": unit, "config": cfg}))
    print("\n| figure | value |\n|---|---|")
    for name, v, unit in rows:
        print(f"| {name} | {v:.3f} {unit} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
