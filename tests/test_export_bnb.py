"""`jsmaug export --quantized` (issue 41): an NF4 base written as it is, in bitsandbytes' 4-bit serialization.

bitsandbytes' own `dequantize_4bit`, reading the written codes, absmax and quant state, gives jsmaug's dequantized
weights bit for bit; transformers loads the folder as a `load_in_4bit` model (its q/k/v/o and dense MLP projections
`bnb.nn.Linear4bit`) whose logits equal jsmaug's forward with that base, for a dense and a Mixtral-shaped model
(experts, embeddings and lm_head written dequantized); an int4 base, a float checkpoint and a group bitsandbytes has
no block size for are refused before anything is written. The models are tiny (hidden 64, head_dim 32, NF4 groups of
32, bitsandbytes' smallest block). The QLoRA workdir path (base out in 4 bits, adapters out with --peft, PEFT puts
them back) is the slow test at the end.
"""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jsmaug.cli import export
from jsmaug.hf import bnb
from jsmaug.models import config as cfg_lib, decoder as model, lora, quant
from jsmaug.train import checkpoint, quantized_base

torch = pytest.importorskip("torch")
bnb_functional = pytest.importorskip("bitsandbytes.functional")

GROUP = 32
SHAPES = dict(vocab_size=96, hidden_size=64, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
              head_dim=32)
CONFIGS = {"llama": cfg_lib.tiny(model_type="llama", **SHAPES),
           "mixtral": cfg_lib.tiny(**SHAPES, num_local_experts=4, moe_capacity_factor=8.0)}
IDS = np.array([[1, 5, 9, 33, 2, 70, 41, 8, 17, 90]], np.int32)


def _base(family, fmt="nf4", group=GROUP):
    conf = CONFIGS[family]
    return conf, lora.quantize_base(model.init_params(conf, jax.random.key(4)), fmt, group)


def _converted(root, family, fmt="nf4", group=GROUP):
    """A converter checkpoint holding the quantized base, as `jsmaug convert --quantize` writes it."""
    conf, base = _base(family, fmt, group)
    out = root / f"{family}-{fmt}-{group}"
    checkpoint.save_params(out, conf, base)
    quantized_base.write_record(out, quantized_base.record(fmt, group, "float32"))
    return out, conf, base


def _dequantized(tree):
    return jax.tree.map(lambda x: x.dequantize(jnp.float32) if quant.is_quantized(x) else x, tree,
                        is_leaf=quant.is_quantized)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """family -> (export folder, model config, jsmaug base), each exported by the CLI."""
    root = tmp_path_factory.mktemp("bnb")
    out = {}
    for family in CONFIGS:
        ckpt, conf, base = _converted(root, family)
        folder = root / f"{family}-export"
        assert export.main(["--quantized", "--ckpt_dir", str(ckpt), "--out_dir", str(folder), "--no_tokenizer"]) == 0
        out[family] = folder, conf, base
    return out


def _tensors(folder):
    from safetensors.numpy import load_file
    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("family", list(CONFIGS))
def test_bitsandbytes_dequantizes_the_written_tensors_to_jsmaugs_weights_bit_for_bit(exported, family):
    folder, conf, base = exported[family]
    got = _tensors(folder)
    deq = _dequantized(base)
    layer = jax.tree.map(lambda a: np.asarray(a[1]), deq["layers"]["layer"])  # HF layer 1
    four_bit = [k for k in got if k.endswith(f".{bnb.STATE_KEY}")]
    want_4bit = {f"model.layers.{n}.self_attn.{p}_proj.weight" for n in (0, 1) for p in "qkvo"}
    if family == "llama":
        want_4bit |= {f"model.layers.{n}.mlp.{p}_proj.weight" for n in (0, 1) for p in ("gate", "up", "down")}
    assert {k[:-len(bnb.STATE_KEY) - 1] for k in four_bit} == want_4bit
    for name in sorted(want_4bit):
        state = bnb_functional.QuantState.from_dict(
            {k[len(name) + 1:]: torch.from_numpy(v) for k, v in got.items() if k.startswith(name + ".")},
            device=torch.device("cpu"))
        assert state.blocksize == GROUP and state.quant_type == "nf4" and state.nested is False, name
        w = bnb_functional.dequantize_4bit(torch.from_numpy(got[name]), state).numpy()
        if name.startswith("model.layers.1.self_attn.q_proj"):
            np.testing.assert_array_equal(w, layer["self_attn"]["q_proj"].reshape(64, -1).T)
        if name.startswith("model.layers.1.self_attn.o_proj"):  # (H, head_dim, D) -> (D, H * head_dim)
            np.testing.assert_array_equal(w, layer["self_attn"]["o_proj"].reshape(-1, 64).T)
        assert got[name].dtype == np.uint8 and got[name].shape == (w.size // 2, 1)
    # tables quantized by jsmaug go out dequantized: the values the run computed with
    np.testing.assert_array_equal(got["model.embed_tokens.weight"], np.asarray(deq["embed_tokens"]))
    if family == "mixtral":  # experts are not Linear modules in transformers 5: float, dequantized
        np.testing.assert_array_equal(got["model.layers.1.block_sparse_moe.experts.2.w1.weight"],
                                      layer["block_sparse_moe"]["w1"][2].T)
    hf_config = json.loads((folder / "config.json").read_text())
    assert hf_config["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    card = (folder / "README.md").read_text()
    assert "bitsandbytes" in card and "4-bit" in card


def test_high_nibble_holds_the_first_value_of_each_pair():
    """A hand-made (2, 32) weight: levels 15, 0, 12, 7 ... at known places, against bitsandbytes' own encoder."""
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (2, GROUP)).astype(np.uint8)
    codes[:, 0] = 15  # each block's absmax is its scale: one value at +-1 per block
    w = (quant.NF4_LEVELS[codes] * np.array([[0.5], [3.0]], np.float32)).astype(np.float32)
    packed, absmax = bnb.encode(w, GROUP, "w")
    np.testing.assert_array_equal(absmax, [0.5, 3.0])
    np.testing.assert_array_equal(packed[:, 0], (codes.reshape(-1)[0::2] << 4) | codes.reshape(-1)[1::2])
    theirs, _ = bnb_functional.quantize_4bit(torch.from_numpy(w), blocksize=GROUP, quant_type="nf4",
                                             compress_statistics=False)
    np.testing.assert_array_equal(packed, theirs.numpy())


@pytest.mark.parametrize("family", list(CONFIGS))
def test_transformers_loads_the_export_as_a_4bit_model_with_jsmaugs_logits(exported, family):
    from bitsandbytes.nn import Linear4bit
    from transformers import AutoModelForCausalLM

    folder, conf, base = exported[family]
    # Not .eval(): in eval mode on a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weight for its
    # CPU kernel in bfloat16 (`_convert_weight_packed_for_cpu`), 1e-3 off the stored weights. These models have no
    # dropout (attention_dropout 0, router jitter 0), so train mode computes the same function exactly.
    hf_model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu").train()
    assert isinstance(hf_model.model.layers[0].self_attn.q_proj, Linear4bit)
    assert isinstance(hf_model.model.layers[0].self_attn.o_proj, Linear4bit)
    with torch.no_grad():
        theirs = hf_model(torch.from_numpy(IDS).long()).logits.numpy()
    ours = np.asarray(model.forward(conf, _dequantized(base), jnp.asarray(IDS))[0])
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("fmt,group,match", [
    ("int4", GROUP, r"layers/layer/self_attn/q_proj is int4"),
    ("nf4", 16, r"NF4 groups of \[16\]; bitsandbytes' blocks"),
])
def test_a_base_bitsandbytes_cannot_hold_is_refused_before_anything_is_written(tmp_path, capsys, fmt, group, match):
    ckpt, _, _ = _converted(tmp_path, "llama", fmt, group)
    assert export.main(["--quantized", "--ckpt_dir", str(ckpt), "--out_dir", str(tmp_path / "o"),
                        "--no_tokenizer"]) == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_a_float_checkpoint_is_refused(tmp_path, capsys):
    conf = CONFIGS["llama"]
    checkpoint.save_params(tmp_path / "f", conf, model.init_params(conf, jax.random.key(4)))
    assert export.main(["--quantized", "--ckpt_dir", str(tmp_path / "f"), "--out_dir", str(tmp_path / "o"),
                        "--no_tokenizer"]) == 2
    assert "holds no quantized base" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_a_qlora_run_goes_to_pytorch_as_a_4bit_base_plus_peft_adapters(tmp_path):
    """A one-step QLoRA DPOP run from a `convert --quantize nf4` checkpoint of a transformers-made Mixtral: its base
    exported with --quantized, its adapters with --peft; transformers loads the base in 4 bits, PEFT puts the
    adapters on it (its bitsandbytes LoRA layers on the 4-bit projections, `target_parameters` on the experts), and
    the logits equal jsmaug's policy (the run's merged weights). About 60 s on the 2-core machine: slow."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from hf_fixtures import make_hf_checkpoint
    from jsmaug.cli import convert
    from jsmaug.train import run as train_run
    from jsmaug.train.config import load_run_config

    make_hf_checkpoint(tmp_path / "hf", seed=3, vocab_size=32000, hidden_size=64, intermediate_size=64,
                       num_attention_heads=2, num_key_value_heads=1)
    assert convert.main(["--hf_dir", str(tmp_path / "hf"), "--out_dir", str(tmp_path / "nf4"), "--quantize", "nf4",
                         "--quant_group", str(GROUP)]) == 0
    cfg, raw = load_run_config("configs/tiny_dpop.yaml", [
        "train.steps=1", "data.max_length=64", "data.max_prompt_length=32", "log.eval_every=0",
        "data.eval_path=null", f"init_from={tmp_path / 'nf4'}", "lora.rank=4", "lora.base_quant=nf4",
        f"lora.base_quant_group={GROUP}", "train.warmup_steps=0", "train.learning_rate=0.01", "checkpoint.every=1",
        "export_hf=false", f"workdir={tmp_path / 'w'}"])
    train_run.run(cfg, raw)
    w = str(tmp_path / "w")
    assert export.main(["--quantized", "--ckpt_dir", w, "--out_dir", str(tmp_path / "base4"), "--no_tokenizer"]) == 0
    assert export.main(["--peft", "--ckpt_dir", w, "--out_dir", str(tmp_path / "adapters")]) == 0
    base4 = AutoModelForCausalLM.from_pretrained(tmp_path / "base4", device_map="cpu")
    policy = PeftModel.from_pretrained(base4, tmp_path / "adapters").train()  # train mode: see the test above
    ids = np.array([[1, 415, 2936, 9060, 285, 1142, 28705, 28770]], np.int32)
    with torch.no_grad():
        theirs = policy(torch.from_numpy(ids).long()).logits.numpy()
    conf, merged = checkpoint.load_params(w)
    ours = np.asarray(model.forward(conf, merged, jnp.asarray(ids))[0])
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)
    conf, base, _ = bnb.load_base(w)
    plain = np.asarray(model.forward(conf, _dequantized(base), jnp.asarray(ids))[0])
    assert np.abs(plain - ours).max() > 1e-3  # the adapters moved the policy: the comparison above sees them
