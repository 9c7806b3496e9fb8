"""The dense presets (`llama3_8b`, `llama3_1_8b`, `qwen3_8b`) against transformers' own models of the same
shapes, built on the meta device (no weights), and the shipped 8B DPOP configs that use them."""

import pytest

from jsmaug.models import config as cfg_lib
from jsmaug.models import families, presets
from jsmaug.train.config import load_run_config

# The published parameter counts (the model cards / safetensors index totals).
LLAMA3_8B, QWEN3_8B = 8_030_261_248, 8_190_735_360


def _hf_config(name):
    """The hub's config.json fields of each model, written here independently of jsmaug's presets."""
    import transformers

    if name.startswith("llama3"):
        rope = {"rope_type": "default", "rope_theta": 500000.0}
        if name == "llama3_1_8b":
            rope = dict(rope, rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=8192)
        return transformers.LlamaConfig(
            vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_parameters=rope,
            max_position_embeddings=131072 if name == "llama3_1_8b" else 8192, tie_word_embeddings=False,
            attention_bias=False, mlp_bias=False, bos_token_id=128000, eos_token_id=128001)
    return transformers.Qwen3Config(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, max_position_embeddings=40960,
        tie_word_embeddings=False, attention_bias=False, bos_token_id=151643, eos_token_id=151645)


@pytest.mark.parametrize("name, published", [("llama3_8b", LLAMA3_8B), ("llama3_1_8b", LLAMA3_8B),
                                             ("qwen3_8b", QWEN3_8B)])
def test_dense_presets_have_transformers_parameter_count_and_fields(name, published):
    import torch
    from transformers import AutoModelForCausalLM

    hf = _hf_config(name)
    with torch.device("meta"):  # shapes only: no 8B allocation
        model = AutoModelForCausalLM.from_config(hf)
    hf_count = sum(p.numel() for p in model.parameters())
    c = cfg_lib.preset(name)
    assert hf_count == published
    assert c.num_params() == hf_count
    # The config.json jsmaug writes for the preset is the hub's, field for field, and reads back to the preset.
    written = families.to_hf_dict(c)
    for key in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "max_position_embeddings",
                "tie_word_embeddings", "attention_bias", "bos_token_id", "eos_token_id", "rope_parameters"):
        assert written[key] == getattr(hf, key), key
    assert c.resolved_head_dim == hf.head_dim == 128
    assert c.qk_norm == ("head" if name == "qwen3_8b" else "none")
    assert families.from_hf_dict(written) == c.replace(param_dtype="float32", dtype="float32")


@pytest.mark.parametrize("config_name, preset_name", [("llama3_8b_dpop", "llama3_8b"), ("qwen3_8b_dpop", "qwen3_8b")])
def test_shipped_8b_configs_load_with_a_mesh_for_one_v5p_8_host(config_name, preset_name):
    cfg, _ = load_run_config(config_name, [])
    m, mesh = cfg.model, cfg.mesh.sizes(4)  # a v5p-8: 4 chips on one host
    assert m == cfg_lib.preset(preset_name, param_dtype="float32", remat="full")
    assert (mesh["data"], mesh["fsdp"], mesh["expert"], mesh["tensor"]) == (1, 4, 1, 1)
    assert cfg.train.batch_size % (mesh["data"] * mesh["fsdp"]) == 0
    assert cfg.loss.type == "dpop" and cfg.reference.mode == "precomputed" and cfg.init_from
    assert not cfg.distributed.active  # one host, one process
    lora, _ = load_run_config(config_name, ["lora.rank=16", "lora.base_dtype=bfloat16", "mesh.fsdp=8",
                                          "distributed.enabled=true"])
    assert lora.lora.rank == 16 and lora.mesh.sizes(8)["fsdp"] == 8  # the documented v6e-8 override


def test_presets_stay_importable_from_the_config_module():
    from jsmaug.models.config import PRESETS, preset, tiny  # the historical import path

    assert preset is presets.preset and tiny is presets.tiny and PRESETS is presets.PRESETS
    assert set(cfg_lib.PRESET_NAMES) - {"PRESETS", "preset"} == set(presets.PRESETS)
    assert cfg_lib.mixtral_8x7b() == cfg_lib.ModelConfig(param_dtype="bfloat16", dtype="bfloat16")
    with pytest.raises(cfg_lib.ConfigError, match="unknown model preset 'llama3_70b'"):
        preset("llama3_70b")
    with pytest.raises(AttributeError, match="no attribute 'qwen3_9b'"):
        cfg_lib.qwen3_9b
