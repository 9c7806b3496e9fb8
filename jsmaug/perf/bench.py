"""What the benchmarks share (`tools/bench.py`, `tools/bench_accel.py`, `tools/profile_step.py`): the timers, the result records and their table, the synthetic step batch, a
compiled train step to time, and the PyTorch DPOP step they are compared with.

`tools/bench.py` (CPU figures) and `tools/bench_accel.py` (GPU/TPU figures) both import it; it imports neither.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import time
from pathlib import Path

import jax
import numpy as np

from jsmaug.models import families
from jsmaug.data.batches import DataConfig
from jsmaug.models import config as cfg_lib, decoder as model
from jsmaug.parallel.sharding import MeshConfig
from jsmaug.train import plan as plan_lib, step
from jsmaug.train.config import LossSection, ReferenceSection, RunConfig, TrainSection

RESULTS: list[dict] = []
NOMINAL_BF16_PEAK = {"gpu": {"H100": 989e12, "H200": 989e12, "A100": 312e12}, "tpu": {}}


def machine() -> str:
    dev = jax.devices()[0]
    return f"{platform.node() or 'host'} {dev.platform}:{dev.device_kind} x{jax.device_count()} ({os.cpu_count()} cpus)"


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def timeit(fn, *args, reps: int = 5, min_time: float = 0.5) -> float:
    """Median seconds per call after a compile + warm-up call."""
    jax.block_until_ready(fn(*args))
    times = []
    t_end = time.time() + min_time
    while len(times) < reps or time.time() < t_end:
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
        if len(times) >= 50:
            break
    return float(np.median(times))


def time_alternating(fns, rounds: int, block: int = 1) -> dict[str, float]:
    """Median seconds per call of each zero-argument, blocking function (compiled already), the functions
    called in turn (A B C A B C ...), so a drift in the machine's speed hits every contender alike.

    With `block` > 1 each turn is `block` consecutive calls of one function, and only the calls after the first
    are timed (A A A B B B ...: rounds * (block - 1) timed calls each): a contender's steady state, as a
    training loop runs its steps back to back. Called one after the other, each framework's first call pays for
    the other's worker threads still spinning and for caches the other filled (on the 2-core CPU machine,
    PyTorch right after jsmaug and the reverse: docs/performance.md)."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            for i in range(block):
                t = time.perf_counter()
                fn()
                if block == 1 or i > 0:
                    times[name].append(time.perf_counter() - t)
    return {name: float(np.median(ts)) for name, ts in times.items()}


def time_blocks(fns, blocks: int, calls: int) -> dict[str, list[float]]:
    """Seconds per call of each zero-argument, blocking function, one figure per block: `blocks` rounds, each
    running every function for `calls` consecutive calls in turn (A A A B B B, then A A A B B B ...), the first
    call of each block untimed (it pays for the other contender's threads and caches), the block's figure the
    median of the rest. The goal rows report the median block with the spread of the blocks (`record_blocks`):
    one median over every call hides how much the machine's speed moved during the run."""
    out = {name: [] for name in fns}
    for _ in range(blocks):
        t = time_alternating(fns, rounds=1, block=calls)
        for name in fns:
            out[name].append(t[name])
    return out


def record_blocks(name, a_blocks, b_blocks, unit, config, a_label, b_label):
    """A goal row: a and b the medians of their per-block figures, the ratio the median of the per-block ratios
    (a block of a beside the block of b next to it), with its spread over the blocks (ratio_min..ratio_max)."""
    ratios = [a / b for a, b in zip(a_blocks, b_blocks)]
    return record(name, float(np.median(a_blocks)), float(np.median(b_blocks)), unit,
                  config + f"; median of {len(ratios)} alternating blocks", a_label, b_label,
                  ratio=float(np.median(ratios)), spread=(min(ratios), max(ratios)),
                  blocks=(a_blocks, b_blocks))


def record_against_torch(name, jax_step, torch_step, tokens: int, config: str, torch_label: str, rounds: int,
                         blocks: int = 5):
    """The `torch/*` rows: `name`, the goal's row, in `blocks` alternating blocks of 4 back-to-back steps each
    (3 timed: a training loop's steady state), reported as the median block with the blocks' spread; and
    `name`_interleaved, the steps strictly in turn (`rounds`), in tokens/s. Returns jsmaug's seconds per step in
    each block of the first."""
    t = time_blocks({"jax": jax_step, "torch": torch_step}, blocks, calls=4)
    record_blocks(name, [tokens / x for x in t["jax"]], [tokens / x for x in t["torch"]], "tokens/s", config,
                  "jsmaug jitted DPOP step", torch_label)
    ti = time_alternating({"jax": jax_step, "torch": torch_step}, rounds)
    record(f"{name}_interleaved", tokens / ti["jax"], tokens / ti["torch"], "tokens/s", config,
           "jsmaug jitted DPOP step", torch_label)
    return t["jax"]


def record(name, a, b, unit, config, a_label, b_label, ratio=None, spread=None, blocks=None):
    """One comparison: a against b (ratio a / b unless given), with the spread of the ratio over blocks if any
    and each block's figures (`a_blocks`, `b_blocks`: which side moved when the ratio swings)."""
    rec = {"name": name, "a": a, "b": b, "ratio": (a / b if b else float("nan")) if ratio is None else ratio,
           "unit": unit, "a_is": a_label, "b_is": b_label, "machine": machine(), "config": config,
           "peak_rss_gb": round(rss_gb(), 2)}
    if spread is not None:
        rec["ratio_min"], rec["ratio_max"] = float(spread[0]), float(spread[1])
    if blocks is not None:
        rec["a_blocks"], rec["b_blocks"] = ([round(float(x), 6) for x in side] for side in blocks)
    RESULTS.append(rec)
    print(json.dumps(rec), flush=True)
    return rec


def print_table(json_out: str | None) -> None:
    print("\n| comparison | a | b | a/b | spread of a/b over blocks | unit |\n|---|---|---|---|---|---|")
    for r in RESULTS:
        spread = f"{r['ratio_min']:.3f}..{r['ratio_max']:.3f}" if "ratio_min" in r else ""
        print(f"| {r['name']} ({r['a_is']} vs {r['b_is']}) | {r['a']:.4g} | {r['b']:.4g} | {r['ratio']:.3f} | "
              f"{spread} | {r['unit']} |")
    print(f"\npeak RSS {rss_gb():.2f} GB")
    if json_out:
        Path(json_out).write_text("".join(json.dumps(r) + "\n" for r in RESULTS))


# ------------------------------------------------------------------------------------------------ a step to time

def synthetic_batch(rng, pairs, length, vocab):
    """Random ids, every row full, the second half of each row the completion."""
    ids = rng.integers(3, vocab, (2 * pairs, length)).astype(np.int32)
    seg = np.ones_like(ids)
    pos = np.broadcast_to(np.arange(length, dtype=np.int32), ids.shape).copy()
    labels = np.roll(ids, -1, axis=1)
    loss_mask = np.zeros_like(ids)
    loss_mask[:, length // 2:-1] = 1  # second half is the completion
    return {"input_ids": ids, "segment_ids": seg, "positions": pos, "labels": labels, "loss_mask": loss_mask}


CHUNK = 64  # the trainer's default train.logps_chunk_size


def step_model_config(quick: bool = False):
    """The model of the step and PyTorch comparisons (29.8M parameters; tiny shapes with `quick`)."""
    return cfg_lib.tiny(vocab_size=512 if quick else 32000, hidden_size=64 if quick else 256,
                        intermediate_size=128 if quick else 512, num_hidden_layers=2 if quick else 4,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=1024, moe_block_size=64 if quick else 256)


def step_run_config(config, loss_type: str, length: int, chunk: int = CHUNK, precomputed: bool = False) -> RunConfig:
    """The run the benches time: `config` on one device, AdamW at a constant rate, the loss with beta 0.3; with
    `precomputed` the reference's log-probs come with the batch (`reference.mode: precomputed`)."""
    return RunConfig(model=config, loss=LossSection(type=loss_type, beta=0.3),
                     reference=ReferenceSection(mode="precomputed" if precomputed else "online"),
                     train=TrainSection(steps=100, learning_rate=1e-4, schedule="constant", logps_chunk_size=chunk),
                     data=DataConfig(train_path="-", max_length=length, max_prompt_length=length // 2),
                     mesh=MeshConfig(data=1))


def paired(batch: dict) -> dict:
    """[chosen rows; rejected rows] (2P, L) -> the step's paired layout (2, P, L)."""
    return {k: v.reshape(2, -1, *v.shape[1:]) for k, v in batch.items()}


class StepRunner:
    """The planned train step (`jsmaug.train.plan`, what a run compiles) and its state; each call runs one step
    and waits for it (see time_alternating)."""

    def __init__(self, config, loss_type, batch, ref, chunk=CHUNK, params=None):
        length = batch["input_ids"].shape[-1]
        self.plan = plan_lib.plan(step_run_config(config, loss_type, length, chunk, precomputed="ref_logps" in batch),
                                  jax.devices()[:1], config=config)
        self.fn = self.plan.step
        params = model.init_params(config, jax.random.key(0)) if params is None else params
        # On the plan's shardings, as training places them (unplaced arrays made the second call compile again).
        params = jax.device_put(params, self.plan.param_sh)
        self.state = step.init_state(self.plan.optimizer, params, self.plan.state_sh, seed=0)
        # paired() adds the leading axis of 2: (2, P, L) rows, (2, P) precomputed reference log-probs
        self.batch = jax.device_put(paired(batch), {k: self.plan.batch_sharding(np.ndim(v) + 1)
                                                    for k, v in batch.items()})
        self.ref = None if self.plan.reference is None else jax.device_put(ref, self.plan.ref_sh)
        self()  # compile + warm-up

    def __call__(self):
        self.state, m = self.fn(self.state, self.batch, self.ref, False)
        jax.block_until_ready(m)

    def compiled_bytes(self) -> int:
        """Arguments + temporaries + outputs of the compiled step (outputs aliased to donated inputs once)."""
        m = self.fn.lower(self.state, self.batch, self.ref, False).compile().memory_analysis()
        return (m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes
                - getattr(m, "alias_size_in_bytes", 0))


# ------------------------------------------------------------------------------------------------ PyTorch

def torch_dpop_step(config, batch, pairs, device="cpu", bf16=False):
    """HF transformers' class of the config's family (MixtralForCausalLM, LlamaForCausalLM, ...) + the same DPOP
    loss in PyTorch (one forward over [chosen; rejected], a frozen reference, AdamW, clipping): a zero-argument
    function that runs one step and waits for it. With `bf16`: autocast to bf16, a bf16 reference and fused AdamW
    (the accelerator setting of tools/bench_accel.py).

    On CPU, PyTorch flushes denormals to zero here (`torch.set_flush_denormal(True)`), as XLA's CPU backend always
    does: the bench trains on one batch again and again, and without it PyTorch's step slowed from 11 to 51 s over 8
    steps on Gemma 3 270M's shapes (denormal arithmetic; 11.0-12.8 s steady with it, docs/performance.md), which
    made every earlier jsmaug / PyTorch ratio of a long run flatter jsmaug."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if device == "cpu":
        torch.set_flush_denormal(True)

    hf = families.to_hf_dict(config)
    hf_cfg = AutoConfig.for_model(hf["model_type"], **{k: v for k, v in hf.items()
                                                       if k not in ("architectures", "model_type", "torch_dtype")})
    hf_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(hf_cfg).to(device).train()
    ref = AutoModelForCausalLM.from_config(hf_cfg).to(device, dtype=torch.bfloat16 if bf16 else torch.float32).eval()
    moe = config.is_moe
    ref.load_state_dict(policy.state_dict())
    for p in ref.parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-4, fused=bf16 and device == "cuda")
    ids = torch.as_tensor(batch["input_ids"], dtype=torch.long, device=device)
    labels = torch.as_tensor(batch["labels"], dtype=torch.long, device=device)
    mask = torch.as_tensor(batch["loss_mask"], dtype=torch.float32, device=device)

    def logps(m, with_aux):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            out = m(ids, output_router_logits=with_aux) if moe else m(ids)
        lp = torch.log_softmax(out.logits.float(), -1).gather(-1, labels[..., None])[..., 0]
        return (lp * mask).sum(-1), (out.aux_loss if with_aux and moe else 0.0)

    def one_step():
        pl, aux = logps(policy, True)
        with torch.no_grad():
            rl, _ = logps(ref, False)
        pc, pr, rc, rr = pl[:pairs], pl[pairs:], rl[:pairs], rl[pairs:]
        delta = (pc - rc) - (pr - rr)
        loss = -torch.nn.functional.logsigmoid(0.3 * (delta - 50.0 * torch.clamp(rc - pc, min=0))).mean()
        loss = loss + config.router_aux_loss_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return one_step
