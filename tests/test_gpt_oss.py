"""gpt-oss (`gpt_oss`) against transformers 5's GptOssForCausalLM: the hub's config.json (gpt-oss-20b's) read as
GptOssConfig reads it, the presets' parameter counts, the refusals; then a tiny random checkpoint made by
transformers with every switch on (sliding layers of a window shorter than the rows between full ones, sinks, q/k/v/o
biases, yarn RoPE, a router bias, expert biases, the SwiGLU clamp reached by the test's activations, untied and
tied embeddings): every tensor where the importer puts it (gate/up interleaved), logits, HF's aux loss and log-probs
(<= 1e-4, float32), an identical round trip that AutoModelForCausalLM loads, the hub's MXFP4 experts imported as
transformers dequantizes them, every weight's gradient against torch's autograd, greedy generation with the KV cache.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from family_fixtures import assert_grads_equal_torch, hf_logits
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from jsmaug import hf
from jsmaug.data import batches as data
from jsmaug.models import config as cfg_lib, decoder as model, families, generate as gen, logps as logps_lib, presets
from jsmaug.models.config import ConfigError

SL, FULL = "sliding_attention", "full_attention"
# openai/gpt-oss-20b's config.json as the hub has it (its experts in MXFP4, rope in the older rope_scaling form).
HUB_20B = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0, "eos_token_id": 200002,
    "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2880, "initial_context_length": 4096,
    "initializer_range": 0.02, "intermediate_size": 2880, "layer_types": [SL, FULL] * 12,
    "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64, "num_experts_per_tok": 4,
    "num_hidden_layers": 24, "num_key_value_heads": 8, "num_local_experts": 32, "output_router_logits": False,
    "pad_token_id": 199999, "quantization_config": {
        "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                                   "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05, "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                                            "original_max_position_embeddings": 4096, "rope_type": "yarn",
                                            "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128, "swiglu_limit": 7.0,
    "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0", "use_cache": True, "vocab_size": 201088}


def _hf_config(d):
    from transformers import GptOssConfig

    return GptOssConfig(**{k: v for k, v in d.items()
                           if k not in ("architectures", "quantization_config", "torch_dtype")})


def _hf_param_count(d):
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return sum(p.numel() for p in AutoModelForCausalLM.from_config(_hf_config(d)).parameters())


def test_the_hubs_config_reads_as_transformers_reads_it_and_the_presets_count_its_parameters():
    ours, theirs = families.from_hf_dict(HUB_20B), _hf_config(HUB_20B)
    assert (ours.layer_types, ours.sliding_window, ours.head_dim) == (tuple(theirs.layer_types), 128, 64)
    assert (ours.num_local_experts, ours.num_experts_per_tok, ours.swiglu_limit, ours.swiglu_alpha) == (
        theirs.num_local_experts, theirs.num_experts_per_tok, theirs.swiglu_limit, theirs.swiglu_alpha)
    assert ours.attention_sinks and ours.router_bias and ours.expert_bias and ours.qkv_bias and ours.o_bias
    assert ours.bos_token_id is None and ours.mixed_attention and ours.norm_topk_prob
    written = families.to_hf_dict(ours)
    assert "quantization_config" not in written and written["experts_per_token"] == 4
    again = _hf_config(json.loads(json.dumps(written)))
    assert again.rope_parameters == theirs.rope_parameters and again.layer_types == theirs.layer_types
    assert families.from_hf_dict(written) == ours
    # The released shapes: 20,914,757,184 and 116,829,156,672 parameters, as transformers counts them.
    assert presets.gpt_oss_20b(param_dtype="float32", dtype="float32") == ours
    assert ours.num_params() == _hf_param_count(HUB_20B) == 20_914_757_184
    big = presets.preset("gpt_oss_120b")
    assert big.num_params() == _hf_param_count(families.to_hf_dict(big)) == 116_829_156_672
    tied = ours.replace(tie_word_embeddings=True, num_hidden_layers=2, layer_types=(SL, FULL))
    assert tied.num_params() == _hf_param_count(families.to_hf_dict(tied))
    # A file that leaves everything out gets GptOssConfig's defaults.
    bare = {"model_type": "gpt_oss", "architectures": ["GptOssForCausalLM"], "num_hidden_layers": 4}
    d, t = families.from_hf_dict(bare), _hf_config(bare)
    assert (d.layer_types, d.head_dim, d.sliding_window, d.attention_bias) == (
        tuple(t.layer_types), t.head_dim, t.sliding_window, t.attention_bias)
    assert (d.num_local_experts, d.num_experts_per_tok, d.rms_norm_eps, d.router_aux_loss_coef) == (
        t.num_local_experts, t.num_experts_per_tok, t.rms_norm_eps, t.router_aux_loss_coef)
    assert _hf_config(families.to_hf_dict(d)).rope_parameters == t.rope_parameters


@pytest.mark.parametrize("change,named", [
    (dict(quantization_config={"quant_method": "bitsandbytes"}), "quant_method 'bitsandbytes'"),
    (dict(experts_per_token=2), "num_experts_per_tok and experts_per_token disagree"),
    (dict(layer_types=[SL, "chunked_attention"] * 12), "chunked_attention"),
    (dict(layer_types=[SL, FULL]), "one type per layer (24)"),
    (dict(sliding_window=None), "sliding_window null"),
    (dict(rope_scaling=dict(HUB_20B["rope_scaling"], ntk_alpha=1.0)), "['ntk_alpha']"),
    (dict(swiglu_limit=-1.0), "swiglu_limit: must be > 0"),
])
def test_what_jsmaug_does_not_read_is_refused_by_name(change, named):
    with pytest.raises(ConfigError, match="gpt.json") as err:
        families.from_hf_dict(dict(HUB_20B, **change), source="gpt.json")
    assert named in str(err.value)


def test_gpt_oss_fields_belong_to_gpt_oss():
    with pytest.raises(ConfigError, match="swiglu_limit: is a gpt_oss field, not 'mixtral'"):
        cfg_lib.tiny(swiglu_limit=7.0)
    with pytest.raises(ConfigError, match="norm_topk_prob: gpt_oss's softmax"):
        cfg_lib.tiny(model_type="gpt_oss", norm_topk_prob=False)
    llama = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "swiglu_limit": 7.0}
    with pytest.raises(ConfigError, match=r"fields of another family: swiglu_limit \(gpt_oss\)"):
        families.from_hf_dict(llama)


# ---------------------------------------------------------------------------------------------- checkpoints

LIMIT = 1.0  # the SwiGLU clamp, below the scaled-up experts' activations
BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, sliding_window=4, layer_types=[SL, FULL, SL], num_local_experts=8,
            num_experts_per_tok=2, swiglu_limit=LIMIT, max_position_embeddings=256, router_aux_loss_coef=0.02,
            bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False, attention_bias=True,
            rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=8.0, beta_fast=8.0, beta_slow=1.0,
                                 truncate=False, original_max_position_embeddings=32))


def make_checkpoint(path, seed=0, **overrides):
    """A random tiny GptOssForCausalLM saved by transformers; returns it (eval, float32, eager attention). Biases
    (HF initialises the experts' to 0), sinks and norms random, the router scaled up for clear-cut top-k choices,
    q/k for sharp attention, the experts' gate_up so that the clamp at LIMIT is reached."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = _hf_config(dict(BASE, **overrides))
    cfg._attn_implementation = "eager"
    torch_model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in torch_model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(("bias", "sinks")):
                p.copy_((0.5 if name.endswith(("router.bias", "sinks")) else 0.1) * torch.randn_like(p))
            elif name.endswith("router.weight"):
                p.mul_(40.0)
            elif name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(10.0)
            elif name.endswith("experts.gate_up_proj"):
                p.mul_(8.0)
    torch_model.save_pretrained(path)
    return torch_model


def _tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="np") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt_oss")
    torch_model = make_checkpoint(path)
    config, params = hf.load(path)
    return path, torch_model, config, params


def _rows(vocab, seed=0):
    rng = np.random.default_rng(seed)
    pairs = [{"prompt": np.r_[1, rng.integers(3, vocab, rng.integers(3, 7))].astype(np.int32),
              "chosen": np.r_[rng.integers(3, vocab, rng.integers(4, 9)), 2].astype(np.int32),
              "rejected": np.r_[rng.integers(3, vocab, rng.integers(4, 9)), 2].astype(np.int32)} for _ in range(2)]
    return data.collate(pairs, (16,))  # right-padded rows of different lengths, longer than the window of 4


def test_every_tensor_lands_where_transformers_holds_it(case):
    """The leaves against the checkpoint's tensors: the experts' gate and up are the even and odd columns of
    gate_up_proj (and of its bias), the router (E, D) transposed, the sinks as they are."""
    path, _, config, params = case
    t = _tensors(path)
    assert config.model_type == "gpt_oss" and config.layer_types == (SL, FULL, SL) and config.rope_type == "yarn"
    layer = jax.tree.map(np.asarray, params["layers"]["layer"])
    for n in range(config.num_hidden_layers):
        p, moe, attn = f"model.layers.{n}.", layer["block_sparse_moe"], layer["self_attn"]
        gate_up, gate_up_bias = t[p + "mlp.experts.gate_up_proj"], t[p + "mlp.experts.gate_up_proj_bias"]
        np.testing.assert_array_equal(moe["w1"][n], gate_up[..., 0::2])
        np.testing.assert_array_equal(moe["w3"][n], gate_up[..., 1::2])
        np.testing.assert_array_equal(moe["w1_bias"][n], gate_up_bias[:, 0::2])
        np.testing.assert_array_equal(moe["w3_bias"][n], gate_up_bias[:, 1::2])
        np.testing.assert_array_equal(moe["w2"][n], t[p + "mlp.experts.down_proj"])
        np.testing.assert_array_equal(moe["w2_bias"][n], t[p + "mlp.experts.down_proj_bias"])
        np.testing.assert_array_equal(moe["gate"][n], t[p + "mlp.router.weight"].T)
        np.testing.assert_array_equal(moe["gate_bias"][n], t[p + "mlp.router.bias"])
        np.testing.assert_array_equal(attn["sinks"][n], t[p + "self_attn.sinks"])
        np.testing.assert_array_equal(attn["o_proj_bias"][n], t[p + "self_attn.o_proj.bias"])


def test_logits_aux_and_completion_logps_equal_transformers_with_the_clamp_reached(case, monkeypatch):
    import torch
    from transformers.models.gpt_oss import modeling_gpt_oss

    _, torch_model, config, params = case
    batch = _rows(config.vocab_size)
    mask = (batch["segment_ids"] > 0).astype(np.int64)
    seen = []
    apply_gate = modeling_gpt_oss.GptOssExperts._apply_gate
    monkeypatch.setattr(modeling_gpt_oss.GptOssExperts, "_apply_gate",
                        lambda self, gate_up: seen.append(gate_up.detach()) or apply_gate(self, gate_up))
    want, want_aux = hf_logits(torch_model, batch["input_ids"], mask, output_router_logits=True)
    gate_up = torch.cat(seen)
    gate, up = gate_up[..., 0::2], gate_up[..., 1::2]
    # The clamp binds on both halves and both sides, for a fair share of the routed activations, not all.
    for clamped in (gate > LIMIT, up > LIMIT, up < -LIMIT):
        assert 0.02 < float(clamped.float().mean()) < 0.5
    fwd = jax.jit(model.forward, static_argnums=0)
    got, aux = fwd(config, params, batch["input_ids"], mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[valid], want[valid], atol=1e-4, rtol=0)
    # The sinks and the router bias each move these logits far past the tolerance (same program, other values).
    for leaf in (("self_attn", "sinks"), ("block_sparse_moe", "gate_bias")):
        layer = dict(params["layers"]["layer"], **{leaf[0]: dict(params["layers"]["layer"][leaf[0]])})
        layer[leaf[0]][leaf[1]] = jnp.full_like(layer[leaf[0]][leaf[1]], -1e4 if leaf[1] == "sinks" else 0.0)
        other = fwd(config, dict(params, layers={"layer": layer}), batch["input_ids"], mask)[0]
        assert np.max(np.abs(np.asarray(other) - want)[valid]) > 1e-2, leaf
    np.testing.assert_allclose(float(aux), want_aux, atol=1e-5, rtol=0)
    lp = torch.log_softmax(torch.as_tensor(want), -1).numpy()
    want_logps = (np.take_along_axis(lp, batch["labels"][..., None], -1)[..., 0] * batch["loss_mask"]).sum(-1)
    got_logps, _ = logps_lib.sequence_logps(got, jnp.asarray(batch["labels"]), jnp.asarray(batch["loss_mask"]))
    np.testing.assert_allclose(np.asarray(got_logps), want_logps, atol=1e-4, rtol=0)


def test_round_trip_is_identical_and_transformers_loads_the_export(case, tmp_path):
    from transformers import AutoModelForCausalLM

    path, torch_model, config, params = case
    hf.save(tmp_path / "out", config, params)
    a, b = _tensors(path), _tensors(tmp_path / "out")
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    written = json.loads((tmp_path / "out/config.json").read_text())
    assert written["architectures"] == ["GptOssForCausalLM"] and families.from_hf_dict(written) == config
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(reloaded) is type(torch_model)
    ids = np.random.default_rng(3).integers(3, config.vocab_size, (2, 11))
    np.testing.assert_array_equal(hf_logits(reloaded, ids)[0], hf_logits(torch_model, ids)[0])


def test_the_hubs_mxfp4_experts_import_as_transformers_dequantizes_them(case, tmp_path):
    """The checkpoint with its expert weights replaced by random MXFP4 blocks and scales in the hub's layout (and
    its quantization_config): transformers (CPU, dequantized) and jsmaug hold the same float32 experts and give
    the same logits; the export writes them unquantized, which transformers loads to the same logits."""
    import torch
    from transformers import AutoModelForCausalLM

    path, _, config, _ = case
    rng = np.random.default_rng(7)
    tensors = {}
    for k, v in load_file(str(path / "model.safetensors")).items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            e, n_in, n_out = v.shape  # the parameter is (E, in, out); the hub packs (E, out, in / 32, 16)
            tensors[k + "_blocks"] = rng.integers(0, 256, (e, n_out, n_in // 32, 16), dtype=np.uint8)
            tensors[k + "_scales"] = rng.integers(122, 128, (e, n_out, n_in // 32), dtype=np.uint8)
        else:
            tensors[k] = v
    (tmp_path / "mx").mkdir()
    save_file(tensors, str(tmp_path / "mx/model.safetensors"), metadata={"format": "pt"})
    d = json.loads((path / "config.json").read_text())
    d["quantization_config"] = dict(HUB_20B["quantization_config"])
    (tmp_path / "mx/config.json").write_text(json.dumps(d))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "mx", dtype=torch.float32,
                                                  attn_implementation="eager").eval()
    mx_config, params = hf.load(tmp_path / "mx", dtype="float32")
    assert mx_config == config
    layer = jax.tree.map(np.asarray, params["layers"]["layer"]["block_sparse_moe"])
    for n, block in enumerate(theirs.model.layers):
        gate_up = block.mlp.experts.gate_up_proj.detach().numpy()
        np.testing.assert_array_equal(layer["w1"][n], gate_up[..., 0::2])
        np.testing.assert_array_equal(layer["w3"][n], gate_up[..., 1::2])
        np.testing.assert_array_equal(layer["w2"][n], block.mlp.experts.down_proj.detach().numpy())
    ids = np.random.default_rng(8).integers(3, config.vocab_size, (2, 13))
    want = hf_logits(theirs, ids)[0]
    np.testing.assert_allclose(np.asarray(model.forward(config, params, ids)[0]), want, atol=1e-4, rtol=0)
    hf.save(tmp_path / "out", config, params)
    assert not any(k.endswith(("_blocks", "_scales")) for k in _tensors(tmp_path / "out"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    np.testing.assert_array_equal(hf_logits(reloaded, ids)[0], want)


def test_gradients_equal_torch_autograd(case, tmp_path):
    """d(sum of the label log-probs)/d(every weight), the sinks, router bias and expert biases included, against
    torch's autograd through GptOssForCausalLM; jsmaug's gradient tree is exported with hf.save so each tensor is
    compared under its HF name."""
    _, torch_model, config, params = case
    ids = np.random.default_rng(1).integers(3, config.vocab_size, (2, 14))
    mask = np.ones_like(ids)
    mask[0, 10:] = 0
    want = assert_grads_equal_torch(tmp_path, torch_model, config, params, ids, mask)
    assert float(np.abs(want["model.layers.0.self_attn.sinks"]).min()) > 0


def test_greedy_generation_equals_hf_generate(case):
    """decoder.decode (the KV cache, each layer's window over its slots, the sinks) against HF's generate, past the
    window of 4 in prompts and new tokens."""
    import torch

    _, torch_model, config, params = case
    assert not gen.fast_step_applies(config)
    prompts = [[1, 5, 9, 33, 12, 7, 40, 3], [1, 40, 41]]
    ours = gen.generate(config, params, prompts, gen.SamplingConfig(max_new_tokens=8, eos_id=None))
    ids, mask = gen.left_pad(prompts, 1)
    out = torch_model.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                               max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert ours == out[:, ids.shape[1]:].tolist()


def test_tied_embeddings_give_transformers_logits_and_an_identical_round_trip(tmp_path):
    path = tmp_path / "tied"
    torch_model = make_checkpoint(path, seed=1, tie_word_embeddings=True, num_hidden_layers=2, layer_types=[SL, FULL])
    config, params = hf.load(path)
    assert config.tie_word_embeddings and "lm_head" not in params
    ids = np.random.default_rng(2).integers(3, config.vocab_size, (2, 12))
    np.testing.assert_allclose(np.asarray(model.forward(config, params, ids)[0]), hf_logits(torch_model, ids)[0],
                               atol=1e-4, rtol=0)
    hf.save(tmp_path / "out", config, params)
    a, b = _tensors(path), _tensors(tmp_path / "out")
    assert set(a) == set(b) and "lm_head.weight" not in b
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)


@pytest.mark.parametrize("family", ["gpt_oss", "mixtral"])
def test_rmsnorm_in_bfloat16_rounds_as_the_familys_hf_norm(family):
    """In bfloat16 gpt-oss's RMSNorm multiplies by its weight in float32 and casts after (GptOssRMSNorm), where
    Mixtral's (like Llama's) casts first and multiplies in bfloat16: each of jsmaug's norms equals its family's HF
    norm bit for bit, and the two orders give different bits on these values (so the test tells them apart)."""
    import torch
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRMSNorm
    from transformers.models.mixtral.modeling_mixtral import MixtralRMSNorm

    from jsmaug.models.weights import RMSNorm, rms_norm

    rng = np.random.default_rng(3)
    x = torch.as_tensor(rng.normal(size=(4, 7, 96)) * 3, dtype=torch.float32).to(torch.bfloat16)
    w = torch.as_tensor(1 + rng.normal(size=96) * 0.3, dtype=torch.float32).to(torch.bfloat16)
    hf_norm = (GptOssRMSNorm if family == "gpt_oss" else MixtralRMSNorm)(96, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        hf_norm.weight.copy_(w)
        want = hf_norm(x).float().numpy()
    config = cfg_lib.tiny(model_type=family, hidden_size=96, rms_norm_eps=1e-5)
    assert config.norm_weight_in_float32 == (family == "gpt_oss")
    xj, wj = jnp.asarray(x.float().numpy(), jnp.bfloat16), jnp.asarray(w.float().numpy(), jnp.bfloat16)
    got = RMSNorm(config).apply({"params": {"weight": wj}}, xj)  # the layer's norm, as the model builds it
    other = rms_norm(xj, wj, 1e-5, weight_in_float32=not config.norm_weight_in_float32)
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)), want)
    assert (np.asarray(other.astype(jnp.float32)) != want).mean() > 0.01
