"""What the Hugging Face layout of each family holds: the tensor names and shapes for a config, the jsmaug leaf
each one maps to, the converter's error type and its progress line. Shared by `hf/read.py` (import) and
`hf/write.py` (export).

Per layer n (`model.layers.{n}.`): the two norms (Gemma 3: four, `pre_feedforward_layernorm` and
`post_feedforward_layernorm` besides), `self_attn.{q,k,v,o}_proj.weight`, the biases
(`.bias`, qwen2: q/k/v; `attention_bias`: all four), `self_attn.{q,k}_norm.weight` (qwen3: (head_dim,);
olmoe: the whole projection), and the MLP: dense `mlp.{gate,up,down}_proj.weight`; Mixtral's experts
`block_sparse_moe.gate.weight` + `block_sparse_moe.experts.{e}.{w1,w3,w2}.weight`; Qwen3-MoE's and OLMoE's
`mlp.gate.weight` + `mlp.experts.{e}.{gate,up,down}_proj.weight`. transformers 5 keeps experts fused in memory
(`mlp.experts.gate_up_proj` (E, 2F, D) = [gate; up], `mlp.experts.down_proj` (E, D, F)) and writes them so with
`save_pretrained(save_original_format=False)`: the importer reads that layout too, the exporter writes the hub's.
A tied model has no `lm_head.weight`. PyTorch Linear weights are (out, in): jsmaug's (in, out) transposed.

gpt-oss (`gpt_oss`) has `self_attn.sinks` (H,) besides its q/k/v/o weights and biases, the router
`mlp.router.weight` (E, D) + `mlp.router.bias` (E,), and its experts as parameters already in (in, out) order:
`mlp.experts.gate_up_proj` (E, D, 2F) with gate and up INTERLEAVED on the last axis (gate = [..., 0::2],
up = [..., 1::2]), `gate_up_proj_bias` (E, 2F) alike, `down_proj` (E, F, D) and `down_proj_bias` (E, D). The hub's
release stores the two expert weights in MXFP4 instead (`*_blocks` (E, out, in / 32, 16) and `*_scales`
(E, out, in / 32) uint8, in HF's (out, in) order: jsmaug/hf/mxfp4.py); the importer reads either, the exporter
writes the bf16/float32 form.
"""

from __future__ import annotations

import sys
import time
from typing import Iterator, NamedTuple

from jsmaug.errors import CheckpointError  # noqa: F401 - re-exported (jsmaug.hf.CheckpointError)
from jsmaug.hf import mxfp4
from jsmaug.models.config import ModelConfig, layer_groups


class Entry(NamedTuple):
    """One jsmaug leaf and the HF tensor(s) it is made of."""
    leaf: str  # path in the params: top level ("embed_tokens") or inside a layer ("self_attn/q_proj")
    names: tuple[str, ...]  # one HF tensor, or one per expert (stacked on the leaf's expert axis)
    hf_shape: tuple[int, ...]  # the shape of each HF tensor
    transposed: bool  # a Linear weight: HF (out, in) = jsmaug's (in, ..., out) transposed
    # How the leaf comes out of the tensor(s): None (whole); transformers-5's fused experts: "gate" / "up" (halves
    # of gate_up_proj) or "down"; gpt-oss: "even" / "odd" (gate / up interleaved on the last axis), and MXFP4
    # ("mxfp4", "mxfp4_even", "mxfp4_odd"; names = (blocks, scales), hf_shape = the dequantized (E, in, out)).
    fused: str | None = None
    pair: str | None = None  # "even": the leaf holding the odd half of the same tensor (the exporter interleaves)


_EXPERT_NAMES = {"mixtral": ("block_sparse_moe", {"w1": "w1", "w3": "w3", "w2": "w2"})}
_HF_EXPERT_NAMES = ("mlp", {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"})


def top_entries(config: ModelConfig) -> list[Entry]:
    d, v = config.hidden_size, config.vocab_size
    out = [Entry("embed_tokens", ("model.embed_tokens.weight",), (v, d), False),
           Entry("norm/weight", ("model.norm.weight",), (d,), False)]
    if not config.tie_word_embeddings:
        out.append(Entry("lm_head", ("lm_head.weight",), (v, d), True))
    return out


def layer_entries(config: ModelConfig, n: int, sparse: bool, fused: bool = False, mxfp4: bool = False) -> list[Entry]:
    """The entries of HF layer n (a sparse MoE layer or a dense one), in the hub's order. `mxfp4`: gpt-oss's
    experts as the hub's MXFP4 blocks and scales."""
    c = config
    d, hq, hkv, dh = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.resolved_head_dim
    p = f"model.layers.{n}."
    out = [Entry("input_layernorm/weight", (p + "input_layernorm.weight",), (d,), False)]
    for x, rows in (("q", hq * dh), ("k", hkv * dh), ("v", hkv * dh)):
        out.append(Entry(f"self_attn/{x}_proj", (p + f"self_attn.{x}_proj.weight",), (rows, d), True))
        if c.qkv_bias:
            out.append(Entry(f"self_attn/{x}_proj_bias", (p + f"self_attn.{x}_proj.bias",), (rows,), False))
    out.append(Entry("self_attn/o_proj", (p + "self_attn.o_proj.weight",), (d, hq * dh), True))
    if c.o_bias:
        out.append(Entry("self_attn/o_proj_bias", (p + "self_attn.o_proj.bias",), (d,), False))
    if c.attention_sinks:
        out.append(Entry("self_attn/sinks", (p + "self_attn.sinks",), (hq,), False))
    if c.qk_norm != "none":
        q_size, k_size = (dh, dh) if c.qk_norm == "head" else (hq * dh, hkv * dh)
        out += [Entry("self_attn/q_norm/weight", (p + "self_attn.q_norm.weight",), (q_size,), False),
                Entry("self_attn/k_norm/weight", (p + "self_attn.k_norm.weight",), (k_size,), False)]
    out.append(Entry("post_attention_layernorm/weight", (p + "post_attention_layernorm.weight",), (d,), False))
    if c.is_gemma:
        out += [Entry(f"{x}_feedforward_layernorm/weight", (p + f"{x}_feedforward_layernorm.weight",), (d,), False)
                for x in ("pre", "post")]
    if not sparse:
        f = c.intermediate_size
        out += [Entry("mlp/gate_proj", (p + "mlp.gate_proj.weight",), (f, d), True),
                Entry("mlp/up_proj", (p + "mlp.up_proj.weight",), (f, d), True),
                Entry("mlp/down_proj", (p + "mlp.down_proj.weight",), (d, f), True)]
        return out
    e, f = c.num_local_experts, c.expert_intermediate_size
    m = "block_sparse_moe/"
    if c.model_type == "gpt_oss":
        return out + _gpt_oss_moe_entries(p, e, d, f, mxfp4)
    if fused:
        return out + [Entry(m + "gate", (p + "mlp.gate.weight",), (e, d), True),
                      Entry(m + "w1", (p + "mlp.experts.gate_up_proj",), (e, 2 * f, d), False, "gate"),
                      Entry(m + "w3", (p + "mlp.experts.gate_up_proj",), (e, 2 * f, d), False, "up"),
                      Entry(m + "w2", (p + "mlp.experts.down_proj",), (e, d, f), False, "down")]
    block, proj = _EXPERT_NAMES.get(c.model_type, _HF_EXPERT_NAMES)
    out.append(Entry(m + "gate", (p + f"{block}.gate.weight",), (e, d), True))
    for w, shape in (("w1", (f, d)), ("w3", (f, d)), ("w2", (d, f))):
        out.append(Entry(m + w, tuple(p + f"{block}.experts.{j}.{proj[w]}.weight" for j in range(e)), shape, True))
    return out


def _gpt_oss_moe_entries(p: str, e: int, d: int, f: int, mxfp4: bool) -> list[Entry]:
    m, x = "block_sparse_moe/", p + "mlp.experts."
    out = [Entry(m + "gate", (p + "mlp.router.weight",), (e, d), True),
           Entry(m + "gate_bias", (p + "mlp.router.bias",), (e,), False)]
    if mxfp4:
        packed = lambda w: (x + w + "_blocks", x + w + "_scales")  # noqa: E731
        out += [Entry(m + "w1", packed("gate_up_proj"), (e, d, 2 * f), False, "mxfp4_even"),
                Entry(m + "w3", packed("gate_up_proj"), (e, d, 2 * f), False, "mxfp4_odd"),
                Entry(m + "w2", packed("down_proj"), (e, f, d), False, "mxfp4")]
    else:
        out += [Entry(m + "w1", (x + "gate_up_proj",), (e, d, 2 * f), False, "even", m + "w3"),
                Entry(m + "w3", (x + "gate_up_proj",), (e, d, 2 * f), False, "odd"),
                Entry(m + "w2", (x + "down_proj",), (e, f, d), False)]
    return out + [Entry(m + "w1_bias", (x + "gate_up_proj_bias",), (e, 2 * f), False, "even", m + "w3_bias"),
                  Entry(m + "w3_bias", (x + "gate_up_proj_bias",), (e, 2 * f), False, "odd"),
                  Entry(m + "w2_bias", (x + "down_proj_bias",), (e, d), False)]


def tensor_shapes(entry: Entry) -> dict[str, tuple[int, ...]]:
    """The HF tensor(s) an entry reads, with their shapes: MXFP4 blocks and scales in HF's (E, out, in / 32, ...)
    order from the dequantized (E, in, out) shape, else `hf_shape` for each name."""
    if entry.fused is not None and entry.fused.startswith("mxfp4"):
        e, n_in, n_out = entry.hf_shape
        blocks, scales = mxfp4.packed_shapes(n_out, n_in)
        return {entry.names[0]: (e, *blocks), entry.names[1]: (e, *scales)}
    return {name: entry.hf_shape for name in entry.names}


def is_packed(name: str) -> bool:
    """An MXFP4 tensor (uint8 blocks or scales), not a float one."""
    return name.endswith(("_blocks", "_scales"))


def layer_positions(config: ModelConfig) -> dict[int, tuple[str, bool, int]]:
    """HF layer n -> (its stack under params["layers"], sparse?, its index in that stack)."""
    return {n: (group, sparse, j) for group, sparse, idx in layer_groups(config) for j, n in enumerate(idx)}


def hub_order(config: ModelConfig, fused: bool = False, mxfp4: bool = False) -> Iterator[tuple[Entry, int | None]]:
    """Every entry with its HF layer (None at the top level), in the hub's file order."""
    top = top_entries(config)
    yield top[0], None
    for n, (_, sparse, _) in sorted(layer_positions(config).items()):
        for entry in layer_entries(config, n, sparse, fused, mxfp4):
            yield entry, n
    for entry in top[1:]:
        yield entry, None


def hf_shapes(config: ModelConfig, fused: bool = False, mxfp4: bool = False) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name of the layout -> its shape, in file order."""
    return {name: shape for entry, _ in hub_order(config, fused, mxfp4) for name, shape in tensor_shapes(entry).items()}


def progress(what: str, done: int, total: int, nbytes: int, t0: float) -> None:
    dt = max(time.time() - t0, 1e-9)
    width = 30
    fill = int(width * done / max(total, 1))
    print(f"\r{what} [{'#' * fill}{'.' * (width - fill)}] {done}/{total} tensors "
          f"{nbytes / 1e9:.2f} GB {nbytes / 1e9 / dt:.2f} GB/s", end="", file=sys.stderr, flush=True)
