"""A LoRA run's adapters, unmerged, in PEFT's format: `adapter_config.json` + `adapter_model.safetensors`, which
`peft.PeftModel.from_pretrained(base, folder)` loads onto the HF base (PEFT 0.21, transformers 5; tested).

jsmaug's adapter on a weight W (jsmaug's (in, out) layout) is `W + alpha / rank * A @ B` with A (in, r) and
B (r, out) (`jsmaug/models/lora.py`). PEFT's on an HF Linear weight (out, in) is `W + lora_alpha / r * B' @ A'`
with `lora_A.weight` A' (r, in) and `lora_B.weight` B' (out, r). So A' = A^T, B' = B^T (the (in) or (out) axes
flattened as the hub layout flattens them: jsmaug/hf/layout.py), r = rank and lora_alpha = alpha: the two
scalings are the same number, with no rsLoRA.

Keys are PEFT's: `base_model.model.<the HF module>.lora_{A,B}.weight`, the HF module named as in the hub layout.
The experts are written per expert, as transformers 4 named them (Mixtral `block_sparse_moe.experts.N.w1`,
Qwen3-MoE / OLMoE `mlp.experts.N.gate_proj`); on transformers 5, which fuses the experts into 3-D parameters
(`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), PEFT 0.21 converts them on load
(`peft/utils/transformers_weight_conversion.py`: A stacked on the rank, B block-diagonal; r and alpha doubled
for gate_up, so the scaling stays alpha / rank). That conversion takes gate and up together: when a run adapted
only one of them, the other is written with zero factors (an exact no-op). It also maps the names gate_proj /
up_proj / down_proj to the experts in every layer, so the dense MLP layers of an MoE model (Qwen3-MoE's
`mlp_only_layers`) have no PEFT layout: such adapters are refused with one error (`PeftLayoutError`; checked:
PEFT loads them without complaint and leaves those layers plain `nn.Linear`, dropping the adapters).

gpt-oss keeps its experts as 3-D parameters in every transformers version (`mlp.experts.gate_up_proj` (E, D, 2F),
gate and up interleaved on the last axis, and `down_proj` (E, F, D), both (in, out)), with no per-expert modules
to name: PEFT adapts them as parameters (`target_parameters`, `lora.ParamWrapper`; GptOssExperts is marked
`is_transposed`, so PEFT takes the axes as (E, in, out)). One wrapper holds every expert's factors at once:
`lora_A.weight` (E * R, in), expert-major rows (expert e's A^T is rows e*R .. e*R+R-1), and `lora_B.weight`
(out, R * E), rank-major columns (expert e's B^T is columns k*E + e); PEFT's delta is scaling * A_e^T B_e^T per
expert. jsmaug adapts gate and up separately (w1, w3: A (E, D, r), B (E, r, F)), so their one PEFT adapter on
gate_up_proj has rank R = 2r (A = [A1, A3] on the rank, B block-diagonal with w1's rows in the even columns and
w3's in the odd ones) and lora_alpha 2 alpha in `rank_pattern` / `alpha_pattern`, keeping the scaling alpha / r;
with only one of them adapted, R = r and the other's columns are zero. (PEFT 0.21.2 warns on load that the
pattern key "did not match any targeted module and [was] ignored": that check looks at modules only; the rank and
alpha are applied to the parameter, as the test checks.) Both parameters of one module adapted nest
two wrappers: gate_up_proj's (the first PEFT wraps) is the inner one, keyed `mlp.experts.base_layer.lora_*`,
down_proj's the outer `mlp.experts.lora_*` (PEFT's own keys for that config; tested).

Checked against PEFT 0.21.2 on transformers 5.25: tests/test_peft_export.py (llama, mixtral: logits and every
merged weight equal to the merged export's), tests/test_peft_gpt_oss.py (gpt_oss, the same checks); by hand the
same way for mistral, qwen2, qwen3, qwen3_moe, olmoe.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jsmaug.eval import card
from jsmaug.hf import layout
from jsmaug.hf.layout import CheckpointError
from jsmaug.hf.read import read_config
from jsmaug.hf.write import commit_dir, gather, prepare_out_dir, write_safetensors
from jsmaug.models import decoder, lora
from jsmaug.models.config import ConfigError, ModelConfig, layer_groups
from jsmaug.paths import absolute, is_remote
from jsmaug.train import checkpoint

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."
# The experts' gate and up, which transformers 5 fuses into one gate_up_proj: PEFT needs adapters on both or neither.
_FUSED_PAIR = ("w1", "w3")
# The architecture fields a base HF folder must share with the run (checked before anything is written).
_ARCH_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "resolved_head_dim", "intermediate_size", "num_local_experts",
                "expert_intermediate_size", "tie_word_embeddings")


class PeftLayoutError(CheckpointError):
    """The run's adapters have no place in PEFT's layout for this family."""


def _node(tree, path: str):
    for key in path.split("/"):
        tree = tree.get(key, {}) if isinstance(tree, dict) else {}
    return tree


def _check_layout(config: ModelConfig, adapters) -> None:
    """Refuses dense-MLP adapters in a model that also has experts (see the module docstring)."""
    positions = layout.layer_positions(config)
    sparse_any = any(sparse for _, sparse, _ in positions.values())
    dense_mlp = sorted(n for n, (group, sparse, _) in positions.items()
                       if not sparse and _node(adapters, f"layers/{group}/mlp"))
    if sparse_any and dense_mlp:
        raise PeftLayoutError(
            f"{config.model_type}: the dense MLP layers {dense_mlp} of this mixture-of-experts model carry "
            f"adapters (lora.targets {list(config.lora_targets)}), and PEFT 0.21 has no layout for them: on "
            "transformers 5 it maps gate_proj/up_proj/down_proj to the experts' fused weights in every layer. "
            "Use the merged export, or train with lora.targets limited to q_proj/k_proj/v_proj/o_proj")


def _param_targets(node) -> dict[str, tuple[str, ...]]:
    """gpt-oss: each PEFT target parameter of the experts that carries adapters -> the jsmaug weights it holds, in
    PEFT's wrapping order (gate_up_proj first: the inner wrapper when both are adapted)."""
    out = {"gate_up_proj": tuple(w for w in _FUSED_PAIR if w + "_lora_a" in node),
           "down_proj": ("w2",) if "w2_lora_a" in node else ()}
    return {k: v for k, v in out.items() if v}


def _gate_up_a(node, weights, j) -> np.ndarray:
    """PEFT's lora_A (E * R, D) of gate_up_proj: each expert's [A1, A3] (D, R) transposed, expert-major rows."""
    a_ExDxR = np.concatenate([gather(node[w + "_lora_a"], j) for w in weights], axis=-1)
    return a_ExDxR.transpose(0, 2, 1).reshape(-1, a_ExDxR.shape[1])


def _gate_up_b(node, weights, j) -> np.ndarray:
    """PEFT's lora_B (2F, R * E) of gate_up_proj: per expert B^T block-diagonal over (w1, w3), w1's outputs in the
    even columns of gate_up_proj and w3's in the odd ones, rank-major columns."""
    bs = [gather(node[w + "_lora_b"], j) for w in weights]  # each (E, r, F)
    e, r, f = bs[0].shape
    b_Ex2FxR = np.zeros((e, 2 * f, r * len(bs)), bs[0].dtype)
    for i, (w, b_ExRxF) in enumerate(zip(weights, bs)):
        b_Ex2FxR[:, _FUSED_PAIR.index(w)::2, i * r:(i + 1) * r] = b_ExRxF.transpose(0, 2, 1)
    return b_Ex2FxR.transpose(1, 2, 0).reshape(2 * f, -1)


def _expert_param_tensors(config: ModelConfig, node, n: int, j: int):
    """gpt-oss layer n's expert adapters as PEFT's `target_parameters` factors (see the module docstring)."""
    r, e = config.lora_rank, config.num_local_experts
    d, f = config.hidden_size, config.expert_intermediate_size
    targets = _param_targets(node)
    for param, weights in targets.items():
        key = f"{_PREFIX}model.layers.{n}.mlp.experts."
        key += "base_layer." if param == "gate_up_proj" and len(targets) == 2 else ""
        if param == "gate_up_proj":
            big_r = r * len(weights)
            yield key + "lora_A.weight", (e * big_r, d), lambda w=weights: _gate_up_a(node, w, j)
            yield key + "lora_B.weight", (2 * f, big_r * e), lambda w=weights: _gate_up_b(node, w, j)
        else:  # down_proj (E, F, D): A (E, F, r) -> (E * r, F) expert-major; B (E, r, D) -> (D, r * E) rank-major
            yield (key + "lora_A.weight", (e * r, f),
                   lambda: gather(node["w2_lora_a"], j).transpose(0, 2, 1).reshape(e * r, f))
            yield (key + "lora_B.weight", (d, r * e),
                   lambda: gather(node["w2_lora_b"], j).transpose(2, 1, 0).reshape(d, r * e))


def adapter_tensors(config: ModelConfig, adapters) -> Iterator[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]]:
    """(PEFT key, shape, thunk giving the numpy tensor) of every adapter factor, in hub order. `adapters` is the
    adapter half of a LoRA params tree (`lora.split(params)[1]`); each thunk gathers one layer's (or one
    expert's) factor only."""
    _check_layout(config, adapters)
    r = config.lora_rank
    positions = layout.layer_positions(config)
    for entry, n in layout.hub_order(config):
        weight = entry.leaf.rsplit("/", 1)[-1]
        if n is None or weight not in lora.TARGETS:
            continue
        group, sparse, j = positions[n]
        folder, _, _ = entry.leaf.rpartition("/")
        node = _node(adapters, f"layers/{group}/{folder}")
        if config.model_type == "gpt_oss" and folder == "block_sparse_moe":  # 3-D expert parameters, at w1's entry
            if weight == "w1":
                yield from _expert_param_tensors(config, node, n, j)
            continue
        a_leaf, b_leaf = node.get(weight + "_lora_a"), node.get(weight + "_lora_b")
        if a_leaf is None:
            partner = dict(zip(_FUSED_PAIR, _FUSED_PAIR[::-1])).get(weight) if sparse else None
            if partner is None or partner + "_lora_a" not in node:
                continue  # not a target
            # Its fused partner is adapted: zero factors here, so PEFT can fuse the pair (an exact no-op).
        n_out, n_in = entry.hf_shape
        for e, name in enumerate(entry.names):
            key = _PREFIX + name.removesuffix(".weight")
            idx = (j, e) if len(entry.names) > 1 else (j,)
            if a_leaf is None:
                dtype = np.dtype(node[partner + "_lora_a"].dtype)
                yield key + ".lora_A.weight", (r, n_in), lambda s=(r, n_in), d=dtype: np.zeros(s, d)
                yield key + ".lora_B.weight", (n_out, r), lambda s=(n_out, r), d=dtype: np.zeros(s, d)
                continue
            # A (*in, r) -> (r, in); B (r, *out) -> (out, r): the hub layout's flattening of in and out.
            yield (key + ".lora_A.weight", (r, n_in),
                   lambda a=a_leaf, idx=idx: gather(a, *idx).reshape(-1, r).T)
            yield (key + ".lora_B.weight", (n_out, r),
                   lambda b=b_leaf, idx=idx: gather(b, *idx).reshape(r, -1).T)


def _expert_params(config: ModelConfig, adapters) -> dict[str, tuple[str, ...]]:
    """gpt-oss's adapted expert parameters (`_param_targets` of its sparse stack; every layer has the same)."""
    if config.model_type != "gpt_oss":
        return {}
    return {k: v for group, sparse, _ in layer_groups(config) if sparse
            for k, v in _param_targets(_node(adapters, f"layers/{group}/block_sparse_moe")).items()}


def target_modules(config: ModelConfig, adapters) -> list[str]:
    """The HF module names (the last part of each adapted module's name) that PEFT's config lists; gpt-oss's
    experts are `target_parameters` instead."""
    return sorted({key[len(_PREFIX):].rsplit(".", 3)[-3] for key, _, _ in adapter_tensors(config, adapters)
                   if ".mlp.experts.lora_" not in key and ".mlp.experts.base_layer.lora_" not in key})


def _number(x: float):
    return int(x) if float(x).is_integer() else x


def adapter_config(config: ModelConfig, adapters, base_model_name_or_path: str | None) -> dict[str, Any]:
    """PEFT's `adapter_config.json` for these adapters: its LoraConfig fields, PEFT's defaults for the rest.
    gpt-oss's experts: `target_parameters`, gate_up_proj of rank 2r and alpha 2 alpha when gate and up are both
    adapted (the same scaling)."""
    alpha = config.lora_alpha
    params = _expert_params(config, adapters)
    modules = target_modules(config, adapters)
    rank_pattern, alpha_pattern = {}, {}
    if len(params.get("gate_up_proj", ())) == 2:
        rank_pattern["mlp.experts.gate_up_proj"] = 2 * config.lora_rank
        alpha_pattern["mlp.experts.gate_up_proj"] = _number(2 * alpha)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": config.lora_rank, "lora_alpha": _number(alpha),
        "target_modules": modules or None,
        "target_parameters": [f"mlp.experts.{p}" for p in params] or None,
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "lora_dropout": 0.0,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "layers_to_transform": None,
        "layers_pattern": None,
    }


def check_base(config: ModelConfig, base_hf_dir) -> None:
    """Fails unless the HF folder `base_hf_dir` holds a model of the run's architecture."""
    try:
        base = read_config(base_hf_dir)
    except ConfigError as err:
        raise CheckpointError(f"{base_hf_dir}: not a model folder jsmaug reads ({err})") from err
    diff = [f"{k}: {getattr(base, k)!r} there, {getattr(config, k)!r} in the run" for k in _ARCH_FIELDS
            if getattr(base, k) != getattr(config, k)]
    if diff:
        raise CheckpointError(f"{base_hf_dir}: not the base of this LoRA run (" + "; ".join(diff) + ")")


def save(out_dir: str | os.PathLike, config: ModelConfig, adapters, base_model_name_or_path: str | None = None,
         overwrite: bool = False) -> dict[str, Any]:
    """Writes `adapter_config.json` + `adapter_model.safetensors` into `out_dir` (a temporary folder renamed at
    the end: a failure leaves nothing). The adapters keep their dtype. Returns a summary."""
    if not config.lora_rank:
        raise CheckpointError("the model has no LoRA adapters (lora_rank 0): nothing to write in PEFT's format")
    out_dir = epath.Path(out_dir)
    prepare_out_dir(out_dir, overwrite)
    cfg_json = adapter_config(config, adapters, base_model_name_or_path)  # refuses a layout PEFT lacks, first
    dtype = np.dtype(jax.tree.leaves(adapters)[0].dtype)
    entries = [(name, shape, dtype, fetch) for name, shape, fetch in adapter_tensors(config, adapters)]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # As hf.save: in a bucket (no folder rename) each file is written in place, whole once its upload completes.
    tmp = out_dir if is_remote(out_dir) else out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    tmp.rmtree(missing_ok=True)
    tmp.mkdir(parents=True)
    try:
        nbytes = write_safetensors(tmp / ADAPTER_WEIGHTS, entries)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg_json, indent=2))
        if tmp != out_dir:
            commit_dir(tmp, out_dir)
    except BaseException:
        tmp.rmtree(missing_ok=True)
        raise
    return {"tensors": len(entries), "bytes": nbytes, "target_modules": cfg_json["target_modules"]}


def _lora_config(path: epath.Path, step: int | None) -> ModelConfig:
    config = checkpoint.read_model_config(path, step)  # names a missing folder or a non-checkpoint
    if not config.lora_rank:
        raise CheckpointError(f"{path}: not a LoRA checkpoint (its model has lora_rank 0), so it has no adapters "
                              "to export in PEFT's format; `jsmaug export` writes its weights")
    return config


def load_adapters(ckpt_dir, step: int | None = None) -> tuple[ModelConfig, Any, int, dict]:
    """(model config, adapters, step, metadata) of a LoRA training workdir's checkpoint (the latest unless
    `step`)."""
    path = absolute(ckpt_dir)
    config = _lora_config(path, step)
    mngr = ocp.CheckpointManager(path / "checkpoints" if (path / "checkpoints").exists() else path,
                                 options=ocp.CheckpointManagerOptions(create=False))
    step = mngr.latest_step() if step is None else step
    # Onto one local device, whatever mesh the run saved them from (the adapters are small: rank x (in + out)).
    one = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one),
                          lora.split(decoder.param_shapes(config))[1])
    out = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item={"params": target}, partial_restore=True), meta=ocp.args.JsonRestore()))
    return config, out.state["params"], step, out.meta


def traced_base(meta: dict) -> str | None:
    """The base a LoRA checkpoint's metadata leads to, as PEFT's `base_model_name_or_path`: the Hub id when known,
    else the HF folder the converter read (`jsmaug.eval.card.trace_base`, followed from `lora_base.init_from`);
    None for a random init or a start whose HF source is not recorded."""
    found = card.trace_base((meta.get("lora_base") or {}).get("init_from"))
    if found.base_model:
        return found.base_model
    last = epath.Path(found.chain[-1]) if found.chain else None
    if last is not None and (last / "config.json").exists() and not (last / "model_config.json").exists():
        return str(absolute(last))
    return None


def export_peft(ckpt_or_workdir, out_dir, base_hf_dir=None, step: int | None = None,
                overwrite: bool = False) -> dict[str, Any]:
    """A LoRA workdir's adapters -> PEFT's format in `out_dir`. The config's `base_model_name_or_path` is
    `base_hf_dir` (the HF folder of the base the run was trained on, checked against the run's architecture first)
    when given, else the base traced from the run's `init_from` (`traced_base`), else null;
    `PeftModel.from_pretrained(base, out_dir)` takes the base model either way. Everything is checked before the
    adapters are read. Returns a summary (tensors, bytes, target_modules, step, rank, alpha, base)."""
    config = _lora_config(absolute(ckpt_or_workdir), step)
    if base_hf_dir is not None:
        check_base(config, base_hf_dir)
    prepare_out_dir(epath.Path(out_dir), overwrite)
    config, adapters, step, meta = load_adapters(ckpt_or_workdir, step)
    base_name = str(absolute(base_hf_dir)) if base_hf_dir is not None else traced_base(meta)
    summary = save(out_dir, config, adapters, base_name, overwrite=overwrite)
    return {**summary, "step": step, "rank": config.lora_rank, "alpha": config.lora_alpha, "base": base_name}
