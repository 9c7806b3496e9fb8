"""YaRN RoPE (`rope_type: yarn`, jsmaug/models/rope.py): the inverse frequencies, the attention factor and the cos /
sin tables against transformers' `ROPE_INIT_FUNCTIONS["yarn"]` and rotary embedding over the parameter forms
released configs use (gpt-oss's, Qwen3's, an explicit attention_factor, DeepSeek's mscale pair), a whole tiny Qwen3
with yarn against transformers' logits and greedy generation, the config round trip, and the refusals."""

import json

import jax
import numpy as np
import pytest

from jsmaug import hf
from jsmaug.models import config as cfg_lib, decoder as model, families, generate as gen, rope

LLAMA = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=96, hidden_size=64,
             intermediate_size=40, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=8192)
YARN_FORMS = {
    "gpt_oss": (64, dict(rope_theta=150000.0, factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                         original_max_position_embeddings=4096)),
    "qwen3_defaults": (128, dict(rope_theta=1e6, factor=4.0, original_max_position_embeddings=32768)),
    "attention_factor": (32, dict(rope_theta=1e4, factor=8.0, beta_fast=16.0, beta_slow=2.0, attention_factor=0.8,
                                  original_max_position_embeddings=512)),
    "mscale_pair": (64, dict(rope_theta=1e4, factor=40.0, mscale=1.0, mscale_all_dim=0.5, truncate=True,
                             original_max_position_embeddings=4096)),
    "mscale_alone": (16, dict(rope_theta=500.0, factor=2.0, mscale=0.7, original_max_position_embeddings=64)),
}


@pytest.mark.parametrize("form", sorted(YARN_FORMS))
def test_inverse_frequencies_scaling_and_tables_equal_transformers(form):
    import torch
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    head_dim, params = YARN_FORMS[form]
    d = dict(LLAMA, head_dim=head_dim, rope_parameters=dict(params, rope_type="yarn"),
             max_position_embeddings=int(params["factor"] * params["original_max_position_embeddings"]))
    theirs = LlamaConfig(**{k: v for k, v in d.items() if k != "architectures"})
    want_inv, want_scale = ROPE_INIT_FUNCTIONS["yarn"](theirs, "cpu")
    ours = families.from_hf_dict(d)
    assert ours.rope_type == "yarn" and ours.rope_factor == params["factor"]
    np.testing.assert_allclose(np.asarray(rope.inv_frequencies(ours)), want_inv.numpy(), rtol=1e-6, atol=0)
    assert rope.attention_scaling(ours) == pytest.approx(want_scale, rel=1e-12)
    positions = np.array([[0, 1, 7, 100, 4095]])
    cos, sin = rope.cos_sin(jax.numpy.asarray(positions), ours)
    want_cos, want_sin = LlamaRotaryEmbedding(theirs)(torch.zeros(1), torch.as_tensor(positions))
    # XLA's and torch's float32 pow differ by an ulp on a few frequencies: angles agree to 1e-6 relative.
    tol = 2e-6 + 1e-6 * positions[..., None]
    assert np.all(np.abs(np.asarray(cos) - want_cos.numpy()) <= tol)
    assert np.all(np.abs(np.asarray(sin) - want_sin.numpy()) <= tol)
    np.testing.assert_allclose(np.asarray(cos)[0, 0], want_scale, rtol=1e-7)  # cos(0) = the attention factor
    if form != "mscale_pair":  # (its two mscale terms cancel to within 3%, the others scale by >= 7%)
        assert abs(want_scale - 1.0) > 0.05  # the scaling is not a no-op in these forms


def _qwen3_yarn(path, seed=0):
    """A tiny random Qwen3 with yarn (factor 8 over 24 original positions; HF's defaults for the rest), q/k weights
    scaled up so positions matter in the logits, saved by transformers."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=192,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=8.0,
                                           original_max_position_embeddings=24))
    cfg._attn_implementation = "eager"
    torch_model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in torch_model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(10.0)
            elif name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    torch_model.save_pretrained(path)
    return torch_model


def test_a_tiny_qwen3_with_yarn_gives_transformers_logits_and_generation(tmp_path):
    import torch
    from family_fixtures import hf_logits
    from transformers import Qwen3Config

    torch_model = _qwen3_yarn(tmp_path / "hf")
    config, params = hf.load(tmp_path / "hf")
    assert (config.rope_type, config.rope_factor, config.rope_original_max_position_embeddings) == ("yarn", 8.0, 24)
    assert gen.fast_step_applies(config)  # the fast decoding step's RoPE is checked below too
    ids = np.random.default_rng(0).integers(3, config.vocab_size, (2, 40))  # past the 24 original positions
    mask = np.ones_like(ids)
    mask[1, 30:] = 0
    want = hf_logits(torch_model, ids, mask)[0]
    fwd = jax.jit(model.forward, static_argnums=0)
    got = np.asarray(fwd(config, params, ids, mask)[0])
    valid = mask.astype(bool)
    np.testing.assert_allclose(got[valid], want[valid], atol=1e-4, rtol=0)
    # Without the attention factor (or with plain RoPE) the logits move far beyond the tolerance.
    for other in (config.replace(rope_attention_factor=1.0),
                  config.replace(rope_type="default", rope_factor=None, rope_original_max_position_embeddings=None)):
        assert np.max(np.abs(np.asarray(fwd(other, params, ids, mask)[0]) - want)[valid]) > 1e-2
    prompts = [[1, 5, 9, 33, 12, 7] * 5, [1, 40, 41]]
    ours = gen.generate(config, params, prompts, gen.SamplingConfig(max_new_tokens=6, eos_id=None))
    pad_ids, pad_mask = gen.left_pad(prompts, 1)
    out = torch_model.generate(torch.tensor(pad_ids, dtype=torch.long), attention_mask=torch.tensor(pad_mask),
                               max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert ours == out[:, pad_ids.shape[1]:].tolist()
    # The export's config.json: the same ModelConfig back, and transformers reads the same rope_parameters.
    hf.save(tmp_path / "out", config, params)
    written = json.loads((tmp_path / "out/config.json").read_text())
    assert families.from_hf_dict(written) == config
    again = Qwen3Config(**{k: v for k, v in written.items() if k not in ("architectures", "torch_dtype")})
    assert again.rope_parameters == torch_model.config.rope_parameters


def test_yarn_fields_and_keys_that_do_not_belong_name_themselves():
    base = dict(LLAMA, rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=4.0,
                                            original_max_position_embeddings=64))
    typo = dict(base, rope_parameters=dict(base["rope_parameters"], beta_fats=32.0))
    with pytest.raises(cfg_lib.ConfigError, match=r"c.json: rope_parameters key\(s\) \['beta_fats'\] are not "
                                                  r"parameters of rope_type 'yarn'"):
        families.from_hf_dict(typo, source="c.json")
    no_factor = dict(base, rope_parameters={k: v for k, v in base["rope_parameters"].items() if k != "factor"})
    with pytest.raises(cfg_lib.ConfigError, match="rope_type 'yarn' needs factor"):
        families.from_hf_dict(no_factor)
    # original_max_position_embeddings falls back to max_position_embeddings, as transformers' standardisation does
    no_orig = dict(base, rope_parameters={k: v for k, v in base["rope_parameters"].items()
                                          if k != "original_max_position_embeddings"})
    assert families.from_hf_dict(no_orig).rope_original_max_position_embeddings == LLAMA["max_position_embeddings"]
    with pytest.raises(cfg_lib.ConfigError, match="rope_beta_fast: is not a parameter of rope_type 'llama3'"):
        cfg_lib.tiny(model_type="llama", rope_type="llama3", rope_factor=8.0, rope_low_freq_factor=1.0,
                     rope_high_freq_factor=4.0, rope_original_max_position_embeddings=64, rope_beta_fast=32.0)
    with pytest.raises(cfg_lib.ConfigError, match="rope_truncate: must be null, true or false"):
        cfg_lib.tiny(model_type="llama", rope_type="yarn", rope_factor=4.0, rope_original_max_position_embeddings=64,
                     rope_truncate="no")
    with pytest.raises(cfg_lib.ConfigError, match="rope_type 'longrope' is not supported"):
        families.from_hf_dict(dict(LLAMA, rope_parameters=dict(rope_type="longrope", rope_theta=1e4)))
