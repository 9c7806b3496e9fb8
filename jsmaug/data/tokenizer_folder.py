"""Where a tokenizer's files are: a folder (an HF checkpoint, a converter checkpoint, an export) or one file.

A tokenizer is read from `tokenizer.json` (HF `tokenizers`) when the folder has one, else from
`tokenizer.model` (SentencePiece), as transformers prefers the first. Beside it, `tokenizer_config.json`
(and the legacy `special_tokens_map.json`) name the special tokens, and `chat_template.jinja` or
`tokenizer_config.json`'s `chat_template` is the chat template (the `.jinja` file first, as in transformers).

Which tokenizer a run uses (`run_tokenizer_path`): `data.tokenizer_path` when set (a folder or a file), else
`init_from`'s own tokenizer files (the converter copies them into its checkpoint), else Mixtral's
SentencePiece model from mistral-common (the caller's default). A training workdir given as a model
(`init_from`, `--model`, `--ckpt_dir`) has the tokenizer of its `hf/` export, or the one its `config.json`
says it trained with.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from etils import epath

from jsmaug import paths
from jsmaug.data.files import DataError

# What a folder's tokenizer consists of; the converter and the export copy these as they are.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "added_tokens.json", "vocab.json", "merges.txt")
# The converter also copies the checkpoint's generation defaults (eos_token_id lists of instruct models).
CHECKPOINT_FILES = TOKENIZER_FILES + ("generation_config.json",)


@dataclasses.dataclass(frozen=True)
class TokenizerFiles:
    folder: epath.Path
    tokenizer_json: epath.Path | None  # read with HF tokenizers when set
    tokenizer_model: epath.Path | None  # else this SentencePiece model
    config: dict[str, Any]  # tokenizer_config.json ({} when there is none)
    special_tokens_map: dict[str, Any]  # special_tokens_map.json ({} when there is none)

    @property
    def main(self) -> epath.Path:
        """The file the tokenizer is read from."""
        return self.tokenizer_json or self.tokenizer_model


def read_json_file(path: epath.Path) -> dict[str, Any]:
    """A JSON object from `path`, or a `DataError` naming the file."""
    return paths.read_json_object(path, DataError)


def has_tokenizer_files(folder: str | os.PathLike) -> bool:
    folder = epath.Path(folder)
    return folder.is_dir() and any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model"))


def locate(path: str | os.PathLike) -> TokenizerFiles:
    """The tokenizer files of `path`: a folder (its tokenizer.json, else its tokenizer.model), a tokenizer.json
    file (any name ending in .json) or a SentencePiece model file. Errors name the path."""
    path = epath.Path(path)
    if path.is_dir():
        folder = path
        tj, model = folder / "tokenizer.json", folder / "tokenizer.model"
        tj, model = (tj if tj.is_file() else None), (model if model.is_file() else None)
        if tj is None and model is None:
            raise DataError(f"{folder}: no tokenizer files in this folder (tokenizer.json or tokenizer.model)")
        if tj is not None:
            model = None
    elif path.is_file():
        folder = path.parent
        tj, model = (path, None) if path.name.endswith(".json") else (None, path)
    else:
        raise DataError(f"{path}: tokenizer not found (give a folder with tokenizer.json or tokenizer.model, "
                        "or one of those files)")
    config = folder / "tokenizer_config.json"
    special = folder / "special_tokens_map.json"
    return TokenizerFiles(folder=folder, tokenizer_json=tj, tokenizer_model=model,
                          config=read_json_file(config) if config.is_file() else {},
                          special_tokens_map=read_json_file(special) if special.is_file() else {})


def chat_template_of(folder: str | os.PathLike) -> tuple[str, str] | None:
    """(Jinja source, where it was found) of a tokenizer folder: `chat_template.jinja`, else `chat_template` in
    `tokenizer_config.json` (its "default" entry when it is a list of named templates); None when it has none."""
    folder = epath.Path(folder)
    jinja, config = folder / "chat_template.jinja", folder / "tokenizer_config.json"
    if jinja.is_file():
        return jinja.read_text(), str(jinja)
    if config.is_file():
        found = read_json_file(config).get("chat_template")
        if isinstance(found, list):  # [{"name": ..., "template": ...}, ...]: the default one
            found = next((t.get("template") for t in found if isinstance(t, dict) and t.get("name") == "default"),
                         None)
        if isinstance(found, str):
            return found, f"{config} (chat_template)"
    return None


def model_tokenizer_path(model_path: str | os.PathLike | None, _depth: int = 0) -> str | None:
    """The tokenizer a model folder carries, as the file it is read from (tokenizer.json, else tokenizer.model):
    in the folder itself (an HF folder, a converter checkpoint, an export), in `hf/` of a training workdir, or
    the one a training workdir's `config.json` trained with. None when it has none."""
    if model_path is None or _depth > 4:
        return None
    folder = epath.Path(model_path)
    for candidate in (folder, folder / "hf"):
        if has_tokenizer_files(candidate):
            return str(locate(candidate).main)
    run_config = folder / "config.json"
    if (folder / "checkpoints").is_dir() and run_config.is_file():
        cfg = read_json_file(run_config)
        data = cfg.get("data") if isinstance(cfg.get("data"), dict) else {}
        if data.get("tokenizer_path"):
            return str(data["tokenizer_path"])
        return model_tokenizer_path(cfg.get("init_from"), _depth + 1)
    return None


def run_tokenizer_path(tokenizer_path: str | None, init_from: str | None) -> str | None:
    """A run's tokenizer: `data.tokenizer_path`, else `init_from`'s own; None means Mixtral's (the default)."""
    return tokenizer_path or model_tokenizer_path(init_from)


def copy_tokenizer_files(src: str | os.PathLike, out_dir: str | os.PathLike,
                         names: tuple[str, ...] = TOKENIZER_FILES) -> list[str]:
    """Copies the files of `names` that folder `src` holds into `out_dir`, byte for byte. Returns the names."""
    src, out_dir = epath.Path(src), epath.Path(out_dir)
    copied = []
    for name in names:
        if (src / name).is_file():
            (out_dir / name).write_bytes((src / name).read_bytes())
            copied.append(name)
    return copied
