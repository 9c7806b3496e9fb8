"""QLoRA (lora.base_quant): a quantized frozen base under the adapters. The forward with the quantized base equals
the forward with its dequantized weights (dense and MoE, several dispatch paths); only the adapters learn and
the quantized base stays bit-identical; a DPOP step at init gives the no-margin loss log 2 exactly, also through
the run's own plan and setup on an 8-device mesh; the compiled step's base is a fraction of the float32 LoRA
step's; bad settings are refused before anything is built."""

import functools
import math

import numpy as np
import optax
import pytest

import jax
import jax.numpy as jnp

from test_lora import _batch  # the same small pairs (vocabulary 64)

from jsmaug.models import config as cfg_lib, logps as logps_lib, lora, decoder as model, quant
from jsmaug.models.config import ConfigError
from jsmaug.train import plan as plan_lib, run as train_run, setup as run_setup, step
from jsmaug.train.config import LossSection, load_run_config
from jsmaug.train.outputs import RunOutputs

IDS = jax.random.randint(jax.random.key(2), (2, 12), 3, 64)
MOE = cfg_lib.tiny(vocab_size=64, lora_rank=4, lora_alpha=8.0, moe_capacity_factor=8.0)
DENSE = cfg_lib.tiny(model_type="llama", vocab_size=64, lora_rank=4, lora_alpha=8.0, tie_word_embeddings=True)
PROJECTIONS = set(lora.TARGETS)
TABLES = {"embed_tokens", "lm_head"}  # quantized with the projections (lora.EMBEDDINGS)


@functools.lru_cache(maxsize=None)
def _parts(conf, fmt, group):
    base, adapters = lora.split(model.init_params(conf, jax.random.key(0)))
    trained = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), adapters)
    return base, lora.quantize_base(base, fmt, group), adapters, trained


def _dequantized(tree):
    return jax.tree.map(lambda x: x.dequantize(jnp.float32) if quant.is_quantized(x) else x, tree,
                        is_leaf=quant.is_quantized)


def _quantized_names(tree):
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=quant.is_quantized)[0]
    return {p[-1].key for p, x in flat if quant.is_quantized(x)}


@functools.partial(jax.jit, static_argnums=0)
def _logits_and_logps(conf, params):
    """The logits of IDS and the per-completion log-probs of its last 7 and 4 tokens by the trainer's kernel
    (`unembed_weight`, chunked over the completion positions), from one forward: one compile per params tree."""
    h, _, _ = model.forward_hidden(conf, params, IDS)
    mask = jnp.arange(11)[None, :] >= jnp.array([[4], [7]])
    lp = logps_lib.sequence_logps_from_hidden(h[:, :-1], model.unembed_weight(conf, params), IDS[:, 1:], mask,
                                              chunk_size=4).logps
    return model.unembed(conf, params, h), lp


@pytest.mark.parametrize("family,fmt,impl", [("llama", "nf4", None), ("mixtral", "nf4", "bucketed"),
                                             ("mixtral", "int8", "ragged")])
def test_forward_with_quantized_base_equals_its_dequantized_weights(family, fmt, impl):
    """llama tied (the embedding is also the unembedding), mixtral untied (its own quantized lm_head): logits and
    per-completion log-probs (the trainer's chunked kernel) equal those of the dequantized weights."""
    conf = DENSE if family == "llama" else MOE.replace(moe_impl=impl)
    base, qbase, _, trained = _parts(DENSE if family == "llama" else MOE, fmt, 8)
    want = (PROJECTIONS | TABLES) & {p[-1].key for p, _ in jax.tree_util.tree_flatten_with_path(base)[0]}
    assert ("lm_head" in want) == (family == "mixtral")
    assert _quantized_names(qbase) == want  # every projection and table, nothing else (norms, router)
    assert qbase["embed_tokens"].axis == 1 and (family == "llama" or qbase["lm_head"].axis == 0)  # along D
    got, lp = _logits_and_logps(conf, lora.combine(qbase, trained))
    ref, ref_lp = _logits_and_logps(conf, lora.combine(_dequantized(qbase), trained))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lp, ref_lp, rtol=1e-5, atol=1e-5)
    assert bool(jnp.all(lp < 0))
    full, _ = _logits_and_logps(conf, lora.combine(base, trained))  # the dequantized tree's compile
    err = float(jnp.max(jnp.abs(full - got)))
    assert 0 < err < 0.5 * float(jnp.max(jnp.abs(full)))  # quantized: near the base, not equal to it
    # The merged export folds the adapters into the dequantized base: the same model without adapters.
    merged, _ = jax.jit(model.forward, static_argnums=0)(
        conf.replace(lora_rank=0), lora.merge(qbase, trained, conf.lora_alpha, conf.lora_rank), IDS)
    np.testing.assert_allclose(merged, got, rtol=1e-5, atol=1e-5)


def test_only_adapters_learn_and_step_one_is_the_no_margin_loss():
    """DPOP on an nf4 base (group 8): step 1 at log 2, the base bit-identical, every adapter moved. The same
    step compiled with the float32 base gives the base's share of the compiled step's argument bytes."""
    base, qbase, adapters, _ = _parts(MOE, "nf4", 8)
    batch = _batch(1)
    loss_cfg = LossSection(type="dpop", beta=0.3, dpop_lambda=50.0)
    inputs, _, _, _, _ = step.pair_losses(adapters, qbase, batch, config=MOE, loss_cfg=loss_cfg)
    np.testing.assert_array_equal(inputs.policy_chosen_logps, inputs.reference_chosen_logps)  # exactly
    opt = optax.adam(1e-2)
    state = step.TrainState(adapters, opt.init(adapters), jnp.int32(0), jnp.int32(0),
                            jax.random.key_data(jax.random.key(0)))
    fn = jax.jit(functools.partial(step.train_step, config=MOE, loss_cfg=loss_cfg, optimizer=opt))
    compiled = {"nf4": fn.lower(state, batch, qbase).compile(), "f32": fn.lower(state, batch, base).compile()}
    before = jax.tree.map(np.asarray, qbase)
    losses = []
    for _ in range(3):
        state, m = compiled["nf4"](state, batch, qbase)
        losses.append(float(m["loss/preference"]))
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6) and losses[-1] < losses[0]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), qbase, before)
    assert jax.tree.structure(state.params) == jax.tree.structure(adapters)  # no state for the base
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state.params, adapters)
    assert all(v > 0 for v in jax.tree.leaves(moved))

    mem = {k: c.memory_analysis() for k, c in compiled.items()}
    base_f32 = sum(x.nbytes for x in jax.tree.leaves(base))
    rest = mem["f32"].argument_size_in_bytes - base_f32  # adapters, optimizer state, batch
    base_nf4 = mem["nf4"].argument_size_in_bytes - rest
    print(f"base in the compiled step: f32 {base_f32} B, nf4 {base_nf4} B, ratio {base_nf4 / base_f32:.3f}; "
          f"temp f32 {mem['f32'].temp_size_in_bytes} B, nf4 {mem['nf4'].temp_size_in_bytes} B")
    assert base_nf4 == sum(x.nbytes for x in jax.tree.leaves(qbase))  # 4 + 16 / 8 bits a projection weight
    assert base_nf4 / base_f32 < 0.3


BASE = ["train.steps=1", "data.max_length=64", "data.max_prompt_length=32", "log.eval_every=0"]


def test_run_setup_on_a_mesh_gives_the_no_margin_loss(tmp_path):
    cfg, _ = load_run_config("configs/tiny_dpop.yaml", [
        *BASE, "mesh.fsdp=4", "mesh.expert=2", "train.batch_size=8", "lora.rank=4", "lora.base_quant=nf4",
        "lora.base_quant_group=16", f"workdir={tmp_path}"])
    run_data = train_run.load_data(cfg)
    setup = run_setup.build(cfg, run_data, RunOutputs(cfg.workdir, writer=True))
    base = setup.ref_params
    assert _quantized_names(base) == {"q_proj", "k_proj", "v_proj", "o_proj", "w1", "w2", "w3", *TABLES}
    e = base["embed_tokens"]  # (V, D) along D in groups of 16, sharded like the table it replaces
    assert e.packed.shape == (32000, 32) and e.scales.shape == (32000, 4)
    assert e.packed.sharding == setup.plan.ref_sh["embed_tokens"].packed
    q = base["layers"]["layer"]["block_sparse_moe"]["w1"]  # (L, E, D, F) stored as (L, E, D / 2, F) bytes
    assert q.packed.dtype == jnp.uint8 and q.packed.shape == (2, 4, 32, 128) and q.shape == (4, 64, 128)
    assert q.packed.sharding == setup.plan.ref_sh["layers"]["layer"]["block_sparse_moe"]["w1"].packed
    batch = setup.place(run_data.train[:cfg.train.batch_size], setup.train_ref, cfg.train.micro_batches)
    _, m = setup.plan.step(setup.state, batch, setup.ref_params, jnp.asarray(False))
    assert float(m["loss/preference"]) == pytest.approx(math.log(2), abs=1e-6)


@pytest.mark.parametrize("overrides,match", [
    (["lora.base_quant=nf4"], "lora.base_quant: nf4 quantizes the frozen base of LoRA, but lora.rank is 0"),
    (["lora.rank=4", "lora.base_quant=fp4"], "lora.base_quant: unknown format 'fp4'"),
    (["lora.rank=4", "lora.base_quant=nf4", "lora.base_quant_group=7"], "lora.base_quant_group: must be an even"),
])
def test_bad_settings_are_refused_by_the_config(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_run_config("configs/tiny_dpop.yaml", [*BASE, *overrides, f"workdir={tmp_path / 'w'}"])
    assert not (tmp_path / "w").exists()


def test_a_group_that_does_not_divide_a_weight_is_refused_by_the_plan(tmp_path):
    cfg, _ = load_run_config("configs/tiny_dpop.yaml", [*BASE, "lora.rank=4", "lora.base_quant=int4",
                                                        "lora.base_quant_group=24", f"workdir={tmp_path / 'w'}"])
    with pytest.raises(ConfigError, match=r"lora.base_quant_group: (embed_tokens|layers/layer/\w+/\w+): group size 24 "
                                          r"does not divide the contracted axis"):
        plan_lib.plan(cfg, jax.devices()[:1])
    assert not (tmp_path / "w").exists()


def test_export_of_a_qlora_workdir_folds_the_adapters_into_the_quantized_base(tmp_path):
    """The run's own export (the quantized base it trained on, dequantized, plus the adapters) and `jsmaug export`
    of its workdir (the checkpoint names the base and its quantization; the base is rebuilt and quantized the same
    way) hold the same weights, which differ from folding the adapters into the unquantized base."""
    from jsmaug import hf
    from jsmaug.train import checkpoint

    cfg, raw = load_run_config("configs/tiny_dpop.yaml", [
        *BASE, "train.steps=2", "lora.rank=4", "lora.base_quant=nf4", "lora.base_quant_group=16",
        "checkpoint.every=2", "data.eval_path=null", f"workdir={tmp_path / 'w'}"])  # no eval: the export is the subject
    train_run.run(cfg, raw)
    _, exported = hf.load(tmp_path / "w" / "hf")
    _, merged = checkpoint.load_params(tmp_path / "w")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6), merged, exported)
    q = np.asarray(merged["layers"]["layer"]["self_attn"]["q_proj"])
    unquantized = jax.jit(lambda k: model.init_params(cfg.model.replace(lora_rank=0), k))(jax.random.key(cfg.seed))
    assert np.abs(q - np.asarray(unquantized["layers"]["layer"]["self_attn"]["q_proj"])).max() > 1e-3
