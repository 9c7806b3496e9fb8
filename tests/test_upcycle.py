"""Sparse upcycling (jsmaug/hf/upcycle.py, `jsmaug upcycle`): a tiny random dense checkpoint made by transformers
-> an HF Mixtral folder that transformers' MixtralForCausalLM loads with the dense model's logits (the
renormalised top-k of identical experts is the dense MLP), jsmaug's log-probs equal the dense model's, DPOP
trains it (and the experts then part ways); what Mixtral cannot express is refused with nothing written."""

import json

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jsmaug import hf
from jsmaug.cli import upcycle as cli
from jsmaug.data import batches as data
from jsmaug.hf import upcycle as up
from jsmaug.hf.read import Reader
from jsmaug.models.config import ConfigError
from jsmaug.train import step
from jsmaug.train.config import LossSection, TrainSection

_BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
DENSE = {  # name: (transformers config class, overrides)
    "llama3_rope": ("LlamaConfig", dict(rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    "llama_tied": ("LlamaConfig", dict(tie_word_embeddings=True)),
    "mistral_window": ("MistralConfig", dict(sliding_window=5, head_dim=16)),
}


def _tokenizer(folder):
    """A small word-level tokenizer.json (+ tokenizer_config.json) saved by transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(40)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(folder)


def _dense(name, path, seed=0):
    import torch
    import transformers

    cls, overrides = DENSE[name]
    torch.manual_seed(seed)
    hf_config = getattr(transformers, cls)(**dict(_BASE, **overrides))
    hf_config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(hf_config).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif pname.endswith(("q_proj.weight", "k_proj.weight")):  # sharp attention: RoPE and window matter
                p.mul_(10.0)
    model.save_pretrained(path)
    _tokenizer(path)
    return model


def _logits(model, ids, mask):
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask)).logits.float().numpy()


IDS = np.random.default_rng(0).integers(3, 96, (2, 12)).astype(np.int64)
MASK = np.ones_like(IDS)
MASK[1, 9:] = 0


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("upcycle")
    return {name: (root / name, _dense(name, root / name)) for name in DENSE}


@pytest.mark.parametrize("name, experts, top_k, untie", [
    ("llama3_rope", 8, 2, False), ("llama_tied", 4, 3, False), ("llama_tied", 4, 1, True),
    ("mistral_window", 8, 2, False)])
def test_transformers_loads_the_upcycled_mixtral_with_the_dense_logits(made, tmp_path, capsys, name, experts, top_k,
                                                                       untie):
    from transformers import AutoModelForCausalLM, MixtralForCausalLM

    dense_dir, dense = made[name]
    out = tmp_path / "moe"
    argv = ["--hf_dir", str(dense_dir), "--out_dir", str(out), "--experts", str(experts), "--top_k", str(top_k),
            "--seed", "3", "--router_std", "0.5"] + (["--untie"] if untie else [])
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    moe = AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert isinstance(moe, MixtralForCausalLM)
    config_json = json.loads((out / "config.json").read_text())
    assert (config_json["num_local_experts"], config_json["num_experts_per_tok"],
            config_json["model_type"]) == (experts, top_k, "mixtral")
    np.testing.assert_allclose(_logits(moe, IDS, MASK), _logits(dense, IDS, MASK), atol=1e-4, rtol=0)
    # The tensors: every expert is the dense MLP bit for bit, the router is the seeded random one.
    r, d = Reader(out), Reader(dense_dir)
    for n in range(2):
        for w, proj in (("w1", "gate_proj"), ("w3", "up_proj"), ("w2", "down_proj")):
            src = d.get(f"model.layers.{n}.mlp.{proj}.weight")
            for e in range(experts):
                np.testing.assert_array_equal(r.get(f"model.layers.{n}.block_sparse_moe.experts.{e}.{w}.weight"), src)
        router = r.get(f"model.layers.{n}.block_sparse_moe.gate.weight")
        np.testing.assert_array_equal(router, up.router_weight(3, n, experts, 32, 0.5))
        assert abs(float(router.std()) - 0.5) < 0.15
    tied = name == "llama_tied" and not untie
    assert ("lm_head.weight" in r.keys()) == (not tied) and config_json["tie_word_embeddings"] == tied
    if untie:
        np.testing.assert_array_equal(r.get("lm_head.weight"), d.get("model.embed_tokens.weight"))
        assert "--untie wrote lm_head.weight as a copy" in printed
    # The dense folder's tokenizer files, byte for byte.
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / f).read_bytes() == (dense_dir / f).read_bytes(), f


def _examples(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p, c, r = (rng.integers(3, 96, rng.integers(2, 7)).astype(np.int32) for _ in range(3))
        out.append({"prompt": np.concatenate([[1], p]).astype(np.int32), "chosen": np.append(c, 2).astype(np.int32),
                    "rejected": np.append(r, 2).astype(np.int32)})
    return out


def test_jsmaug_scores_the_upcycled_model_as_the_dense_one_and_dpop_trains_it(made, tmp_path):
    dense_dir, _ = made["llama3_rope"]
    out = tmp_path / "moe"
    summary = up.upcycle(dense_dir, out, num_experts=8, top_k=2, seed=0, router_std=0.02)
    assert summary["tensors"] == 2 * (6 + 1 + 3 * 8) + 3  # norms + attention, router, experts; embed, norm, head
    dense_config, dparams = hf.load(dense_dir)
    moe_config, mparams = hf.load(out)
    assert moe_config.model_type == "mixtral" and moe_config.num_local_experts == 8 and moe_config.norm_topk_prob
    assert ((moe_config.rope_type, moe_config.rope_factor) == (dense_config.rope_type, dense_config.rope_factor)
            == ("llama3", 8.0))
    batch = step.unpair(data.collate(_examples(4), (16, 24)))
    moe_config = moe_config.replace(moe_impl="dense", router_aux_loss_coef=0.02)
    dense_lp = jax.jit(lambda p: step.policy_logps(dense_config, p, batch)[0].logps)(dparams)
    moe_lp = jax.jit(lambda p: step.policy_logps(moe_config, p, batch)[0].logps)(mparams)
    np.testing.assert_allclose(np.asarray(moe_lp), np.asarray(dense_lp), atol=1e-4, rtol=0)
    assert float(jnp.min(dense_lp)) < -10  # real completions, not empty rows

    opt, _ = step.make_optimizer(TrainSection(steps=4, learning_rate=1e-2, warmup_steps=0, schedule="constant"))
    loss = LossSection(type="dpop", beta=0.3, dpop_lambda=5.0)
    fn = jax.jit(lambda s, b, r: step.train_step(s, b, r, config=moe_config, loss_cfg=loss, optimizer=opt))
    ref = jax.tree.map(lambda x: jnp.array(x, copy=True), mparams)
    state = step.TrainState(mparams, opt.init(mparams), jnp.int32(0), jnp.int32(0),
                            jax.random.key_data(jax.random.key(0)))
    full = data.collate(_examples(4), (16, 24))
    losses = []
    for _ in range(2):
        state, m = fn(state, full, ref)
        losses.append(float(m["loss/preference"]))
        assert int(m["applied"]) == 1 and np.isfinite(float(m["loss"]))
        np.testing.assert_allclose(float(m["loss"]), losses[-1] + 0.02 * float(m["moe/aux_loss"]), rtol=1e-5)
    np.testing.assert_allclose(losses[0], np.log(2.0), rtol=1e-5)  # policy == reference at the start
    assert losses[1] < losses[0]
    w1 = np.asarray(state.params["layers"]["layer"]["block_sparse_moe"]["w1"])  # (L, E, D, F)
    assert np.abs(w1[:, 0] - w1[:, 1]).max() > 1e-4  # each expert got its own gradient: they part ways


def _config_only(folder, cls, **kw):
    import transformers

    getattr(transformers, cls)(**dict(_BASE, **kw)).save_pretrained(folder)


@pytest.mark.parametrize("cls, kw, message", [
    ("Qwen2Config", {}, "model_type 'qwen2' (q/k/v biases always): the dense model has q/k/v projection biases"),
    ("LlamaConfig", dict(attention_bias=True), "attention_bias=true: the dense model has q/k/v/o projection"),
    ("Qwen3Config", {}, "model_type 'qwen3' has q/k RMSNorms"),
    ("MixtralConfig", dict(num_local_experts=4), "model_type 'mixtral' already has experts (4)"),
])
def test_what_mixtral_cannot_express_is_refused_and_nothing_is_written(tmp_path, capsys, cls, kw, message):
    _config_only(tmp_path / "dense", cls, **kw)
    out = tmp_path / "moe"
    assert cli.main(["--hf_dir", str(tmp_path / "dense"), "--out_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(tmp_path / "dense" / "config.json") in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]  # no out_dir, no temporary folder


def test_bad_arguments_and_folders_are_named(made, tmp_path):
    dense_dir, _ = made["llama_tied"]
    with pytest.raises(hf.CheckpointError, match=r"top_k=3: must be in 1..experts=2"):
        up.upcycle(dense_dir, tmp_path / "a", num_experts=2, top_k=3)
    with pytest.raises(hf.CheckpointError, match="router_std=-1.0"):
        up.upcycle(dense_dir, tmp_path / "a", router_std=-1.0)
    with pytest.raises(hf.CheckpointError, match="is the dense checkpoint itself"):
        up.upcycle(dense_dir, dense_dir, overwrite=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(hf.CheckpointError, match="exists and is not empty"):
        up.upcycle(dense_dir, tmp_path / "full")
    # An unsupported rope_type is named by the config reader, before any tensor is read.
    _config_only(tmp_path / "yarn", "LlamaConfig", rope_parameters=dict(rope_type="dynamic", rope_theta=1e4, factor=2.0))
    with pytest.raises(ConfigError, match=r"config.json: rope_type 'dynamic' is not supported"):
        up.upcycle(tmp_path / "yarn", tmp_path / "b")
    # A dense folder with a missing tensor: named, nothing written.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((dense_dir / "config.json").read_bytes())
    from safetensors.numpy import load_file, save_file

    tensors = load_file(dense_dir / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors")
    with pytest.raises(hf.CheckpointError, match=r"missing .* first: model.layers.1.mlp.up_proj.weight"):
        up.upcycle(broken, tmp_path / "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "full", "yarn"]
