"""PEFT export (jsmaug/hf/peft.py): `PeftModel.from_pretrained(hf_base, folder)` loads a LoRA workdir's adapters
onto the HF base with logits equal to transformers' own load of jsmaug's merged export, for a dense family
(llama) and an MoE family (mixtral, adapters on every expert); the keys are those PEFT itself saves; what PEFT has
no layout for, or a checkpoint without adapters, is refused with one error and nothing written."""

from __future__ import annotations

import json

import numpy as np
import optax
import pytest

import jax
import jax.numpy as jnp

from jsmaug import hf
from jsmaug.eval import card
from jsmaug.hf import peft as peft_export
from jsmaug.models import config as cfg_lib, decoder, lora
from jsmaug.train import checkpoint, step

from tests import family_fixtures, hf_fixtures

IDS = np.array([[1, 5, 17, 42, 8, 77, 3, 60, 11, 2]], np.int64)
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def converted(root, hf_dir):
    """The converter checkpoint of `hf_dir` in root/conv, with the source record `jsmaug convert` writes."""
    config, params = hf.load(hf_dir)
    conv = root / "conv"
    checkpoint.save_params(conv, config, params)
    (conv / card.SOURCE_FILE).write_text(json.dumps(card.source_metadata(hf_dir)))
    return conv


def _lora_workdir(root, hf_dir, targets, rank=4, alpha=8.0, conv=None):
    """A training workdir as a LoRA run leaves it (step 3), its base the converter checkpoint of `hf_dir` (`conv`
    when given, else made), with random A and B (B non-zero, as after training), made without running the
    trainer."""
    conv = conv or converted(root, hf_dir)
    config = checkpoint.read_model_config(conv)
    lora_config = config.replace(lora_rank=rank, lora_alpha=alpha, lora_targets=tuple(targets))
    shapes = lora.split(decoder.param_shapes(lora_config))[1]
    adapters = lora.init_adapters(shapes, jax.random.key(1))
    leaves, tree = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    adapters = jax.tree.unflatten(tree, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    state = step.TrainState(adapters, optax.sgd(0.1).init(adapters), jnp.int32(3), jnp.int32(0),
                            jax.random.key_data(jax.random.key(0)))
    meta = {"data_position": 3, "seed": 0, "model_config": lora_config.to_dict(),
            "lora_base": {"init_from": str(conv), "seed": 0, "dtype": "float32"}}
    manager = checkpoint.Manager(root / "wd" / "checkpoints", async_save=False)
    manager.save(3, state, meta)
    manager.wait()
    return root / "wd", conv


def _logits(model):
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(IDS)).logits.float().numpy()


def _peft_vs_merged(tmp_path, hf_dir, wd):
    """(PEFT's logits, the merged export's, the base's) on IDS."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "peft"
    summary = peft_export.export_peft(wd, out, base_hf_dir=hf_dir)
    assert summary["step"] == 3 and sorted(p.name for p in out.iterdir()) == [peft_export.ADAPTER_CONFIG,
                                                                             peft_export.ADAPTER_WEIGHTS]
    config, merged = checkpoint.load_params(wd)
    hf.save(tmp_path / "merged", config, merged)
    load = lambda d: AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    base = load(hf_dir)
    base_logits = _logits(base)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    merged_model = load(tmp_path / "merged")
    return _logits(peft_model), _logits(merged_model), base_logits, (peft_model, merged_model), summary


def _check_merged_weights(peft_model, merged_model, hf_dir, adapted: tuple[str, ...]):
    """PEFT's own merge of the loaded adapters equals jsmaug's merged export, tensor by tensor, and every adapted
    tensor (names ending in `adapted`) moved from the base: no adapter was dropped or misplaced. (Logits alone
    can miss a dropped adapter whose layer barely moves them.)"""
    from transformers import AutoModelForCausalLM

    base = {k: v.numpy() for k, v in AutoModelForCausalLM.from_pretrained(hf_dir).state_dict().items()}
    theirs = {k: v.numpy() for k, v in peft_model.merge_and_unload().state_dict().items()}
    want = {k: v.numpy() for k, v in merged_model.state_dict().items()}
    assert theirs.keys() == want.keys()
    moved = 0
    for key, w in want.items():
        np.testing.assert_allclose(theirs[key], w, rtol=1e-5, atol=1e-6, err_msg=key)
        if key.endswith(adapted):
            assert np.abs(w - base[key]).max() > 1e-3, key
            moved += 1
    return moved


def test_dense_family_loads_in_peft_with_its_own_key_names(tmp_path):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    hf_dir = tmp_path / "hf"
    family_fixtures.make_checkpoint("llama3_tied", hf_dir)
    wd, _ = _lora_workdir(tmp_path, hf_dir, ALL)
    ours, merged, base, (peft_model, merged_model), summary = _peft_vs_merged(tmp_path, hf_dir, wd)
    np.testing.assert_allclose(ours, merged, rtol=1e-4, atol=1e-4)
    assert np.abs(ours - base).max() > 1e-2  # the adapters are applied
    # The config: jsmaug's scaling alpha / rank is PEFT's lora_alpha / r, on the HF projections.
    written = json.loads((tmp_path / "peft" / peft_export.ADAPTER_CONFIG).read_text())
    assert (written["r"], written["lora_alpha"], written["peft_type"]) == (4, 8, "LORA")
    assert sorted(written["target_modules"]) == sorted(ALL) and written["base_model_name_or_path"] == str(hf_dir)
    lin = peft_model.base_model.model.model.layers[1].self_attn.q_proj
    assert lin.scaling["default"] == 8.0 / 4
    assert _check_merged_weights(peft_model, merged_model, hf_dir, tuple(f"{t}.weight" for t in ALL)) == 2 * 7
    # The keys and shapes are those PEFT writes for the same LoraConfig.
    fresh = get_peft_model(AutoModelForCausalLM.from_pretrained(hf_dir), LoraConfig(r=4, target_modules=list(ALL)))
    theirs = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(fresh).items()}
    mine = {k: v.shape for k, v in load_file(tmp_path / "peft" / peft_export.ADAPTER_WEIGHTS).items()}
    assert mine == theirs and summary["tensors"] == len(theirs)


def test_mixtral_loads_in_peft_with_adapters_on_every_expert(tmp_path):
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    hf_dir = tmp_path / "hf"
    hf_fixtures.make_hf_checkpoint(hf_dir)
    # w1 without w3: PEFT fuses them on transformers 5, so w3 is written with zero factors.
    wd, _ = _lora_workdir(tmp_path, hf_dir, ("q_proj", "v_proj", "w1", "w2"))
    ours, merged, base, (peft_model, merged_model), summary = _peft_vs_merged(tmp_path, hf_dir, wd)
    np.testing.assert_allclose(ours, merged, rtol=1e-4, atol=1e-4)
    assert np.abs(ours - base).max() > 1e-2
    assert summary["target_modules"] == ["q_proj", "v_proj", "w1", "w2", "w3"]
    # Without base_hf_dir, the base is traced from the run's init_from (the converter's source.json).
    peft_export.export_peft(wd, tmp_path / "traced")
    traced = json.loads((tmp_path / "traced" / peft_export.ADAPTER_CONFIG).read_text())
    assert traced["base_model_name_or_path"] == str(hf_dir.resolve())
    tensors = load_file(tmp_path / "peft" / peft_export.ADAPTER_WEIGHTS)
    e3 = "base_model.model.model.layers.1.block_sparse_moe.experts.3."
    assert tensors[e3 + "w1.lora_A.weight"].shape == (4, 32) and tensors[e3 + "w2.lora_B.weight"].shape == (32, 4)
    assert not tensors[e3 + "w3.lora_B.weight"].any() and tensors[e3 + "w1.lora_B.weight"].any()
    # Every expert's adapter reaches transformers 5's fused experts (each expert's slice moved, as jsmaug's).
    base_sd = {k: v.numpy() for k, v in AutoModelForCausalLM.from_pretrained(hf_dir).state_dict().items()}
    down = merged_model.state_dict()["model.layers.1.mlp.experts.down_proj"].numpy()
    assert (np.abs(down - base_sd["model.layers.1.mlp.experts.down_proj"]).max(axis=(1, 2)) > 1e-3).all()
    adapted = ("q_proj.weight", "v_proj.weight", "experts.gate_up_proj", "experts.down_proj")
    assert _check_merged_weights(peft_model, merged_model, hf_dir, adapted) == 2 * 4


def test_refusals_name_the_checkpoint_and_write_nothing(tmp_path):
    hf_dir = tmp_path / "hf"
    hf_fixtures.make_hf_checkpoint(hf_dir)
    wd, conv = _lora_workdir(tmp_path, hf_dir, ("q_proj",))
    out = tmp_path / "out"
    with pytest.raises(hf.CheckpointError, match=f"{conv}: not a LoRA checkpoint"):
        peft_export.export_peft(conv, out)
    other = tmp_path / "other"
    hf_fixtures.make_hf_checkpoint(other, hidden_size=48)
    with pytest.raises(hf.CheckpointError, match=f"{other}: not the base of this LoRA run \\(hidden_size: 48"):
        peft_export.export_peft(wd, out, base_hf_dir=other)
    assert not out.exists() and not list(tmp_path.glob(".out.tmp*"))


def test_dense_mlp_layers_of_an_moe_model_have_no_peft_layout(tmp_path):
    config = cfg_lib.tiny(model_type="qwen3_moe", vocab_size=64, mlp_only_layers=(1,), lora_rank=4)
    adapters = lora.split(decoder.param_shapes(config))[1]
    with pytest.raises(peft_export.PeftLayoutError, match=r"qwen3_moe: the dense MLP layers \[1\]"):
        peft_export.save(tmp_path / "out", config, adapters)
    assert not (tmp_path / "out").exists()
    attention_only = config.replace(lora_targets=("q_proj", "v_proj"))
    keys = [k for k, _, _ in peft_export.adapter_tensors(attention_only,
                                                         lora.split(decoder.param_shapes(attention_only))[1])]
    assert keys and all(".self_attn." in k for k in keys)
