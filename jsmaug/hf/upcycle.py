"""Sparse upcycling: a dense Hugging Face checkpoint (llama, mistral) -> an HF Mixtral checkpoint.

Every expert of layer n is a copy of the dense MLP of layer n (`mlp.gate_proj` -> `w1`, `mlp.up_proj` -> `w3`,
`mlp.down_proj` -> `w2`), the router (`block_sparse_moe.gate.weight`) is random (normal, `router_std`, seeded per
layer) and Mixtral renormalises its top-k weights, so the weights of the k identical experts a token goes to sum
to 1: at the start the MoE model computes exactly the dense model's function (float round-off aside). Attention,
norms and embeddings are copied as they are. A tied model stays tied (MixtralForCausalLM ties `lm_head` to
`embed_tokens` when `tie_word_embeddings` is true); `untie=True` writes `lm_head` as a copy of the embedding.

What Mixtral cannot express is refused before anything is written, naming the file and the field: q/k/v (and o)
biases (qwen2; `attention_bias`), q/k RMSNorms (qwen3), a model that already has experts, and whatever jsmaug's
config reader refuses (an unknown `model_type`, a `rope_type` other than default/linear/llama3, MLP biases).

Tensors are streamed one at a time (plain file reads, numpy, no torch; host memory holds one layer's MLP) into
sharded safetensors in a temporary folder that is renamed at the end; the dense folder's tokenizer files and
`generation_config.json` are copied as they are.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re
import sys
import time
from typing import Any

import numpy as np
from etils import epath

from jsmaug.models import families
from jsmaug.data.tokenizer_folder import CHECKPOINT_FILES, copy_tokenizer_files
from jsmaug.errors import CheckpointError
from jsmaug.hf import layout
from jsmaug.hf.read import Reader, check_keys_and_shapes, read_config
from jsmaug.hf.write import (commit_dir, parse_size, prepare_out_dir, split_shards, write_generation_config,
                             write_shards)
from jsmaug.models.config import ModelConfig

MIXTRAL_AUX_LOSS_COEF = 0.02  # the mixtral family's default router_aux_loss_coef (HF's MixtralConfig's too)
_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.\d+\.(w1|w2|w3)\.weight")
_ROUTER = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.gate\.weight")
_DENSE_MLP = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_OUT_DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "F64": np.dtype(np.float32)}


def moe_config(dense: ModelConfig, num_experts: int, top_k: int, source: str = "config.json",
               untie: bool = False) -> ModelConfig:
    """The Mixtral config of the upcycled model: the dense model's fields, `num_experts` experts of the dense
    MLP's width, top-`top_k` routing renormalised. Raises CheckpointError for what Mixtral cannot express."""
    mt = dense.model_type
    if dense.is_moe:
        raise CheckpointError(f"{source}: model_type {mt!r} already has experts ({dense.num_local_experts}); "
                              "upcycling starts from a dense model (llama, mistral)")
    if dense.qkv_bias or dense.o_bias:
        which = "q/k/v" + ("/o" if dense.o_bias else "")
        field = "attention_bias=true" if dense.attention_bias else f"model_type {mt!r} (q/k/v biases always)"
        raise CheckpointError(f"{source}: {field}: the dense model has {which} projection biases and Mixtral's "
                              "attention has none, so MixtralForCausalLM cannot express it")
    if dense.qk_norm != "none":
        raise CheckpointError(f"{source}: model_type {mt!r} has q/k RMSNorms (self_attn.q_norm / k_norm) and "
                              "Mixtral's attention has none, so MixtralForCausalLM cannot express it")
    if not (isinstance(num_experts, int) and num_experts >= 1):
        raise CheckpointError(f"experts={num_experts!r}: the number of experts must be a positive integer")
    if not (isinstance(top_k, int) and 1 <= top_k <= num_experts):
        raise CheckpointError(f"top_k={top_k!r}: must be in 1..experts={num_experts}")
    return dense.replace(model_type="mixtral", num_local_experts=num_experts, num_experts_per_tok=top_k,
                         norm_topk_prob=True, router_aux_loss_coef=MIXTRAL_AUX_LOSS_COEF, router_jitter_noise=0.0,
                         tie_word_embeddings=dense.tie_word_embeddings and not untie)


def router_weight(seed: int, layer: int, num_experts: int, hidden: int, std: float) -> np.ndarray:
    """The random router of HF layer `layer`: (num_experts, hidden) float32, normal(0, std), seeded per layer
    (the same whatever order the layers are written in)."""
    rng = np.random.default_rng([seed, layer])
    return (std * rng.standard_normal((num_experts, hidden))).astype(np.float32)


class _Source:
    """The dense folder's tensors with a small cache: each expert re-reads the same three MLP tensors."""

    def __init__(self, reader: Reader, size: int = 3):
        self.reader, self.size = reader, size
        self.cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()

    def get(self, name: str) -> np.ndarray:
        if name not in self.cache:
            self.cache[name] = self.reader.get(name)
            while len(self.cache) > self.size:
                self.cache.popitem(last=False)
        return self.cache[name]

    def dtype(self, name: str) -> np.dtype:
        st = self.reader.dtype_name(name)
        if st == "BF16":
            import ml_dtypes

            return np.dtype(ml_dtypes.bfloat16)
        return _OUT_DTYPES[st]


def _source_name(name: str, tied_in: bool) -> str:
    """The dense tensor an output tensor copies (the router has none)."""
    m = _EXPERT.fullmatch(name)
    if m:
        return f"model.layers.{m.group(1)}.mlp.{_DENSE_MLP[m.group(2)]}.weight"
    if name == "lm_head.weight" and tied_in:
        return "model.embed_tokens.weight"
    return name


def upcycle(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, num_experts: int = 8, top_k: int = 2,
            seed: int = 0, router_std: float = 0.02, untie: bool = False, overwrite: bool = False,
            max_shard_size: str | int = "5GB", progress: bool = False) -> dict[str, Any]:
    """Writes the upcycled HF Mixtral folder `out_dir` from the dense HF folder `hf_dir`. Returns a summary
    (config, tensors, bytes, seconds, files, tied, copied tokenizer files)."""
    hf_dir, out_dir = epath.Path(hf_dir), epath.Path(out_dir)
    source = str(hf_dir / "config.json")
    if not (math.isfinite(router_std) and router_std >= 0):
        raise CheckpointError(f"router_std={router_std!r}: must be a finite number >= 0")
    if out_dir.resolve() == hf_dir.resolve():
        raise CheckpointError(f"{out_dir}: the output folder is the dense checkpoint itself; pick another")
    prepare_out_dir(out_dir, overwrite)
    dense = read_config(hf_dir)
    config = moe_config(dense, num_experts, top_k, source, untie)
    reader = Reader(hf_dir)
    check_keys_and_shapes(reader, dense, False)  # names the missing / unexpected / misshapen dense tensor
    src = _Source(reader)
    dtype_of = {}
    entries = []
    for name, shape in layout.hf_shapes(config).items():
        m = _ROUTER.fullmatch(name)
        if m:
            n = int(m.group(1))
            dt = src.dtype(f"model.layers.{n}.mlp.gate_proj.weight")
            fetch = (lambda n=n: router_weight(seed, n, num_experts, config.hidden_size, router_std))
        else:
            from_name = _source_name(name, dense.tie_word_embeddings)
            dt = src.dtype(from_name)
            fetch = (lambda from_name=from_name: src.get(from_name))
        dtype_of[name] = dt
        entries.append((name, shape, dt, fetch))
    limit = parse_size(max_shard_size)
    shards = split_shards(entries, limit)
    torch_dtype = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(
        str(dtype_of["model.embed_tokens.weight"]), "float32")

    t0 = time.time()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    tmp.rmtree(missing_ok=True)
    tmp.mkdir(parents=True)
    try:
        total = write_shards(tmp, shards, "upcycle" if progress else None, t0)
        (tmp / "config.json").write_text(json.dumps(families.to_hf_dict(config, torch_dtype=torch_dtype), indent=2))
        copied = copy_tokenizer_files(hf_dir, tmp, CHECKPOINT_FILES)
        if "generation_config.json" not in copied:
            write_generation_config(tmp, config)
        commit_dir(tmp, out_dir)
    except BaseException:
        tmp.rmtree(missing_ok=True)
        raise
    if progress:
        print(file=sys.stderr)
    return {"config": config, "dense_config": dense, "tensors": len(entries), "bytes": total,
            "seconds": time.time() - t0, "files": len(shards), "tied": config.tie_word_embeddings,
            "untied": dense.tie_word_embeddings and not config.tie_word_embeddings, "copied": copied}
