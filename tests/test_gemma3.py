"""Gemma 3 (`gemma3_text`) beyond the family cases of test_families.py (logits, log-probs, round trip and greedy
generation against transformers, `gemma3_local_global` in tests/family_fixtures.py): the config.json forms
transformers reads (the older `sliding_window_pattern` / top-level RoPE fields), the refusals, the parameter
count against Gemma3ForCausalLM's, the local/global layer switch under the memory-efficient kernel and remat
(values and gradients against the plain path), every weight's gradient against torch's autograd, TRL's
DPOTrainer log-probs of an export, and yarn on the global layers against Gemma3ForCausalLM."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsmaug import hf
from jsmaug.data import batches as data
from jsmaug.models import config as cfg_lib, decoder as model, families
from jsmaug import eval as eval_lib

LOCAL, GLOBAL = "sliding_attention", "full_attention"
BASE = dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], vocab_size=96, hidden_size=32,
            intermediate_size=40, num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=2, head_dim=16)


def _tiny(**kw):
    return cfg_lib.tiny(**dict(dict(model_type="gemma3_text", vocab_size=96, num_hidden_layers=3, head_dim=16,
                                    query_pre_attn_scalar=20, sliding_window=4, layer_types=(LOCAL, GLOBAL, LOCAL),
                                    rope_local_base_freq=100.0, tie_word_embeddings=True), **kw))


def _noisy_params(config, seed=0):
    """Random params whose norm weights (0 at init: identity under Gemma's 1 + w) are not zero."""
    params = model.init_params(config, jax.random.key(seed))
    leaves, tree = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    out = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) if "norm" in jax.tree_util.keystr(path) else x
           for (path, x), k in zip(leaves, keys)]
    return jax.tree_util.tree_unflatten(tree, out)


def test_older_config_forms_read_as_transformers_reads_them():
    """`sliding_window_pattern` instead of layer_types, and top-level rope_theta / rope_local_base_freq /
    rope_scaling instead of per-layer-type rope_parameters: the layer types and both RoPEs Gemma3TextConfig
    makes of the same dict; the export's config.json gives them back to transformers too."""
    from transformers import Gemma3TextConfig

    d = dict(BASE, sliding_window_pattern=3, rope_theta=5e5, rope_local_base_freq=50.0,
             rope_scaling={"rope_type": "linear", "factor": 4.0}, sliding_window=6)
    theirs = Gemma3TextConfig(**{k: v for k, v in d.items() if k != "architectures"})
    ours = families.from_hf_dict(d)
    assert ours.layer_types == tuple(theirs.layer_types) and ours.layer_types.count(GLOBAL) == 2
    full, local = theirs.rope_parameters[GLOBAL], theirs.rope_parameters[LOCAL]
    assert (ours.rope_type, ours.rope_theta, ours.rope_factor) == (full["rope_type"], full["rope_theta"],
                                                                   full["factor"])
    assert (local["rope_type"], ours.rope_local_base_freq) == ("default", local["rope_theta"])
    assert (ours.sliding_window, ours.query_pre_attn_scalar) == (6, theirs.query_pre_attn_scalar)
    no_head_dim = {k: v for k, v in d.items() if k not in ("head_dim", "architectures")}
    assert families.from_hf_dict(no_head_dim).head_dim == Gemma3TextConfig(**no_head_dim).head_dim == 256
    written = families.to_hf_dict(ours)
    again = Gemma3TextConfig(**{k: v for k, v in written.items() if k not in ("architectures", "torch_dtype")})
    assert again.layer_types == theirs.layer_types and again.rope_parameters == theirs.rope_parameters
    assert families.from_hf_dict(json.loads(json.dumps(written))) == ours


@pytest.mark.parametrize("change,named", [
    (dict(layer_types=[LOCAL, "chunked_attention"] + [GLOBAL] * 5), "chunked_attention"),
    (dict(rope_parameters={GLOBAL: {"rope_type": "dynamic", "rope_theta": 1e6, "factor": 8.0}}), "'dynamic'"),
    (dict(rope_parameters={LOCAL: {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}), LOCAL),
    (dict(rope_parameters={"chunked_attention": {"rope_type": "default"}}), "chunked_attention"),
    (dict(final_logit_softcapping=30.0), "final_logit_softcapping"),
    (dict(attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    (dict(hidden_activation="gelu"), "hidden_activation='gelu'"),
    (dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    (dict(layer_types=[LOCAL] * 3), "one type per layer (7)"),
])
def test_what_jsmaug_does_not_implement_is_refused_by_name(change, named):
    with pytest.raises(cfg_lib.ConfigError, match="gemma.json") as err:
        families.from_hf_dict(dict(BASE, **change), source="gemma.json")
    assert named in str(err.value)


def test_gemma_fields_belong_to_gemma():
    with pytest.raises(cfg_lib.ConfigError, match="layer_types: is a gemma3_text field, not 'llama'"):
        cfg_lib.tiny(model_type="llama", layer_types=(LOCAL, GLOBAL))
    with pytest.raises(cfg_lib.ConfigError, match=r"\['local'\] are not supported"):
        _tiny(layer_types=("local", GLOBAL, LOCAL))
    with pytest.raises(cfg_lib.ConfigError, match="query_pre_attn_scalar"):
        families.from_hf_dict(dict(BASE, model_type="llama", architectures=["LlamaForCausalLM"],
                                   query_pre_attn_scalar=256))


def test_num_params_equals_gemma3_for_causal_lms():
    import transformers

    config = _tiny(attention_bias=True, tie_word_embeddings=False)
    hf_config = transformers.Gemma3TextConfig(**{k: v for k, v in families.to_hf_dict(config).items()
                                                 if k not in ("architectures", "torch_dtype")})
    torch_model = transformers.AutoModelForCausalLM.from_config(hf_config)
    assert config.num_params() == sum(p.numel() for p in torch_model.parameters())
    shapes = model.param_shapes(config)
    assert config.num_params() == sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def test_local_and_global_layers_under_the_chunked_kernel_and_remat():
    """The per-layer lax.cond between the windowed and the full kernel: `chunked` (blocks of 8 on 30-token rows,
    so the window's block skipping runs) and remat give the plain path's logits and gradients."""
    config = _tiny(attention_impl="xla")
    params = _noisy_params(config)
    ids = np.random.default_rng(0).integers(3, config.vocab_size, (2, 30))
    mask = np.ones_like(ids)
    mask[1, 21:] = 0

    def loss(p, c):
        logits = model.forward(c, p, ids, mask)[0]
        return jnp.sum(jnp.where(mask[..., None] > 0, jnp.sin(logits), 0.0)), logits

    run = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (_, want), g_want = run(params, config)
    for variant in (config.replace(attention_impl="chunked", attention_block_size=8),
                    config.replace(remat="full")):
        (_, got), g_got = run(params, variant)
        valid = mask.astype(bool)  # padding positions' outputs differ by kernel (and count for nothing)
        np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(want)[valid], atol=2e-5, rtol=0)
        # float32 round-off on gradients of up to ~30
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4), g_got, g_want)
    # The window does matter on these rows (a kernel ignoring it would not pass the checks above).
    wide = model.forward(config.replace(sliding_window=64), params, ids, mask)[0]
    assert float(jnp.max(jnp.abs(wide - want)[mask > 0])) > 1e-2


def test_gradients_equal_torch_autograds(tmp_path):
    """d(sum of the label log-probs)/d(every weight) against torch's autograd through Gemma3ForCausalLM, on the
    family case's checkpoint: jsmaug's gradient tree is exported with hf.save, so each tensor is compared under
    its HF name (the tied embedding's gradient is the sum of both uses in both)."""
    from family_fixtures import assert_grads_equal_torch, make_checkpoint

    torch_model = make_checkpoint("gemma3_local_global", tmp_path / "hf", seed=5)
    config, params = hf.load(tmp_path / "hf")
    ids = np.random.default_rng(1).integers(3, config.vocab_size, (2, 14))
    mask = np.ones_like(ids)
    mask[0, 10:] = 0
    assert_grads_equal_torch(tmp_path, torch_model, config, params, ids, mask)


trl = pytest.importorskip("trl", reason="trl is in the test extra (pip install -e '.[test]')")

PLAIN = [{"prompt": "Question: Who is older, Zoe or Omar?\nAnswer:", "chosen": " Zoe", "rejected": " Omar"},
         {"prompt": "Q: Mia has 3 apples and buys 4 more. How many now?\nA:", "chosen": " 3 + 4 = 7. The answer is 7",
          "rejected": " 3 + 4 = 8. The answer is 8"}]


def test_trl_dpo_trainer_gives_jsmaugs_log_probs_of_a_gemma3_export(tmp_path):
    """TRL 1.16's DPOTrainer scores the export (Gemma3ForCausalLM; rows longer than the window of 4) with the
    log-probs jsmaug's evaluation gives."""
    from jsmaug.hf.trl_reference import trl_reference_logps

    config = _tiny(vocab_size=32000, hidden_size=64, intermediate_size=96)
    params = _noisy_params(config, seed=3)
    hf.save(tmp_path / "hf", config, params, tokenizer_path=data.Tokenizer().path)
    assert json.loads((tmp_path / "hf/config.json").read_text())["architectures"] == ["Gemma3ForCausalLM"]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in PLAIN))
    examples, report = data.prepare(path, data.DataConfig(max_length=256, max_prompt_length=128))
    assert report.kept == len(PLAIN)
    ours = eval_lib.preference_eval(config, params, examples)["per_pair"]
    trl_c, trl_r = trl_reference_logps(tmp_path / "hf", PLAIN, tmp_path / "trl")
    np.testing.assert_allclose(ours["policy_chosen"], trl_c, atol=1e-3, rtol=0)
    np.testing.assert_allclose(ours["policy_rejected"], trl_r, atol=1e-3, rtol=0)
    assert np.all(np.abs(trl_c) > 15)  # ~10 nats a token: a stray or missing token would show


def test_yarn_on_the_global_layers_gives_transformers_logits(tmp_path):
    """YaRN on the global layers only (the local ones keep their default RoPE): logits equal Gemma3ForCausalLM's,
    and yarn moves them far past the tolerance (its frequencies and its attention factor both show)."""
    import torch
    import transformers
    from family_fixtures import hf_logits

    rope = {GLOBAL: {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                     "original_max_position_embeddings": 8},
            LOCAL: {"rope_type": "default", "rope_theta": 100.0}}
    cfg = transformers.Gemma3TextConfig(**dict({k: v for k, v in BASE.items() if k != "model_type"},
                                               num_hidden_layers=3, layer_types=[LOCAL, GLOBAL, LOCAL],
                                               sliding_window=5, query_pre_attn_scalar=24, rope_parameters=rope,
                                               max_position_embeddings=32, tie_word_embeddings=True))
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    torch_model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in torch_model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(0.3 * torch.randn_like(p))
    torch_model.save_pretrained(tmp_path)
    config, params = hf.load(tmp_path)
    assert config.rope_type == "yarn" and config.rope_factor == 4.0 and config.rope_local_base_freq == 100.0
    ids = np.random.default_rng(0).integers(3, 96, (2, 14))
    want, _ = hf_logits(torch_model, ids)
    got = np.asarray(model.forward(config, params, jnp.asarray(ids))[0])
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    default = config.replace(rope_type="default", rope_factor=None, rope_original_max_position_embeddings=None)
    plain = np.asarray(model.forward(default, params, jnp.asarray(ids))[0])
    assert np.abs(plain - want).max() > 1e-2
    written = families.to_hf_dict(config)  # the export's config.json: transformers reads the same RoPEs back
    again = transformers.Gemma3TextConfig(**{k: v for k, v in written.items() if k not in ("architectures",
                                                                                           "torch_dtype")})
    assert again.rope_parameters == cfg.rope_parameters and families.from_hf_dict(written) == config
