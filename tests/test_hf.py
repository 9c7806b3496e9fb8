"""HF <-> jsmaug conversion: round trips, transformers loading our export, both layouts, bad inputs."""

import json
import shutil

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

import jax
import jax.numpy as jnp

from hf_fixtures import hf_forward, make_hf_checkpoint
from jsmaug import hf
from jsmaug.models import decoder as model
from jsmaug.models.config import ConfigError

fwd = jax.jit(model.forward, static_argnums=0)


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    path = tmp_path_factory.mktemp("hub")
    torch_model = make_hf_checkpoint(path, seed=11, max_shard_size="30KB")
    return path, torch_model


def _all_tensors(path):
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="np") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def test_sharded_checkpoint_imports_and_round_trips_bytes(hub, tmp_path):
    path, _ = hub
    assert len(list(path.glob("*.safetensors"))) > 2 and (path / "model.safetensors.index.json").exists()
    config, params = hf.load(path)
    summary = hf.save(tmp_path / "out", config, params, max_shard_size="40KB")
    assert summary["files"] > 1 and (tmp_path / "out" / "model.safetensors.index.json").exists()
    a, b = _all_tensors(path), _all_tensors(tmp_path / "out")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(a)


def test_bfloat16_round_trip_is_byte_identical(tmp_path):
    make_hf_checkpoint(tmp_path / "bf16", seed=2, dtype="bfloat16")
    config, params = hf.load(tmp_path / "bf16")
    assert config.param_dtype == "bfloat16"
    assert jax.tree.leaves(params)[0].dtype == jnp.bfloat16
    hf.save(tmp_path / "out", config, params)
    a, b = _all_tensors(tmp_path / "bf16"), _all_tensors(tmp_path / "out")
    assert set(a) == set(b) and all(a[k].tobytes() == b[k].tobytes() and a[k].dtype == b[k].dtype for k in a)


def test_export_loads_in_transformers_with_same_logits(hub, tmp_path):
    from transformers import AutoModelForCausalLM

    path, _ = hub
    config, params = hf.load(path)
    # Perturb so the export is not just a copy of the input files.
    params = jax.tree.map(lambda x: x * 1.01, params)
    hf.save(tmp_path / "exp", config, params)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "exp", attn_implementation="eager").eval()
    ids = np.random.default_rng(1).integers(3, config.vocab_size, (2, 9))
    want, want_aux = hf_forward(reloaded, ids)
    got, aux = fwd(config, params, ids)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)
    np.testing.assert_allclose(float(aux), want_aux, atol=1e-5)
    cfg = json.loads((tmp_path / "exp" / "config.json").read_text())
    assert cfg["rope_theta"] == config.rope_theta and cfg["architectures"] == ["MixtralForCausalLM"]
    assert cfg["sliding_window"] is None and cfg["torch_dtype"] == "float32"
    from transformers import GenerationConfig  # transformers reads the export's generation config as written

    gen = GenerationConfig.from_pretrained(tmp_path / "exp")
    assert (gen.bos_token_id, gen.eos_token_id) == (config.bos_token_id, config.eos_token_id)


def test_fused_layout_imports_to_identical_params(hub, tmp_path):
    path, _ = hub
    config, params = hf.load(path)
    t = _all_tensors(path)
    fused = {}
    for k, v in t.items():
        if ".block_sparse_moe." not in k:
            fused[k] = v
    for n in range(config.num_hidden_layers):
        p = f"model.layers.{n}.block_sparse_moe."
        e = config.num_local_experts
        w1 = np.stack([t[p + f"experts.{j}.w1.weight"] for j in range(e)])
        w3 = np.stack([t[p + f"experts.{j}.w3.weight"] for j in range(e)])
        w2 = np.stack([t[p + f"experts.{j}.w2.weight"] for j in range(e)])
        fused[f"model.layers.{n}.mlp.experts.gate_up_proj"] = np.concatenate([w1, w3], axis=1)
        fused[f"model.layers.{n}.mlp.experts.down_proj"] = w2
        fused[f"model.layers.{n}.mlp.gate.weight"] = t[p + "gate.weight"]
    out = tmp_path / "fused"
    out.mkdir()
    save_file(fused, str(out / "model.safetensors"))
    shutil.copy(path / "config.json", out / "config.json")
    _, params2 = hf.load(out)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2)


def test_sharded_import_on_8_devices_places_every_tensor(hub):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    path, _ = hub
    config = hf.read_config(path)
    devices = np.array(jax.devices()[:8]).reshape(2, 4)
    mesh = Mesh(devices, ("fsdp", "expert"))
    rules = {"exp": "expert", "embed": "fsdp"}
    axes = model.logical_axes(config)
    shardings = jax.tree.map(lambda spec: NamedSharding(mesh, P(*(rules.get(a) for a in spec))), axes,
                             is_leaf=lambda x: isinstance(x, P))
    _, params = hf.load(path, shardings=shardings)
    _, plain = hf.load(path)
    w1 = params["layers"]["layer"]["block_sparse_moe"]["w1"]
    assert w1.sharding.spec == P(None, "expert", "fsdp", None)
    assert len({s.device for s in w1.addressable_shards}) == 8
    assert w1.addressable_shards[0].data.shape == (2, 1, 16, 40)
    jax.tree.map(lambda a, b, s: (np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                                  pytest.fail("wrong sharding") if a.sharding != s else None),
                 params, plain, shardings)
    # mesh= uses the default rule table: experts over `expert`, embed over `fsdp`.
    from jsmaug.parallel import sharding as shd

    mesh2 = shd.make_mesh(shd.MeshConfig(data=2, fsdp=1, expert=4), config, jax.devices())
    _, p2 = hf.load(path, mesh=mesh2)
    assert p2["layers"]["layer"]["block_sparse_moe"]["w2"].sharding.spec == P(None, "expert", None, None)


# ------------------------------------------------------------------------------------------------ bad inputs

def _copy(hub, tmp_path):
    path, _ = hub
    dst = tmp_path / "ck"
    shutil.copytree(path, dst)
    return dst


def test_missing_shard_names_file(hub, tmp_path):
    dst = _copy(hub, tmp_path)
    victim = sorted(dst.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(hf.CheckpointError, match=victim.name):
        hf.load(dst)


def test_not_mixtral_config(hub, tmp_path):
    dst = _copy(hub, tmp_path)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["architectures"], cfg["model_type"] = ["LlamaForCausalLM"], "llama"
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="LlamaForCausalLM"):
        hf.load(dst)


def test_shape_disagreeing_with_config_names_tensor(hub, tmp_path):
    dst = _copy(hub, tmp_path)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(hf.CheckpointError, match=r"w1\.weight has shape \(40, 32\), config.json implies \(48, 32\)"):
        hf.load(dst)


def test_missing_and_unexpected_tensor(hub, tmp_path):
    path, _ = hub
    t = _all_tensors(path)
    for mutate, pattern in [(lambda d: d.pop("model.layers.1.self_attn.k_proj.weight"), "missing.*k_proj"),
                            (lambda d: d.__setitem__("model.layers.0.extra.weight", np.zeros(3, np.float32)),
                             "unexpected.*extra")]:
        d = dict(t)
        mutate(d)
        dst = tmp_path / pattern[:7].replace(".", "_")
        dst.mkdir()
        save_file(d, str(dst / "model.safetensors"))
        shutil.copy(path / "config.json", dst / "config.json")
        with pytest.raises(hf.CheckpointError, match=pattern):
            hf.load(dst)


def test_export_refuses_non_empty_dir_and_leaves_nothing_on_failure(hub, tmp_path):
    path, _ = hub
    config, params = hf.load(path)
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(hf.CheckpointError, match="not empty"):
        hf.save(out, config, params)
    assert (out / "keep.txt").read_text() == "mine"
    # A failure mid-export (a tensor of the wrong shape) leaves neither the target nor a temporary folder.
    broken = jax.tree.map(lambda x: x, params)
    broken["norm"]["weight"] = jnp.zeros((3,))
    with pytest.raises(hf.CheckpointError, match="model.norm.weight"):
        hf.save(tmp_path / "new", config, broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]
    # --overwrite replaces the folder atomically.
    hf.save(out, config, params, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()


def test_converter_tools_round_trip_hf_to_orbax_to_hf(hub, tmp_path):
    import importlib.util

    def tool(name):
        spec = importlib.util.spec_from_file_location(name, f"tools/{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod.main

    path, _ = hub
    assert tool("convert_hf_to_jax")(["--hf_dir", str(path), "--out_dir", str(tmp_path / "ck")]) == 0
    assert tool("convert_jax_to_hf")(["--ckpt_dir", str(tmp_path / "ck"), "--out_dir", str(tmp_path / "hf"),
                                      "--max_shard_size", "30KB"]) == 0
    a, b = _all_tensors(path), _all_tensors(tmp_path / "hf")
    assert set(a) == set(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)
    assert not (tmp_path / "hf" / "tokenizer.json").exists()  # Mixtral's tokenizer does not fit this tiny vocab
    # A non-empty out_dir is refused with exit code 2 and left alone.
    assert tool("convert_hf_to_jax")(["--hf_dir", str(path), "--out_dir", str(tmp_path / "ck")]) == 2


def test_bad_config_json_and_integer_tensor_name_the_culprit(hub, tmp_path):
    dst = _copy(hub, tmp_path)
    (dst / "config.json").write_text('{"model_type": "mixtral",')
    with pytest.raises(hf.CheckpointError, match=r"config.json: not valid JSON"):
        hf.load(dst)
    path, _ = hub
    t = _all_tensors(path)
    t["model.norm.weight"] = np.arange(t["model.norm.weight"].size, dtype=np.int64)
    ints = tmp_path / "ints"
    ints.mkdir()
    save_file(t, str(ints / "model.safetensors"))
    shutil.copy(path / "config.json", ints / "config.json")
    with pytest.raises(hf.CheckpointError, match=r"model.safetensors: tensor model.norm.weight has dtype I64"):
        hf.load(ints)


def test_converter_checks_inputs_before_writing_anything(hub, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_jax_to_hf", "tools/convert_jax_to_hf.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    path, _ = hub
    config, params = hf.load(path)
    from jsmaug.train import checkpoint

    checkpoint.save_params(tmp_path / "ck", config, params)
    # A typo in --tokenizer fails before a single tensor is written; a typo in --ckpt_dir creates nothing.
    assert tool.main(["--ckpt_dir", str(tmp_path / "ck"), "--out_dir", str(tmp_path / "out"),
                      "--tokenizer", str(tmp_path / "tokenizer.modle")]) == 2
    assert tool.main(["--ckpt_dir", str(tmp_path / "ckk"), "--out_dir", str(tmp_path / "out")]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_commit_dir_replaces_an_existing_folder_given_plain_paths(tmp_path):
    """`jsmaug convert --overwrite` passes pathlib paths: the old folder is replaced and nothing is left beside."""
    out, new = tmp_path / "out", tmp_path / "out.tmp"
    out.mkdir()
    (out / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    hf.commit_dir(new, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in out.iterdir()] == ["new.txt"]
