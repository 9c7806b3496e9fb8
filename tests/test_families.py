"""Every supported family against transformers on the same random checkpoint (float32): logits, HF's aux loss,
per-completion log-probs, the export (identical tensors, loaded by AutoModelForCausalLM as the same class) and
greedy generation with the KV cache. The cases are in tests/family_fixtures.py; Mixtral's own are in
test_model.py, test_hf.py and test_generate.py."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from family_fixtures import CASES, MOE_CASES, hf_logits, make_checkpoint
from safetensors import safe_open

from jsmaug.models import families
from jsmaug import hf
from jsmaug.data import batches as data
from jsmaug.models import decoder as model, generate as gen, logps as logps_lib

fwd = jax.jit(model.forward, static_argnums=0)
MODEL_TYPES = {"llama3_tied": "llama", "llama_linear_legacy": "llama", "mistral_window": "mistral",
               "qwen2_bias": "qwen2", "qwen3_qknorm": "qwen3", "qwen3_moe_mixed": "qwen3_moe", "olmoe": "olmoe",
               "gemma3_local_global": "gemma3_text"}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    torch_model = make_checkpoint(request.param, path, seed=sorted(CASES).index(request.param))
    config, params = hf.load(path)
    return request.param, path, torch_model, config, params


def _pairs(vocab, n=2, seed=0):
    rng = np.random.default_rng(seed)
    return [{"prompt": np.r_[1, rng.integers(3, vocab, rng.integers(2, 6))].astype(np.int32),
             "chosen": np.r_[rng.integers(3, vocab, rng.integers(2, 8)), 2].astype(np.int32),
             "rejected": np.r_[rng.integers(3, vocab, rng.integers(2, 8)), 2].astype(np.int32)} for _ in range(n)]


def test_logits_aux_and_completion_logps_equal_transformers(case):
    import torch

    name, _, torch_model, config, params = case
    assert config.model_type == MODEL_TYPES[name] and config.is_moe == (name in MOE_CASES)
    batch = data.collate(_pairs(config.vocab_size), (16,))  # right-padded rows of different lengths
    mask = (batch["segment_ids"] > 0).astype(np.int64)
    want, want_aux = hf_logits(torch_model, batch["input_ids"], mask, output_router_logits=config.is_moe)
    got, aux = fwd(config, params, batch["input_ids"], mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(got)[valid], want[valid], atol=1e-4, rtol=0, err_msg=name)
    if config.is_moe:  # HF's load_balancing_loss_func over the sparse layers, padding excluded
        np.testing.assert_allclose(float(aux), want_aux, atol=1e-5, rtol=0, err_msg=name)
    else:
        assert float(aux) == 0.0
    # Per-completion log-probs (jsmaug.models.logps on our logits) against log_softmax of transformers' logits.
    lp = torch.log_softmax(torch.as_tensor(want), -1).numpy()
    want_logps = (np.take_along_axis(lp, batch["labels"][..., None], -1)[..., 0] * batch["loss_mask"]).sum(-1)
    got_logps, _ = logps_lib.sequence_logps(got, jnp.asarray(batch["labels"]), jnp.asarray(batch["loss_mask"]))
    np.testing.assert_allclose(np.asarray(got_logps), want_logps, atol=1e-4, rtol=0, err_msg=name)


def _tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="np") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def test_round_trip_is_identical_and_transformers_loads_the_export(case, tmp_path):
    from transformers import AutoModelForCausalLM

    name, path, torch_model, config, params = case
    hf.save(tmp_path / "out", config, params)
    a, b = _tensors(path), _tensors(tmp_path / "out")
    assert set(a) == set(b), set(a) ^ set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), k
    assert ("lm_head.weight" in b) == (not config.tie_word_embeddings)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    original = json.loads((path / "config.json").read_text())
    assert written["architectures"] == original["architectures"] and written["model_type"] == original["model_type"]
    assert families.from_hf_dict(written) == config  # every field comes back
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", attn_implementation="eager").eval()
    assert type(reloaded) is type(torch_model)
    ids = np.random.default_rng(3).integers(3, config.vocab_size, (2, 11))
    np.testing.assert_array_equal(hf_logits(reloaded, ids)[0], hf_logits(torch_model, ids)[0])
    if config.is_moe:  # transformers 5's in-memory layout (fused experts), as save_original_format=False writes it
        torch_model.save_pretrained(tmp_path / "fused", save_original_format=False)
        assert any(k.endswith("mlp.experts.gate_up_proj") for k in _tensors(tmp_path / "fused"))
        _, fused = hf.load(tmp_path / "fused")
        jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), fused, params)


PROMPTS = [[1, 5, 9, 33, 12, 7], [1, 40, 41], [1, 8, 8, 9, 10, 11, 12, 13]]
NEW = 8


def test_greedy_generation_equals_hf_generate(case):
    import torch

    name, _, torch_model, config, params = case
    ours = gen.generate(config, params, PROMPTS, gen.SamplingConfig(max_new_tokens=NEW, eos_id=None))
    ids, mask = gen.left_pad(PROMPTS, 1)
    out = torch_model.generate(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                               max_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert ours == out[:, ids.shape[1]:].tolist(), name


@pytest.mark.parametrize("case", ["llama3_tied"], indirect=True)
def test_tied_embedding_gets_the_sum_of_both_gradients(case):
    """One matrix: the gradient of the tied embedding equals that of an untied copy's embedding plus its
    (transposed) lm_head."""
    _, _, _, config, params = case
    assert config.tie_word_embeddings
    ids = np.random.default_rng(4).integers(3, config.vocab_size, (2, 7))

    def loss(p, c):
        return jnp.mean(jnp.sin(model.forward(c, p, ids)[0]))

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    g_tied = grad(params, config)
    untied = dict(params, lm_head=params["embed_tokens"].T)
    g_untied = grad(untied, config.replace(tie_word_embeddings=False))
    np.testing.assert_allclose(g_tied["embed_tokens"], g_untied["embed_tokens"] + g_untied["lm_head"].T,
                               atol=1e-7, rtol=1e-5)
    assert float(jnp.max(jnp.abs(g_untied["lm_head"]))) > 0 and "lm_head" not in params
