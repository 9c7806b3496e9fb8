"""The tokenizer files of a Mixtral hub repository, written from a SentencePiece `tokenizer.model`.

An export that holds only `tokenizer.model` makes transformers build a generic tokenizer that adds no `<s>`, and
lm-evaluation-harness then silently scores contexts without BOS. So an export carries what the hub's Mixtral
repositories ship: `tokenizer.json` (the fast tokenizer: a BPE model with byte fallback, the vocabulary and
merges read from the SentencePiece model), `tokenizer_config.json` and `special_tokens_map.json`.

The pipeline in `tokenizer.json` reproduces SentencePiece itself (tested token for token against it, runs of
spaces included): the normalizer prepends `▁` and turns every space into `▁`, there is no pre-tokenizer (the
whole text is one BPE word, as in SentencePiece), and the post-processor adds `<s>`.
`tokenizer_config.json` names `PreTrainedTokenizerFast`, which loads `tokenizer.json` as it is; the
`LlamaTokenizer` class would rebuild its own pipeline, and that one splits runs of spaces differently.
No `tokenizers` or `transformers` import is needed to write these files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

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


def write_tokenizer_files(tokenizer_model: str | Path, out_dir: Path, model_max_length: int) -> list[str]:
    """Copies `tokenizer.model` into `out_dir` and writes tokenizer.json, tokenizer_config.json and
    special_tokens_map.json beside it. Returns the names written."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_model))
    shutil.copyfile(tokenizer_model, out_dir / "tokenizer.model")
    tj = tokenizer_json(sp)
    (out_dir / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    bos, eos, unk = sp.id_to_piece(sp.bos_id()), sp.id_to_piece(sp.eos_id()), sp.id_to_piece(sp.unk_id())
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": True, "add_eos_token": False,
        "bos_token": bos, "eos_token": eos, "unk_token": unk, "pad_token": None,
        "clean_up_tokenization_spaces": False, "legacy": False, "split_special_tokens": True, "model_max_length": model_max_length,
        "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in tj["added_tokens"]},
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": bos, "eos_token": eos, "unk_token": unk}, indent=2))
    return ["tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]
