"""`jsmaug convert --quantize` (issue 41): a converter checkpoint holding a QLoRA base already quantized.

The packed values and scales equal `lora.quantize_base` of the unquantized conversion bit for bit (nf4 through the
CLI, int8 and int4 in chunks through `hf.load`); on disk the quantized params are about 1/8 of float32 (4 bits plus a
bfloat16 scale per group); a QLoRA run from it restores the packed base onto the plan's shardings, bit for bit the
base of the run that starts from the float conversion and quantizes in place (slow: their first two steps'
metrics are equal); a run
whose lora.base_quant / group differ, or a full fine-tune or `load_params` without `quantized`, is refused with
one error before anything is written. One tiny transformers-made Mixtral (vocab 32000 for the run's Mixtral
tokenizer, hidden 64, head_dim 32) serves every test.
"""

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hf_fixtures import make_hf_checkpoint
from jsmaug import hf
from jsmaug.cli import convert, export
from jsmaug.models import lora, quant
from jsmaug.models.config import ConfigError
from jsmaug.train import checkpoint, plan as plan_lib, quantized_base, run as train_run, setup as run_setup
from jsmaug.train.config import load_run_config
from jsmaug.train.outputs import RunOutputs

GROUP = 32  # divides the hidden size 64, the intermediate 64 and head_dim 32 (o_proj's contracted axis)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """(HF folder, float32 conversion, nf4 conversion), each converted by the CLI."""
    root = tmp_path_factory.mktemp("convert_quant")
    make_hf_checkpoint(root / "hf", seed=3, vocab_size=32000, hidden_size=64, intermediate_size=64,
                       num_attention_heads=2, num_key_value_heads=1)
    assert convert.main(["--hf_dir", str(root / "hf"), "--out_dir", str(root / "f32")]) == 0
    assert convert.main(["--hf_dir", str(root / "hf"), "--out_dir", str(root / "nf4"), "--quantize", "nf4",
                         "--quant_group", str(GROUP)]) == 0
    return root / "hf", root / "f32", root / "nf4"


def _assert_bit_identical(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)  # QuantizedArray's static fields included
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        assert a.dtype == b.dtype and a.shape == b.shape, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))


def _quantized_paths(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=quant.is_quantized)[0]
    return {"/".join(str(k.key) for k in p) for p, x in flat if quant.is_quantized(x)}


def test_cli_nf4_checkpoint_is_quantize_base_of_the_float_conversion_bit_for_bit(ckpts):
    _, f32, nf4 = ckpts
    assert quantized_base.read_record(nf4) == {"format": "nf4", "group": GROUP, "embeddings": True,
                                               "scale_dtype": "bfloat16", "quantized_from": "float32"}
    assert quantized_base.read_record(f32) is None
    config, packed = checkpoint.load_params(nf4, quantized=True)
    _, floats = checkpoint.load_params(f32)
    _assert_bit_identical(packed, jax.jit(lambda p: lora.quantize_base(p, "nf4", GROUP))(floats))
    assert {p.split("/")[-1] for p in _quantized_paths(packed)} == {
        "embed_tokens", "lm_head", "q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3"}
    assert checkpoint.read_model_config(nf4) == config  # the architecture reads the same either way


def test_hf_load_int8_and_chunked_int4_are_quantize_base_bit_for_bit(ckpts, monkeypatch):
    """int4 in chunks of 32768 values: the (32000, 64) tables are quantized 512 rows at a time, along an axis their
    groups do not cross, and still give quantize_base's bits."""
    from jsmaug.hf import quantized

    hf_dir, _, _ = ckpts
    _, floats = hf.load(hf_dir, dtype="bfloat16")  # quantized from the bf16 values, as --dtype bfloat16 does
    _, packed = hf.load(hf_dir, dtype="bfloat16", quantize="int8")
    _assert_bit_identical(packed, jax.jit(lambda p: lora.quantize_base(p, "int8"))(floats))
    monkeypatch.setattr(quantized, "CHUNK_VALUES", 1 << 15)
    _, packed = hf.load(hf_dir, dtype="bfloat16", quantize="int4", quant_group=16)
    _assert_bit_identical(packed, jax.jit(lambda p: lora.quantize_base(p, "int4", 16))(floats))


def test_hf_load_nf4_onto_a_mesh_gives_each_packed_leaf_the_fitted_sharding_of_its_weight(ckpts):
    """`hf.load(quantize=, mesh=)`: the same bits as quantize_base of the float load, each packed leaf and its
    scales on `quant.fit_sharding` of the float weight's sharding (fsdp 4 x tensor 2 on the 8 test devices)."""
    from jsmaug.parallel import sharding as shd

    hf_dir, _, _ = ckpts
    mesh_cfg = shd.MeshConfig(data=1, fsdp=4, tensor=2)
    config, floats = hf.load(hf_dir)
    mesh = shd.make_mesh(mesh_cfg, config)
    want_sh = shd.param_shardings(config, mesh, mesh_cfg)
    _, packed = hf.load(hf_dir, quantize="nf4", quant_group=GROUP, mesh=mesh)
    _assert_bit_identical(packed, jax.jit(lambda p: lora.quantize_base(p, "nf4", GROUP))(floats))
    placed = 0
    for (path, q), sh in zip(jax.tree_util.tree_flatten_with_path(packed, is_leaf=quant.is_quantized)[0],
                             jax.tree.leaves(want_sh)):
        if quant.is_quantized(q):
            fit = quant.fit_sharding(q, sh)
            assert q.packed.sharding.is_equivalent_to(fit.packed, q.packed.ndim), jax.tree_util.keystr(path)
            assert q.scales.sharding.is_equivalent_to(fit.scales, q.scales.ndim), jax.tree_util.keystr(path)
            placed += len(q.packed.sharding.device_set) == 8 and not q.packed.sharding.is_fully_replicated
    assert placed >= 5  # the projections are really split over the mesh, not all left whole


def _disk_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def test_packed_projections_are_an_eighth_of_float32_in_memory_and_on_disk(ckpts):
    _, f32, nf4 = ckpts
    _, packed = checkpoint.load_params(nf4, quantized=True)
    w1 = packed["layers"]["layer"]["block_sparse_moe"]["w1"]  # (L, E, D, F) = (2, 4, 64, 64) in groups of 32 on D
    assert w1.packed.shape == (2, 4, 32, 64) and w1.packed.dtype == np.uint8 and w1.scales.shape == (2, 4, 2, 64)
    projections = [x for p, x in jax.tree_util.tree_flatten_with_path(packed, is_leaf=quant.is_quantized)[0]
                   if quant.is_quantized(x)]
    float_bytes = sum(4 * math.prod(x.packed.shape[:-len(x.shape)] + x.shape) for x in projections)
    packed_bytes = sum(x.packed.nbytes for x in projections)
    scale_bytes = sum(x.scales.nbytes for x in projections)
    assert packed_bytes * 8 == float_bytes and scale_bytes * 64 == float_bytes  # 4 bits + 16 bits / 32 values
    # On disk: everything but the norms and the routers is quantized; Orbax's own files are a small overhead.
    ratio = _disk_bytes(nf4 / "params") / _disk_bytes(f32 / "params")
    assert 0.12 < ratio < 0.16, ratio


def _cfg(tmp_path, name, init_from, *overrides):
    cfg, _ = load_run_config("configs/tiny_dpop.yaml", [
        "train.steps=2", "data.max_length=64", "data.max_prompt_length=32", "log.eval_every=0", "data.eval_path=null",
        f"init_from={init_from}", "lora.rank=4", f"workdir={tmp_path / name}", *overrides])
    return cfg


def _two_steps(setup, run_data, base):
    """The metrics of two steps from the setup's initial state with `base` as the frozen base (and reference)."""
    state, metrics = jax.tree.map(jnp.copy, setup.state), []  # the step donates its state
    for i in range(2):
        batch = setup.place(run_data.train[i * 8:(i + 1) * 8], setup.train_ref, 1)
        state, m = setup.plan.step(state, batch, base, jnp.asarray(False))
        metrics.append({k: float(v) for k, v in m.items() if np.ndim(v) == 0})
    return metrics


QUANT_ARGS = ["lora.base_quant=nf4", f"lora.base_quant_group={GROUP}", "train.warmup_steps=0"]


def test_qlora_base_from_the_quantized_checkpoint_is_the_in_place_quantized_base_on_the_plans_shardings(
        ckpts, tmp_path):
    """The run's own plan and `lora_setup`, no step compiled: from the nf4 checkpoint (restored packed) and from the
    float conversion (quantized in place), the same adapters and the same base bits on the same shardings."""
    _, f32, nf4 = ckpts
    cfg_f32, cfg_nf4 = _cfg(tmp_path, "in_place", f32, *QUANT_ARGS), _cfg(tmp_path, "restored", nf4, *QUANT_ARGS)
    config = run_setup.model_config(cfg_nf4)
    assert config == run_setup.model_config(cfg_f32)
    plan = plan_lib.plan(cfg_nf4, config=config)
    adapters_f32, base_f32 = run_setup.lora_setup(cfg_f32, plan)
    adapters, base = run_setup.lora_setup(cfg_nf4, plan)
    _assert_bit_identical(adapters, adapters_f32)
    _assert_bit_identical(base, base_f32)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(base)[0], jax.tree.leaves(plan.ref_sh)):
        assert a.sharding == b, jax.tree_util.keystr(path)


@pytest.mark.slow
def test_qlora_run_from_the_quantized_checkpoint_equals_the_run_that_quantizes_in_place(ckpts, tmp_path):
    """Two DPOP steps with either base through one compiled step (the run from the float conversion is built
    whole; the nf4 run's base is set up on its plan, the same model config). 30-43 s on the 2-core machine
    under load (mostly compiling the step): slow. The fast test above already shows the base bits are equal."""
    _, f32, nf4 = ckpts
    cfg_f32, cfg_nf4 = _cfg(tmp_path, "in_place", f32, *QUANT_ARGS), _cfg(tmp_path, "restored", nf4, *QUANT_ARGS)
    run_data = train_run.load_data(cfg_f32)
    setup = run_setup.build(cfg_f32, run_data, RunOutputs(cfg_f32.workdir, writer=True))
    _, base = run_setup.lora_setup(cfg_nf4, setup.plan)
    in_place, restored = _two_steps(setup, run_data, setup.ref_params), _two_steps(setup, run_data, base)
    assert in_place[0]["loss/preference"] == pytest.approx(math.log(2), abs=1e-6)  # B = 0 at step 1
    assert in_place[1]["loss/preference"] != pytest.approx(math.log(2), abs=1e-4)  # step 2 moved
    for a, b in zip(in_place, restored):
        for k in ("loss", "logps/chosen", "logps/rejected", "rewards/margins"):
            assert b[k] == pytest.approx(a[k], abs=1e-6, rel=1e-6), k


@pytest.mark.parametrize("overrides,match", [
    (["lora.base_quant=int4", f"lora.base_quant_group={GROUP}"],
     r"its base is quantized to nf4 in groups of 32 \(quantization.json\), but this run asks lora.base_quant: "
     r"int4, lora.base_quant_group: 32; set lora.base_quant: nf4"),
    (["lora.base_quant=nf4", "lora.base_quant_group=16"],
     r"but this run asks lora.base_quant: nf4, lora.base_quant_group: 16; .* or convert again with --quantize nf4 "
     r"--quant_group 16"),
    (["lora.base_quant=none"], r"a frozen base for QLoRA only .* this run has lora.base_quant: none"),
])
def test_a_qlora_run_whose_quantization_differs_is_refused_before_anything_is_written(ckpts, tmp_path, overrides,
                                                                                       match):
    _, _, nf4 = ckpts
    cfg = _cfg(tmp_path, "w", nf4, *overrides)
    with pytest.raises(ConfigError, match=f"init_from {nf4}: .*{match}"):
        train_run.run(cfg, {})
    assert list((tmp_path / "w").rglob("*")) == []  # at most the empty workdir the writability probe made


def test_full_fine_tune_export_and_plain_loads_of_a_quantized_checkpoint_are_refused(ckpts, tmp_path, capsys):
    _, _, nf4 = ckpts
    cfg = _cfg(tmp_path, "w", nf4, "lora.rank=0")
    with pytest.raises(checkpoint.CheckpointError, match=f"{nf4}: holds a base quantized to nf4 in groups of 32 by "
                                                         "`jsmaug convert --quantize`.*a frozen base for QLoRA only"):
        train_run.run(cfg, {})
    assert list((tmp_path / "w").rglob("*")) == []
    with pytest.raises(checkpoint.CheckpointError, match="convert the HF folder without --quantize"):
        checkpoint.load_params(nf4)  # export, eval and compare_losses load this way
    assert export.main(["--ckpt_dir", str(nf4), "--out_dir", str(tmp_path / "exp"), "--no_tokenizer"]) == 2
    assert "a frozen base for QLoRA only" in capsys.readouterr().err and not (tmp_path / "exp").exists()


def test_a_group_that_does_not_divide_a_weight_is_refused_before_anything_is_written(ckpts, tmp_path, capsys):
    hf_dir, _, _ = ckpts
    assert convert.main(["--hf_dir", str(hf_dir), "--out_dir", str(tmp_path / "o"), "--quantize", "int4",
                         "--quant_group", "24"]) == 2
    assert "--quantize int4 --quant_group 24:" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_export_of_a_qlora_workdir_from_the_quantized_checkpoint(ckpts, tmp_path):
    """A one-step QLoRA run from the nf4 checkpoint: its own export (the in-memory packed base, dequantized, plus
    the adapters) equals `load_params` of its workdir, which loads the named init_from packed (no refusal). About
    50 s on the loaded 2-core machine (a whole run): slow."""
    _, _, nf4 = ckpts
    cfg, raw = load_run_config("configs/tiny_dpop.yaml", [
        "train.steps=1", "data.max_length=64", "data.max_prompt_length=32", "log.eval_every=0",
        "data.eval_path=null", f"init_from={nf4}", "lora.rank=4", *QUANT_ARGS, "checkpoint.every=1",
        f"workdir={tmp_path / 'w'}"])
    train_run.run(cfg, raw)
    _, exported = hf.load(tmp_path / "w" / "hf")
    _, merged = checkpoint.load_params(tmp_path / "w")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), merged, exported)
