"""PEFT export of gpt-oss adapters (jsmaug/hf/peft.py): the experts are 3-D parameters in transformers
(`mlp.experts.gate_up_proj` (E, D, 2F) with gate/up interleaved, `down_proj` (E, F, D)), which PEFT adapts through
`target_parameters` (lora.ParamWrapper). `PeftModel.from_pretrained(hf_base, folder)` gives the logits of
transformers' own load of jsmaug's merged export, PEFT's merge equals that export tensor by tensor, and the keys and
shapes are those PEFT itself writes for the same LoraConfig: with adapters on attention and every expert (gate and
up both: one rank-2r adapter on gate_up_proj), on gate alone (rank r, up's columns zero), and on attention alone."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jsmaug.hf import peft as peft_export

from tests import test_gpt_oss as gpt_oss_fixtures
from tests.test_peft_export import _check_merged_weights, _lora_workdir, _peft_vs_merged, converted

SL, FULL = gpt_oss_fixtures.SL, gpt_oss_fixtures.FULL
GATE_UP, DOWN = "mlp.experts.gate_up_proj", "mlp.experts.down_proj"


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny gpt-oss saved by transformers, every switch on (sinks, biases, sliding window 4 < the 10 tokens, the
    clamp reached), two layers; and its converter checkpoint (shared by the cases)."""
    path = tmp_path_factory.mktemp("gpt_oss_hf")
    gpt_oss_fixtures.make_checkpoint(path / "hf", num_hidden_layers=2, layer_types=[SL, FULL])
    return path / "hf", converted(path, path / "hf")


def _peft_keys(hf_dir, written: dict) -> dict[str, tuple[int, ...]]:
    """The keys and shapes PEFT writes for the LoraConfig of `written` (an adapter_config.json)."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    fields = ("r", "lora_alpha", "target_modules", "target_parameters", "rank_pattern", "alpha_pattern")
    fresh = get_peft_model(AutoModelForCausalLM.from_pretrained(hf_dir), LoraConfig(**{k: written[k] for k in fields}))
    return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(fresh).items()}


@pytest.mark.parametrize("targets, modules, params, gate_up_rank", [
    (("q_proj", "v_proj", "o_proj", "w1", "w3", "w2"), ["o_proj", "q_proj", "v_proj"], [GATE_UP, DOWN], 8),
    (("k_proj", "gate_proj"), ["k_proj"], [GATE_UP], 4),
    (("q_proj", "k_proj", "v_proj", "o_proj"), ["k_proj", "o_proj", "q_proj", "v_proj"], None, None),
], ids=["attention_and_every_expert", "gate_alone", "attention_only"])
def test_peft_loads_gpt_oss_adapters_as_the_merged_export(tmp_path, base, targets, modules, params, gate_up_rank):
    from safetensors.numpy import load_file

    hf_dir, conv = base
    wd, _ = _lora_workdir(tmp_path, hf_dir, targets, rank=4, alpha=8.0, conv=conv)
    ours, merged, base, (peft_model, merged_model), summary = _peft_vs_merged(tmp_path, hf_dir, wd)
    np.testing.assert_allclose(ours, merged, rtol=1e-4, atol=1e-4)
    assert np.abs(ours - base).max() > 1e-2  # the adapters are applied
    written = json.loads((tmp_path / "peft" / peft_export.ADAPTER_CONFIG).read_text())
    assert (written["r"], written["lora_alpha"]) == (4, 8)
    assert written["target_modules"] == modules and written["target_parameters"] == params
    # gate and up both adapted: one adapter of rank 2r and alpha 2 alpha on gate_up_proj (the same scaling).
    want_pattern = {GATE_UP: 8} if gate_up_rank == 8 else {}
    assert written["rank_pattern"] == want_pattern
    assert written["alpha_pattern"] == {k: 16 for k in want_pattern}
    tensors = load_file(tmp_path / "peft" / peft_export.ADAPTER_WEIGHTS)
    assert {k: v.shape for k, v in tensors.items()} == _peft_keys(hf_dir, written)
    assert summary["tensors"] == len(tensors)
    if params:
        experts = peft_model.base_model.model.model.layers[1].mlp.experts
        wrapper = experts if len(params) == 1 else experts.base_layer  # gate_up_proj's: the inner one of two
        assert wrapper.parameter_name == "gate_up_proj" and wrapper.r["default"] == gate_up_rank
        assert wrapper.scaling["default"] == 8.0 / 4
    adapted = tuple(f"{m}.weight" for m in modules) + tuple(p.removeprefix("mlp.") for p in params or ())
    n_layers = 2
    assert _check_merged_weights(peft_model, merged_model, hf_dir, adapted) == n_layers * len(adapted)
    if gate_up_rank == 4:  # gate alone: up's columns (the odd ones) of the merged gate_up_proj are the base's
        from transformers import AutoModelForCausalLM

        key = "model.layers.0.mlp.experts.gate_up_proj"
        before = AutoModelForCausalLM.from_pretrained(hf_dir).state_dict()[key].numpy()
        after = merged_model.state_dict()[key].numpy()
        np.testing.assert_array_equal(after[..., 1::2], before[..., 1::2])
        assert (np.abs(after[..., 0::2] - before[..., 0::2]).max(axis=(1, 2)) > 1e-3).all()  # every expert's gate
