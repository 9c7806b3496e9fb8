"""The tokenizer files of an export: a tokenizer.json tokenizer's files copied as they are
(`export_tokenizer_files`), or those of a Mixtral hub repository, written from a SentencePiece `tokenizer.model`.

An export that holds only `tokenizer.model` makes transformers build a generic tokenizer that adds no `<s>`, and
lm-evaluation-harness then silently scores contexts without BOS. So an export carries what the hub's Mixtral
repositories ship: `tokenizer.json` (the fast tokenizer: a BPE model with byte fallback, the vocabulary and
merges read from the SentencePiece model), `tokenizer_config.json` and `special_tokens_map.json`.

The pipeline in `tokenizer.json` reproduces SentencePiece itself (tested token for token against it, runs of
spaces included): the normalizer prepends `▁` and turns every space into `▁`, there is no pre-tokenizer (the
whole text is one BPE word, as in SentencePiece), and the post-processor adds `<s>`.
The strings of the special tokens (`<s>`, `</s>`, `<unk>`) in text are those tokens, as on the hub
(`split_special_tokens` is left at its default, false): TRL appends the EOS *string* to every completion.
`tokenizer_config.json` names `PreTrainedTokenizerFast`, which loads `tokenizer.json` as it is; the
`LlamaTokenizer` class would rebuild its own pipeline, and that one splits runs of spaces differently.
No `tokenizers` or `transformers` import is needed to write these files.
"""

from __future__ import annotations

import json
from pathlib import Path

from etils import epath

_SPIECE_SPACE = "\u2581"  # ▁


def _vocab_and_merges(sp) -> tuple[dict[str, int], list[str]]:
    """Vocabulary (piece -> id) and BPE merges, highest priority first.

    SentencePiece's BPE applies the merge whose result has the best score (for these models: the lowest id);
    a merge `l r` exists for every normal piece that splits into two pieces of the vocabulary.
    """
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    normal = {sp.id_to_piece(i) for i in range(sp.get_piece_size())
              if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))}
    merges: list[tuple[float, int, int, str]] = []
    for piece in normal:
        pid = vocab[piece]
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                merges.append((-sp.get_score(pid), vocab[left], vocab[right], f"{left} {right}"))
    merges.sort()
    return vocab, [m[3] for m in merges]


def tokenizer_json(sp) -> dict:
    """The fast-tokenizer definition (the `tokenizers` library's JSON) equivalent to SentencePiece model `sp`."""
    vocab, merges = _vocab_and_merges(sp)
    bos, unk = sp.id_to_piece(sp.bos_id()), sp.id_to_piece(sp.unk_id())
    special = [{"id": i, "content": sp.id_to_piece(i), "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True}
               for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": special,
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": _SPIECE_SPACE},
            {"type": "Replace", "pattern": {"String": " "}, "content": _SPIECE_SPACE}]},
        "pre_tokenizer": None,
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [sp.bos_id()], "tokens": [bos]}},
        },
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": _SPIECE_SPACE}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


# The Mixtral-8x7B-v0.1 hub repository's tokenizer_config.json values that an export copies as they are
# (tests/fixtures/ holds the hub's file for comparison). Deliberate differences, each for a tested reason:
#   tokenizer_class  PreTrainedTokenizerFast, not LlamaTokenizer: it loads tokenizer.json as it is, while the
#                    LlamaTokenizer class rebuilds its own pipeline, which splits runs of spaces unlike SentencePiece.
#   chat_template    only when the run used one (`data.chat_template`); the base model's hub files have none.
HUB_TOKENIZER_CONFIG = {
    "add_bos_token": True, "add_eos_token": False, "additional_special_tokens": [],
    "clean_up_tokenization_spaces": False, "legacy": True, "model_max_length": int(1e30), "pad_token": None,
    "sp_model_kwargs": {}, "spaces_between_special_tokens": False, "use_default_system_prompt": False,
}


def _special_token_entry(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def write_tokenizer_files(tokenizer_model: str | Path, out_dir: Path, chat_template: str | None = None) -> list[str]:
    """Copies `tokenizer.model` into `out_dir` and writes tokenizer.json, tokenizer_config.json and
    special_tokens_map.json beside it, with the hub's values (`HUB_TOKENIZER_CONFIG`): the strings `<s>` and
    `</s>` in text are their ids, as on the hub. Returns the names written."""
    import sentencepiece as spm

    model_bytes = epath.Path(tokenizer_model).read_bytes()
    sp = spm.SentencePieceProcessor(model_proto=model_bytes)
    out_dir = epath.Path(out_dir)
    (out_dir / "tokenizer.model").write_bytes(model_bytes)
    tj = tokenizer_json(sp)
    (out_dir / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    bos, eos, unk = sp.id_to_piece(sp.bos_id()), sp.id_to_piece(sp.eos_id()), sp.id_to_piece(sp.unk_id())
    config = {
        **HUB_TOKENIZER_CONFIG,
        "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in tj["added_tokens"]},
        "bos_token": bos, "eos_token": eos, "unk_token": unk,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2,
                                                              ensure_ascii=False))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": _special_token_entry(bos), "eos_token": _special_token_entry(eos),
         "unk_token": _special_token_entry(unk)}, indent=2))
    return ["tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def export_tokenizer_files(tokenizer_path: str | Path, out_dir: Path, chat_template: str | None = None) -> list[str]:
    """The tokenizer files of an export. A tokenizer.json tokenizer (a folder, or the file) has its folder's
    tokenizer files copied as they are (`tokenizer_folder.TOKENIZER_FILES`); a SentencePiece model gets the
    files above (`write_tokenizer_files`). `chat_template` (the Jinja source a run trained with), when it is not
    the folder's own, becomes the export's chat_template.jinja (transformers reads that file first) and replaces
    tokenizer_config.json's `chat_template`. Returns the names written."""
    from jsmaug.data import tokenizer_folder

    files = tokenizer_folder.locate(tokenizer_path)
    if files.tokenizer_json is None:
        return write_tokenizer_files(files.tokenizer_model, out_dir, chat_template)
    out_dir = epath.Path(out_dir)
    names = tokenizer_folder.copy_tokenizer_files(files.folder, out_dir)
    if files.tokenizer_json.name != "tokenizer.json":  # a tokenizer.json given by another name
        (out_dir / "tokenizer.json").write_bytes(files.tokenizer_json.read_bytes())
        names = sorted(set(names) | {"tokenizer.json"})
    own = tokenizer_folder.chat_template_of(files.folder)
    if chat_template is not None and (own is None or own[0] != chat_template):
        (out_dir / "chat_template.jinja").write_text(chat_template)
        names = sorted(set(names) | {"chat_template.jinja"})
        config = out_dir / "tokenizer_config.json"
        if config.is_file():
            cfg = tokenizer_folder.read_json_file(config)
            if "chat_template" in cfg:
                cfg["chat_template"] = chat_template
                config.write_text(json.dumps(cfg, indent=2, ensure_ascii=False))
    return names


def check_tokenizer(tokenizer_path: str | Path) -> None:
    """Reads the tokenizer once (a `DataError` names the bad file), so an export fails before its tensors."""
    from jsmaug.data.tokenizer import Tokenizer

    Tokenizer(tokenizer_path)
