"""Greedy, batched generation until lm-eval's stop sequences, as lm-eval's HF model runs `generate_until`.

For every context (lm-eval 0.4.13, `HFLM.generate_until` and `tok_batch_encode`):
  - ids: the text tokenised as transformers' `tokenizer(text)` (BOS as the tokenizer adds it), or with no special
    tokens added when the text already starts with the BOS string (a chat template that writes it);
  - left-truncated to its last `max_length - max_new_tokens` tokens, `max_length` the model's
    `max_position_embeddings` (lm-eval reads it from config.json);
  - greedy decoding with the KV cache (`jsmaug.models.generate`), up to `max_new_tokens` (lm-eval's
    `max_gen_toks`, 256 by default), ending at the tokenizer's EOS;
  - the new tokens decoded with special tokens skipped, and the text cut before the first stop sequence
    (`until` plus the EOS string, as `handle_stop_sequences` adds it).
When `generate` takes `stop_check`, a row stops as soon as its text holds a stop sequence; the text before it is
the same as that of a run to `max_new_tokens`.
"""

from __future__ import annotations

import inspect
import time
from typing import Callable, Sequence

from jsmaug.data.tokenizer import Tokenizer
from jsmaug.models import generate as gen
from jsmaug.models.config import ModelConfig

LM_EVAL_MAX_GEN_TOKS = 256
LM_EVAL_DEFAULT_MAX_LENGTH = 2048


def encode_context(tok: Tokenizer, text: str) -> list[int]:
    """lm-eval's context ids: no special tokens added when the text starts with the BOS string."""
    if tok.bos_token and text.startswith(tok.bos_token):
        return tok.encode(text)
    return tok.encode_with_special_tokens(text)


def decode_generated(tok: Tokenizer, ids: Sequence[int]) -> str:
    """transformers' `decode(ids, skip_special_tokens=True)`, as lm-eval decodes a generation."""
    if tok.kind == "tokenizers":
        return tok.backend.tk.decode([int(i) for i in ids], skip_special_tokens=True)
    return tok.decode(ids)  # SentencePiece drops its control tokens (<s>, </s>) itself


def cut_at_stops(text: str, until: Sequence[str]) -> str:
    """lm-eval's `postprocess_generated_text`: the text before the first occurrence of any stop sequence."""
    for term in until:
        if term:
            text = text.split(term)[0]
    return text


def stop_sequences(tok: Tokenizer, task_until: Sequence[str]) -> list[str]:
    """The task's `until` plus the tokenizer's EOS string (lm-eval's `handle_stop_sequences`)."""
    until = list(task_until)
    if tok.eos_token is not None and tok.eos_token not in until:
        until.append(tok.eos_token)
    return until


def context_budget(config: ModelConfig, max_new_tokens: int) -> int:
    max_length = config.max_position_embeddings or LM_EVAL_DEFAULT_MAX_LENGTH
    budget = max_length - max_new_tokens
    if budget <= 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be less than the model's maximum sequence length "
                         f"({max_length})")
    return budget


def generate_until(config: ModelConfig, params, tok: Tokenizer, contexts: Sequence[str], until: Sequence[str], *,
                   max_new_tokens: int = LM_EVAL_MAX_GEN_TOKS, batch_size: int = 8, pad_multiple: int = 32,
                   on_batch: Callable[[list[int], list[str]], None] | None = None) -> list[str]:
    """The completion of every context (module docstring). `on_batch(indices, texts)` is called after each
    batch with the finished rows' indices and completions (for a progress line)."""
    budget = context_budget(config, max_new_tokens)
    ids = [encode_context(tok, c)[-budget:] for c in contexts]
    for i, x in enumerate(ids):
        if not x:
            raise ValueError(f"context {i} has no tokens")
    sampling = gen.SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.0, eos_id=tok.eos_id)
    has_stop_check = "stop_check" in inspect.signature(gen.generate).parameters
    # Longest first, as lm-eval orders its requests: similar lengths share a batch (less padding).
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    out: list[str | None] = [None] * len(ids)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        # A full batch every time (the last one padded with copies): one compiled shape per prompt length.
        batch = [ids[i] for i in idx] + [ids[idx[0]]] * (batch_size - len(idx))
        kwargs = {}
        if has_stop_check:
            def stop_check(row: int, new_ids: list[int], n_real: int = len(idx)) -> bool:
                # Padding rows are done at once; a real row once its text holds a stop sequence.
                text = decode_generated(tok, new_ids)
                return row >= n_real or any(s and s in text for s in until)
            kwargs["stop_check"] = stop_check
        new_tokens = gen.generate(config, params, batch, sampling, pad_multiple=pad_multiple, **kwargs)
        texts = []
        for i, toks in zip(idx, new_tokens):
            if tok.eos_id is not None and tok.eos_id in toks:
                toks = toks[:toks.index(tok.eos_id)]
            out[i] = cut_at_stops(decode_generated(tok, toks), until)
            texts.append(out[i])
        if on_batch is not None:
            on_batch(idx, texts)
    return [str(t) for t in out]


class Progress:
    """A progress line on stderr: rows done, rows/s, and a running figure supplied by the caller."""

    def __init__(self, total: int, label: str, enabled: bool = True, every_s: float = 0.0):
        import sys

        self.total, self.label, self.enabled, self.every_s = total, label, enabled, every_s
        self.done, self.t0, self.last = 0, time.time(), 0.0
        self.stream = sys.stderr

    def update(self, n: int, note: str = "") -> None:
        self.done += n
        now = time.time()
        if not self.enabled or (now - self.last < self.every_s and self.done < self.total):
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        print(f"{self.label}: {self.done}/{self.total} rows, {rate:.2f} rows/s{', ' + note if note else ''}",
              file=self.stream, flush=True)

