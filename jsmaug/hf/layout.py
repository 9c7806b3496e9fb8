"""What the Hugging Face Mixtral layout holds: tensor names and shapes for a config, the error type of the
converter, and its progress line. Shared by `hf_read` (import) and `hf_write` (export)."""

from __future__ import annotations

import re
import sys
import time

from jsmaug.models.config import MixtralConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message names the file or tensor at fault."""


# ------------------------------------------------------------------------------------------------ name mapping
# Every jsmaug leaf -> how to build it from HF tensors. Per-layer leaves are stacked on axis 0 (the scan axis);
# expert leaves additionally on axis 1.

_LAYER = "layers/layer/"


def _hub_names(config: MixtralConfig) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight",
                  p + "block_sparse_moe.gate.weight"]
        names += [p + f"self_attn.{x}_proj.weight" for x in "qkvo"]
        for e in range(config.num_local_experts):
            names += [p + f"block_sparse_moe.experts.{e}.{w}.weight" for w in ("w1", "w2", "w3")]
    return names


def _expected_hf_shape(config: MixtralConfig, name: str) -> tuple[int, ...] | None:
    d, f, v, e = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_local_experts
    hq, hkv, dh = config.num_attention_heads, config.num_key_value_heads, config.resolved_head_dim
    table = {
        r"model\.embed_tokens\.weight": (v, d), r"lm_head\.weight": (v, d), r"model\.norm\.weight": (d,),
        r".*layernorm\.weight": (d,), r".*q_proj\.weight": (hq * dh, d), r".*[kv]_proj\.weight": (hkv * dh, d),
        r".*o_proj\.weight": (d, hq * dh), r".*(block_sparse_moe|mlp)\.gate\.weight": (e, d),
        r".*\.w[13]\.weight": (f, d), r".*\.w2\.weight": (d, f),
        r".*gate_up_proj": (e, 2 * f, d), r".*down_proj": (e, d, f),
    }
    for pat, shape in table.items():
        if re.fullmatch(pat, name):
            return shape
    return None


def _progress(what: str, done: int, total: int, nbytes: int, t0: float) -> None:
    dt = max(time.time() - t0, 1e-9)
    width = 30
    fill = int(width * done / max(total, 1))
    print(f"\r{what} [{'#' * fill}{'.' * (width - fill)}] {done}/{total} tensors "
          f"{nbytes / 1e9:.2f} GB {nbytes / 1e9 / dt:.2f} GB/s", end="", file=sys.stderr, flush=True)
