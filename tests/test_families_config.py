"""The family switches outside the parity tests: config.json in both RoPE forms, the errors for what jsmaug does
not read, the param tree and its sharding per family, and a LoRA step and a packed step of a dense family
through the trainer's own functions."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jsmaug import hf
from jsmaug.data import batches as data
from jsmaug.models import config as cfg_lib
from jsmaug.models import decoder as model
from jsmaug.models import families, lora
from jsmaug.models.config import ConfigError, ModelConfig
from jsmaug.parallel import sharding as shd
from jsmaug.train import plan as plan_lib
from jsmaug.train import step
from jsmaug.train.config import LossSection

LLAMA3 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64, "hidden_size": 32,
          "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "rms_norm_eps": 1e-5, "max_position_embeddings": 256, "tie_word_embeddings": True,
          "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}


def test_both_rope_forms_read_alike_and_transformers_reads_what_we_write():
    from transformers import LlamaConfig

    old = families.from_hf_dict(LLAMA3)
    new_form = {k: v for k, v in LLAMA3.items() if k not in ("rope_theta", "rope_scaling")}
    new_form["rope_parameters"] = dict(LLAMA3["rope_scaling"], rope_theta=500000.0)
    assert families.from_hf_dict(new_form) == old
    assert (old.rope_type, old.rope_theta, old.rope_factor, old.rope_original_max_position_embeddings) == (
        "llama3", 5e5, 8.0, 64)
    written = families.to_hf_dict(old)
    assert written["rope_theta"] == 5e5 and written["rope_scaling"]["rope_type"] == "llama3"
    assert LlamaConfig.from_dict(written).rope_parameters == new_form["rope_parameters"]
    assert families.from_hf_dict(written) == old
    # The legacy {"type": "linear"} key; qwen's sliding window is off unless use_sliding_window.
    lin = families.from_hf_dict(dict(LLAMA3, rope_scaling={"type": "linear", "factor": 2.0}))
    assert (lin.rope_type, lin.rope_factor, lin.rope_low_freq_factor) == ("linear", 2.0, None)
    qwen = dict(LLAMA3, architectures=["Qwen2ForCausalLM"], model_type="qwen2", sliding_window=4096,
                use_sliding_window=False, rope_scaling=None)
    assert families.from_hf_dict(qwen).sliding_window is None


def test_moe_family_fields_and_defaults():
    d = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 64, "hidden_size": 32,
         "intermediate_size": 48, "moe_intermediate_size": 16, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 8, "num_experts": 16, "num_experts_per_tok": 4,
         "norm_topk_prob": True, "mlp_only_layers": [0], "output_router_logits": True,
         "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}
    c = families.from_hf_dict(d)
    assert (c.num_local_experts, c.expert_intermediate_size, c.router_aux_loss_coef) == (16, 16, 0.001)  # HF default
    assert c.sparse_layers == (False, True, True, True) and c.qk_norm == "head" and c.output_router_logits
    assert cfg_lib.layer_segments(c) == [("dense_layer", False, 0, 1, 0), ("sparse_layer", True, 0, 3, 1)]
    assert families.from_hf_dict(families.to_hf_dict(c)) == c and families.to_hf_dict(c)["num_experts"] == 16
    olmoe = families.from_hf_dict(dict(d, architectures=["OlmoeForCausalLM"], model_type="olmoe",
                                            head_dim=None, moe_intermediate_size=None, mlp_only_layers=None,
                                            norm_topk_prob=None))
    assert (olmoe.norm_topk_prob, olmoe.qk_norm, olmoe.router_aux_loss_coef, olmoe.sparse_layers) == (
        False, "projection", 0.01, (True,) * 4)
    # The decoder_sparse_step rule: layer i is sparse iff (i + 1) % step == 0.
    step2 = families.from_hf_dict(dict(d, mlp_only_layers=[], decoder_sparse_step=2))
    assert step2.sparse_layers == (False, True, False, True) and len(cfg_lib.layer_segments(step2)) == 4


@pytest.mark.parametrize("mutate, pattern", [
    (dict(rope_scaling={"rope_type": "dynamic", "factor": 4.0}), r"config.json: rope_type 'dynamic' is not supported"),
    (dict(model_type="gpt2", architectures=["GPT2LMHeadModel"]),
     r"model_type 'gpt2' .*not supported; jsmaug reads gemma3_text, gpt_oss, llama, mistral, mixtral, olmoe, qwen2, qwen3, "
     r"qwen3_moe"),
    (dict(num_local_experts=8, num_experts_per_tok=2),
     r"model_type 'llama' \(LlamaForCausalLM\) but the file has fields of another family: num_experts_per_tok"),
    (dict(architectures=["MistralForCausalLM"]), r"architectures=\['MistralForCausalLM'\] do not match model_type"),
    (dict(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
    (dict(rope_scaling={"rope_type": "linear"}), r"rope_type 'linear' needs factor"),
    (dict(num_key_value_heads=3), r"config.json: ModelConfig.num_key_value_heads: must divide"),
])
def test_bad_config_json_names_the_file_and_field(tmp_path, mutate, pattern):
    (tmp_path / "config.json").write_text(__import__("json").dumps(dict(LLAMA3, **mutate)))
    with pytest.raises(ConfigError, match=pattern):
        hf.read_config(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # nothing written


def test_constructed_configs_refuse_fields_of_two_families():
    with pytest.raises(ConfigError, match="num_local_experts: model_type 'llama' is a dense family"):
        ModelConfig(model_type="llama", num_local_experts=8)
    with pytest.raises(ConfigError, match="moe_intermediate_size: is a qwen3_moe field, not 'mixtral'"):
        cfg_lib.tiny(moe_intermediate_size=16)
    with pytest.raises(ConfigError, match="clip_qkv: is an olmoe field"):
        cfg_lib.tiny(model_type="qwen3", clip_qkv=1.0)
    with pytest.raises(ConfigError, match="rope_type 'dynamic' is not supported"):
        cfg_lib.tiny(rope_type="dynamic")
    with pytest.raises(ConfigError, match="model_type: must be one of"):
        cfg_lib.tiny(model_type="gemma")
    qwen2 = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "num_hidden_layers": 4,
             "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2}
    with pytest.raises(ConfigError, match="use_sliding_window with layers of both kinds"):
        families.from_hf_dict(qwen2)


def test_the_former_name_mixtral_config_is_the_same_class():
    """Users' code written against `MixtralConfig` keeps working: the alias is ModelConfig itself (not a copy or a
    subclass), at both import paths, and its errors name ModelConfig."""
    import jsmaug

    assert cfg_lib.MixtralConfig is ModelConfig and jsmaug.MixtralConfig is ModelConfig
    assert jsmaug.ModelConfig is ModelConfig and "MixtralConfig" in jsmaug.__all__
    old = jsmaug.MixtralConfig(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    assert isinstance(cfg_lib.tiny(), jsmaug.MixtralConfig) and type(old) is ModelConfig
    assert old == ModelConfig.from_dict(old.to_dict()) and old.is_moe is False
    with pytest.raises(ConfigError, match=r"^ModelConfig\.num_key_value_heads: must divide"):
        jsmaug.MixtralConfig(num_attention_heads=4, num_key_value_heads=3)

def test_expert_axis_must_divide_experts_and_dense_models_have_none():
    devices = jax.devices()[:8]
    with pytest.raises(ConfigError, match="mesh.expert=4 does not divide num_local_experts=6"):
        shd.make_mesh(shd.MeshConfig(data=2, expert=4), cfg_lib.tiny(model_type="olmoe", num_local_experts=6,
                                                                     num_experts_per_tok=2), devices)
    with pytest.raises(ConfigError, match="mesh.expert=2: model_type 'qwen3' is dense"):
        shd.make_mesh(shd.MeshConfig(data=4, expert=2), cfg_lib.tiny(model_type="qwen3"), devices)
    shd.make_mesh(shd.MeshConfig(data=4, expert=2), cfg_lib.tiny(model_type="qwen3_moe"), devices)


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "qwen3_moe", "olmoe", "gemma3_text"])
def test_param_tree_logical_axes_and_sizes(model_type):
    extra = dict(mlp_only_layers=(1,), num_hidden_layers=3) if model_type == "qwen3_moe" else {}
    c = cfg_lib.tiny(model_type=model_type, attention_bias=model_type in ("llama", "qwen3"), **extra)
    shapes, axes = model.param_shapes(c), model.logical_axes(c)
    assert sum(x.size for x in jax.tree.leaves(shapes)) == c.num_params()
    layers = axes["layers"]
    if model_type in ("llama", "qwen2", "qwen3"):
        assert tuple(layers["layer"]["mlp"]["gate_proj"]) == ("layers", "embed", "mlp")
        assert "exp" not in str(axes)
    elif model_type == "qwen3_moe":
        assert set(layers) == {"dense_layer", "sparse_layer"}
        assert tuple(layers["sparse_layer"]["block_sparse_moe"]["w1"]) == ("layers", "exp", "embed", "mlp")
        assert shapes["layers"]["dense_layer"]["mlp"]["down_proj"].shape == (1, 48, 32)
        assert shapes["layers"]["sparse_layer"]["block_sparse_moe"]["w2"].shape == (2, 4, 24, 32)
    attn = shapes["layers"][next(iter(layers))]["self_attn"]
    assert ("q_proj_bias" in attn) == c.qkv_bias and ("o_proj_bias" in attn) == c.o_bias
    assert ("q_norm" in attn) == (c.qk_norm != "none")
    if c.qk_norm == "projection":
        assert attn["k_norm"]["weight"].shape == (2, 2, 8)  # (layers, kv heads, head_dim): the whole projection
    norms = {k for k in shapes["layers"][next(iter(layers))] if k.endswith("layernorm")}
    assert len(norms) == (4 if c.is_gemma else 2) and "input_layernorm" in norms
    if model_type == "qwen3_moe":  # experts split over `expert`, both stacks' mlp over `tensor`
        mesh_cfg = shd.MeshConfig(data=2, expert=2, tensor=2)
        sh = shd.param_shardings(c, shd.make_mesh(mesh_cfg, c, jax.devices()[:8]), mesh_cfg)["layers"]
        assert sh["sparse_layer"]["block_sparse_moe"]["w1"].spec == P(None, "expert", None, "tensor")
        assert sh["dense_layer"]["mlp"]["down_proj"].spec == P(None, "tensor", None)
        assert sh["dense_layer"]["self_attn"]["q_norm"]["weight"].spec == P(None, None)


def _pairs(n, seed=0):
    rng = np.random.default_rng(seed)
    return [{"prompt": np.r_[1, rng.integers(3, 64, rng.integers(1, 8))].astype(np.int32),
             "chosen": np.r_[rng.integers(3, 64, rng.integers(2, 12)), 2].astype(np.int32),
             "rejected": np.r_[rng.integers(3, 64, rng.integers(2, 12)), 2].astype(np.int32),
             "index": np.int32(i)} for i in range(n)]


GEMMA3_MIXED = dict(sliding_window=4, layer_types=("sliding_attention", "full_attention"), rope_local_base_freq=100.0)


@pytest.mark.parametrize("model_type", ["qwen3", "gemma3_text"])
def test_lora_and_packing_on_a_dense_family(model_type):
    """qwen3 (q/k/v/o biases, q/k norms) and gemma3_text (a local and a global layer, window 4 < the
    segments) with adapters named after the HF projections: packed rows score the pairs as padded rows do,
    one packed LoRA step trains the adapters only, and the merged export is base + alpha / r * A @ B."""
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    config = cfg_lib.tiny(model_type=model_type, attention_bias=True, vocab_size=64, lora_rank=4, lora_targets=targets,
                          attention_impl="xla",  # the cheapest to compile: packing's chunked path is test_packing's
                          **(GEMMA3_MIXED if model_type == "gemma3_text" else {}))
    base, adapters = lora.split(model.init_params(config, jax.random.key(0)))
    layer = adapters["layers"]["layer"]
    assert sorted(layer["mlp"]) == sorted(f"{t}_lora_{x}" for t in targets[4:] for x in "ab")
    assert "q_proj_bias_lora_a" not in layer["self_attn"] and "q_norm" not in layer["self_attn"]
    pairs, buckets = _pairs(4, seed=2), (32, 64)
    mesh_cfg = shd.MeshConfig(data=1)
    mesh = shd.make_mesh(mesh_cfg, config, jax.devices()[:1])
    packed = plan_lib.place_packed(pairs, None, 1, mesh, mesh_cfg, data.DataConfig(train_path="x"), buckets)
    padded = data.collate(pairs, buckets)
    assert packed["input_ids"].shape[1] < padded["input_ids"].shape[0]  # fewer rows
    # Padded rows scored by the base model (at init the adapters add exactly 0).
    padded_logps = jax.jit(lambda p, b: step.policy_logps(config.replace(lora_rank=0), p, b)[0].logps)(base, padded)
    opt = optax.adam(1e-2)
    state = step.TrainState(adapters, opt.init(adapters), jnp.int32(0), jnp.int32(0),
                            jax.random.key_data(jax.random.key(0)))
    fn = jax.jit(functools.partial(step.train_step, config=config, loss_cfg=LossSection(type="dpop", beta=0.3),
                                   optimizer=opt))
    state, m = fn(state, packed, base)
    assert float(m["rewards/chosen"]) == 0.0 and int(m["applied"]) == 1  # at init the policy IS the reference
    assert int(m["tokens"]) == int((padded["segment_ids"] > 0).sum())
    chosen, rejected = np.split(np.asarray(padded_logps), 2)  # the packed step's log-probs are the padded ones
    np.testing.assert_allclose([m["logps/chosen"], m["logps/rejected"]], [chosen.mean(), rejected.mean()],
                               rtol=1e-5, atol=1e-5)
    for path, b in jax.tree_util.tree_flatten_with_path(lora.split(state.params)[1])[0]:
        if path[-1].key.endswith("_lora_b"):  # B starts at 0 and gets the first gradient
            assert float(jnp.max(jnp.abs(b))) > 0, path
    merged = lora.merge(base, state.params, config.lora_alpha, config.lora_rank)
    a = np.asarray(state.params["layers"]["layer"]["mlp"]["gate_proj_lora_a"])
    b = np.asarray(state.params["layers"]["layer"]["mlp"]["gate_proj_lora_b"])
    want = np.asarray(base["layers"]["layer"]["mlp"]["gate_proj"]) + config.lora_alpha / config.lora_rank * a @ b
    np.testing.assert_allclose(merged["layers"]["layer"]["mlp"]["gate_proj"], want, rtol=1e-6, atol=1e-7)
    assert jax.tree.structure(merged) == jax.tree.structure(base)  # a model without adapters
    if config.is_gemma:  # the window counts on these segments (up to 20 tokens), so packing had to respect it
        wide = jax.jit(lambda p, b: step.policy_logps(config.replace(lora_rank=0, sliding_window=64), p, b)[0].logps)
        assert float(jnp.max(jnp.abs(wide(base, padded) - padded_logps))) > 1e-4


def test_a_mixed_model_round_trips_through_a_jsmaug_checkpoint(tmp_path):
    """Both stacks and every family field (tuples included) survive the converter's Orbax checkpoint."""
    from jsmaug.train import checkpoint

    c = cfg_lib.tiny(model_type="qwen3_moe", num_hidden_layers=3, mlp_only_layers=(0,), eos_token_id=(2, 5),
                     rope_type="linear", rope_factor=2.0)
    params = model.init_params(c, jax.random.key(5))
    checkpoint.save_params(tmp_path / "ck", c, params)
    config, restored = checkpoint.load_params(tmp_path / "ck")
    assert config == c and config.mlp_only_layers == (0,) and config.eos_token_id == (2, 5)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, params)
    g = cfg_lib.tiny(model_type="gemma3_text", **GEMMA3_MIXED)  # its layer_types tuple too
    checkpoint.save_params(tmp_path / "gemma", g, model.init_params(g, jax.random.key(6)))
    assert checkpoint.load_params(tmp_path / "gemma")[0] == g
