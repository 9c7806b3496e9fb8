"""The train step: frozen reference, precomputed == online, aux loss scale, accumulation, non-finite skip."""

import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jsmaug.data import batches as data

from jsmaug.losses import config as loss_config

from jsmaug.models import config as cfg_lib, decoder as model, lora
from jsmaug.models.config import ConfigError

from jsmaug.train import step
from jsmaug.train.config import LossSection, TrainSection

CONF = cfg_lib.tiny(vocab_size=64, router_aux_loss_coef=0.0)
BUCKETS = (16, 24)


def _examples(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = rng.integers(3, 64, rng.integers(2, 7)).astype(np.int32)
        c = rng.integers(3, 64, rng.integers(2, 9)).astype(np.int32)
        r = rng.integers(3, 64, rng.integers(2, 9)).astype(np.int32)
        out.append({"prompt": np.concatenate([[1], p]).astype(np.int32), "chosen": np.append(c, 2).astype(np.int32),
                    "rejected": np.append(r, 2).astype(np.int32)})
    return out


BATCH = data.collate(_examples(4), BUCKETS)
LOSS = LossSection(type="dpop", beta=0.3, dpop_lambda=5.0)


@functools.lru_cache(maxsize=None)
def _setup(coef=0.0, lr=1e-2):
    config = CONF.replace(router_aux_loss_coef=coef)
    params = model.init_params(config, jax.random.key(0))
    opt, _ = step.make_optimizer(TrainSection(steps=10, learning_rate=lr, warmup_steps=0, schedule="constant"))
    return config, params, opt


def _state(params, opt):
    params = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
    return step.TrainState(params, opt.init(params), jnp.int32(0), jnp.int32(0), jax.random.key_data(jax.random.key(0)))


def _step_fn(config, opt, micro=1, loss=LOSS):
    return jax.jit(functools.partial(step.train_step, config=config, loss_cfg=loss, optimizer=opt,
                                     micro_batches=micro))


def test_reference_stays_bit_identical_and_policy_moves():
    config, params, opt = _setup()
    ref = jax.tree.map(lambda x: jnp.array(x, copy=True), params)
    ref_before = jax.tree.map(np.asarray, ref)
    fn = _step_fn(config, opt)
    state = _state(params, opt)
    losses = []
    for _ in range(8):
        state, m = fn(state, BATCH, ref)
        losses.append(float(m["loss"]))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), ref, ref_before)
    assert losses[-1] < losses[0] - 0.05, losses  # the policy learns the 4 pairs
    assert float(m["rewards/accuracies"]) > 0.5


def test_gradients_equal_constant_reference_and_precomputed_equals_online():
    config, params, _ = _setup()
    ref = jax.tree.map(lambda x: x + 0.01 * jnp.sin(x), params)  # a reference different from the policy
    ref_logps = jax.jit(step.reference_logps, static_argnums=0)(config, ref, BATCH)
    f_online = lambda p: step.loss_and_metrics(p, ref, BATCH, config=config, loss_cfg=LOSS)
    batch_pre = dict(BATCH, ref_logps=np.asarray(ref_logps))
    f_pre = lambda p: step.loss_and_metrics(p, None, batch_pre, config=config, loss_cfg=LOSS)
    (l1, m1), g1 = jax.jit(jax.value_and_grad(f_online, has_aux=True))(params)
    (l2, m2), g2 = jax.jit(jax.value_and_grad(f_pre, has_aux=True))(params)
    np.testing.assert_allclose(l1, l2, rtol=1e-6, atol=1e-6)
    for k in ("rewards/chosen", "rewards/rejected", "dpop/penalty"):
        np.testing.assert_allclose(m1[k], m2[k], rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g2)
    # ...and differentiating the reference weights gives exactly zero.
    g_ref = jax.jit(jax.grad(lambda r: step.loss_and_metrics(params, r, BATCH, config=config, loss_cfg=LOSS)[0]))(ref)
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(g_ref))


def test_aux_loss_enters_with_exactly_its_coefficient():
    conf0, params, _ = _setup(0.0)
    conf1 = conf0.replace(router_aux_loss_coef=0.37)
    f = jax.jit(step.loss_and_metrics, static_argnames=("config", "loss_cfg"))
    l0, m0 = f(params, params, BATCH, config=conf0, loss_cfg=LOSS)
    l1, m1 = f(params, params, BATCH, config=conf1, loss_cfg=LOSS)
    aux = float(m0["moe/aux_loss"])
    assert aux > 1.0  # non-trivial (>= 1 by construction, = k when perfectly balanced)
    np.testing.assert_allclose(float(l1) - float(l0), 0.37 * aux, rtol=1e-5)
    # The reference contributes no aux loss: policy-only stats are the same with or without a reference.
    np.testing.assert_allclose(m1["moe/aux_loss"], aux, rtol=1e-6)


def test_micro_batch_accumulation_equals_one_big_batch():
    import optax

    # Plain SGD: the update IS the accumulated gradient (Adam's first step, g/|g|, would amplify round-off
    # in gradients that are ~0).
    config, params, _ = _setup()
    opt = optax.sgd(1.0)
    # A reference away from the policy: with ref == policy every pair sits on DPOP's kink (ref_c == pi_c), where
    # a 1e-7 round-off between the two programs switches the lam term of that pair's gradient on or off.
    ref = jax.tree.map(lambda x: 0.95 * x, params)
    big = data.collate(_examples(8, seed=5), BUCKETS)
    s1, m1 = _step_fn(config, opt, micro=1)(_state(params, opt), big, ref)
    s4, m4 = _step_fn(config, opt, micro=4)(_state(params, opt), big, ref)
    np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(m1["grad_norm"], m4["grad_norm"], rtol=1e-5)
    # The updates (SGD at lr 1: the accumulated gradients) agree to float32's summation-order round-off, relative
    # to each weight's largest update (0.54 on the embedding, where 4 partial sums differ from one by up to 1.5e-6),
    # plus one unit in the last place of the stored weight: a norm weight of 1.0 updated by ~1e-3 is stored to
    # 6e-8, above 1e-5 of its update, so a gradient that differs in its last bits moved it by one ulp (CI, once).
    def same_update(a, b, p0):
        d1, d4 = np.asarray(a) - np.asarray(p0), np.asarray(b) - np.asarray(p0)
        ulp = np.spacing(np.abs(np.asarray(a)).max())
        np.testing.assert_allclose(d4, d1, rtol=0, atol=1e-5 * np.abs(d1).max() + ulp)
    jax.tree.map(same_update, s1.params, s4.params, params)


def test_non_finite_step_is_skipped_and_counted():
    config, params, opt = _setup()
    fn = _step_fn(config, opt)
    state = _state(params, opt)
    state, _ = fn(state, BATCH, params, False)  # moments that are not zero, so keeping them is seen
    before = jax.tree.map(np.asarray, (state.params, state.opt_state))
    state, m = fn(state, BATCH, params, True)
    assert int(m["applied"]) == 0 and int(state.skipped) == 1 and int(state.step) == 2
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), (state.params, state.opt_state),
                 before)  # neither the params nor AdamW's moments (nor its count) moved
    state, m = fn(state, BATCH, params, False)
    assert int(m["applied"]) == 1 and int(state.skipped) == 1
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), (state.params, state.opt_state), before)
    assert all(jax.tree.leaves(moved[0])) and any(jax.tree.leaves(moved[1]))


@pytest.mark.parametrize("loss", [
    LossSection(type="dpo"), LossSection(type="ipo"), LossSection(type="sft"), LossSection(type="simpo", beta=2.0),
    LossSection(type="orpo", beta=0.1), LossSection(type="aot"),
    LossSection(type=("sigmoid", "bco_pair", "sft"), weights=(0.8, 0.2, 1.0), ld_alpha=0.5, wpo=True),
], ids=["dpo", "ipo", "sft", "simpo", "orpo", "aot", "mpo+ld+wpo"])
def test_losses_train_through_the_step(loss):
    config, params, opt = _setup()
    fn = _step_fn(config, opt, loss=loss)
    state = _state(params, opt)
    # A reference-free loss needs no reference weights at all.
    ref = None if not loss_config.objective(loss).needs_reference else params
    first = None
    for _ in range(5):
        state, m = fn(state, BATCH, ref)
        first = float(m["loss"]) if first is None else first
    assert np.isfinite(float(m["loss"])) and float(m["loss"]) < first
    if isinstance(loss.type, tuple):
        assert {"loss/sigmoid", "loss/bco_pair", "loss/sft"} <= set(m)


def test_eval_metrics_drop_padding_pairs():
    """eval_step's per-pair values, cut to the real pairs, give the metrics of exactly those pairs: a batch of
    3 real pairs padded with a copy of the first equals loss_and_metrics on the 3 pairs alone."""
    config, params, _ = _setup()
    ref = jax.tree.map(lambda x: x * 0.95, params)
    ex = _examples(3, seed=7)
    want_loss, want = step.loss_and_metrics(params, ref, data.collate(ex, BUCKETS), config=config, loss_cfg=LOSS)
    out = jax.device_get(step.eval_step(params, ref, data.collate(ex + ex[:1], BUCKETS), config=config, loss_cfg=LOSS))
    per_pair = {k: np.asarray(out[k])[:3] for k in (*step.PAIR_LOGPS, "loss")}
    got = step.eval_metrics(per_pair, float(out["aux"]), config=config, loss_cfg=LOSS)
    for k in ("logps/chosen", "logps/rejected", "rewards/margins", "rewards/accuracies", "loss/preference",
              "dpop/penalty"):
        np.testing.assert_allclose(got[k], float(want[k]), rtol=1e-5, atol=1e-6, err_msg=k)
    np.testing.assert_allclose(got["loss"], float(want_loss), rtol=1e-5)
    # The padded batch's own means differ (the copy counts twice): the cut above is what makes them equal.
    _, padded = step.loss_and_metrics(params, ref, data.collate(ex + ex[:1], BUCKETS), config=config, loss_cfg=LOSS)
    assert abs(float(padded["logps/chosen"]) - got["logps/chosen"]) > 1e-3


# ------------------------------------------------------------------ the optimizer, against transformers


@pytest.mark.parametrize("schedule, warmup, end", [
    ("linear", dict(warmup_steps=3), 0.0), ("cosine", dict(warmup_steps=3), 0.0),
    ("cosine_with_min_lr", dict(warmup_steps=3), 0.1), ("constant_with_warmup", dict(warmup_steps=3), 0.0),
    ("constant", {}, 0.0), ("linear", dict(warmup_ratio=0.15), 0.0)])
def test_schedules_are_transformers(schedule, warmup, end):
    """Each name's rate at every update equals transformers' `get_scheduler` (a torch LambdaLR stepped once per
    update), and warmup_ratio is counted as `TrainingArguments.get_warmup_steps` counts it (0.15 x 20 rounds up
    to 4: 0.15 * 20 is 3.0000000000000004 in floating point, in both)."""
    import torch
    import transformers

    total, peak = 20, 1e-3
    train = TrainSection(steps=total, learning_rate=peak, schedule=schedule, end_lr_fraction=end, **warmup)
    hf_warm = transformers.TrainingArguments(output_dir="unused", report_to="none",
                                             warmup_steps=warmup.get("warmup_ratio", warmup.get("warmup_steps", 0))
                                             ).get_warmup_steps(total)
    assert step.warmup_steps(train) == hf_warm
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    kwargs = {"min_lr_rate": end} if schedule == "cosine_with_min_lr" else None
    sched = transformers.get_scheduler(schedule, opt, num_warmup_steps=hf_warm, num_training_steps=total,
                                       scheduler_specific_kwargs=kwargs)
    theirs = []
    for _ in range(total):
        theirs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    ours = step.learning_rate_schedule(train)
    np.testing.assert_allclose([float(ours(i)) for i in range(total)], theirs, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("case", ["llama3_tied", "mistral_window", "qwen2_bias", "qwen3_qknorm", "qwen3_moe_mixed",
                                  "olmoe"])
def test_decay_mask_is_hf_trainers_rule_on_every_family(case, tmp_path):
    """The weights left out of decay by default are those HF's Trainer leaves out (`get_decay_parameter_names`:
    biases, every norm, q/k norms): the same number of values decayed and not, on a checkpoint of each family
    imported from transformers (tied embeddings decayed once, as the one tensor they are in torch)."""
    from family_fixtures import make_checkpoint
    from transformers import Trainer

    from jsmaug import hf

    model_pt = make_checkpoint(case, tmp_path)
    decayed_names = set(Trainer.get_decay_parameter_names(None, model_pt))
    hf_counts = [0, 0]  # (not decayed, decayed)
    for name, p in model_pt.named_parameters():
        hf_counts[name in decayed_names] += p.numel()
    _, params = hf.load(tmp_path)
    mask = step.decay_mask(TrainSection().weight_decay_exclude)(params)
    ours = [0, 0]
    for m, p in zip(jax.tree.leaves(mask), jax.tree.leaves(params)):
        ours[bool(m)] += p.size
    assert ours == hf_counts and hf_counts[0] > 0


def test_decay_mask_on_lora_and_typos():
    """LoRA adapters are decayed (as PEFT's lora_A / lora_B under HF's rule); a name of your own that matches no
    parameter is an error naming the key; [] decays everything."""
    config = CONF.replace(lora_rank=2)
    base, adapters = lora.split(model.param_shapes(config))
    assert all(jax.tree.leaves(step.decay_mask(("bias", "norm", "embed_tokens"))(adapters)))
    masked = step.param_names(base), jax.tree.leaves(step.decay_mask(("bias", "norm"))(base))
    assert {n for n, m in zip(*masked) if not m} == {"layers/layer/input_layernorm/weight",
                                                     "layers/layer/post_attention_layernorm/weight", "norm/weight"}
    assert all(jax.tree.leaves(step.decay_mask(())(base)))
    with pytest.raises(ConfigError, match=r"^train.weight_decay_exclude: 'embed_tokenz' is in no parameter's name"):
        step.decay_mask(("bias", "norm", "embed_tokenz"))(base)


def test_weight_decay_skips_excluded_weights_in_the_update():
    """Zero gradients: Adam's part is 0, so the update is -lr x wd x w on decayed leaves and exactly 0 on the rest."""
    config, params, _ = _setup()
    opt, _ = step.make_optimizer(TrainSection(steps=10, learning_rate=0.5, schedule="constant", weight_decay=0.1,
                                              grad_clip=0.0))
    updates, _ = opt.update(jax.tree.map(jnp.zeros_like, params), opt.init(params), params)
    for name, u, w in zip(step.param_names(params), jax.tree.leaves(updates), jax.tree.leaves(params)):
        want = np.zeros_like(w) if "norm" in name else -0.5 * 0.1 * np.asarray(w)
        np.testing.assert_allclose(u, want, rtol=1e-6, atol=0, err_msg=name)


def test_optimizer_state_is_unmasked_adamws_so_old_checkpoints_restore():
    """The decay mask leaves the optimizer state's tree as it was (optax.adamw without a mask, behind clipping):
    a checkpoint written before the mask existed restores (optax's own masked decay would add a MaskedState)."""
    import optax

    _, params, _ = _setup()
    new, schedule = step.make_optimizer(TrainSection(weight_decay=0.1, grad_clip=1.0))
    old = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1))
    assert jax.tree.structure(new.init(params)) == jax.tree.structure(old.init(params))
    # optax.tree_map_params (how sharding.opt_state_shardings places the moments) calls init with a placeholder.
    mapped = optax.tree_utils.tree_map_params(new, lambda x: x * 0, new.init(params))
    assert jax.tree.structure(mapped) == jax.tree.structure(old.init(params))
