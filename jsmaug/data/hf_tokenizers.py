"""A `tokenizer.json` tokenizer (HF `tokenizers`: byte-level BPE as Llama 3, Qwen and SmolLM2 ship it, or the
SentencePiece-style BPE of Mistral and Llama 2), with the special tokens transformers gives it.

transformers 5 (`TokenizersBackend`, which `PreTrainedTokenizerFast` names) loads a tokenizer this way, and so
does this module:
  - the pipeline is `tokenizer.json` as written (normalizer, pre-tokenizer, model, post-processor);
  - `tokenizer(text)` adds what the post-processor adds: `<|begin_of_text|>` for Llama 3, nothing for Qwen,
    `<s>` for Mistral. `add_bos_token` / `add_eos_token` in tokenizer_config.json are ignored when there is a
    tokenizer.json (transformers drops them); a tokenizer.json without a post-processor adds nothing;
  - the named special tokens (`bos_token`, `eos_token`, `unk_token`, `pad_token`, ...) are
    tokenizer_config.json's (special_tokens_map.json's when the config has no `added_tokens_decoder`), and
    those not yet added tokens of tokenizer.json are added as special tokens, as are the config's
    `added_tokens_decoder` entries and `additional_special_tokens` / `extra_special_tokens`;
  - added tokens (`<|im_start|>`, `<|eot_id|>`, ...) typed in text are one id each, unless the config sets
    `split_special_tokens`.
The EOS appended to every completion (TRL 1.16 appends `tokenizer.eos_token`) is the config's `eos_token`.

Not followed: transformers 5 may load a folder whose tokenizer_config.json names a model-specific class with
another pipeline, rebuilt from the vocabulary (`LlamaTokenizer` on SentencePiece-style files: a Metaspace
pre-tokenizer that splits text starting with a space differently from tokenizer.json and from SentencePiece).
jsmaug reads tokenizer.json as written and says so in a note (`note`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Sequence

from jsmaug.data.files import DataError
from jsmaug.data.tokenizer_folder import TokenizerFiles

# transformers' SPECIAL_TOKENS_ATTRIBUTES, in its order.
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
_PIPELINE_AS_WRITTEN = {"PreTrainedTokenizerFast", "TokenizersBackend", "Qwen2Tokenizer"}


def _content(value: Any) -> str | None:
    """A special token's string: the value itself, or an AddedToken dict's `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _added_token(value: Any, special: bool):
    from tokenizers import AddedToken

    if isinstance(value, dict):
        keys = ("single_word", "lstrip", "rstrip", "normalized")
        return AddedToken(value["content"], special=bool(value.get("special", special)),
                          **{k: bool(value[k]) for k in keys if k in value})
    return AddedToken(value, special=special, normalized=False)


class HFTokenizerBackend:
    kind = "tokenizers"

    def __init__(self, files: TokenizerFiles):
        path = files.tokenizer_json
        try:
            from tokenizers import Tokenizer as RustTokenizer
        except ImportError:
            raise DataError(f"{path}: reading a tokenizer.json needs HF tokenizers (pip install tokenizers)") from None
        try:
            self.tk = RustTokenizer.from_str(path.read_text())
        except UnicodeDecodeError as err:
            raise DataError(f"{path}: not a tokenizer.json (not UTF-8 text: {err})") from None
        except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception on a bad file
            raise DataError(f"{path}: not a tokenizer.json that HF tokenizers can read "
                            f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
        self.tk.no_truncation()  # `tokenizer(text)` without truncation=True, as TRL calls it
        self.tk.no_padding()
        config, where = files.config, files.folder / "tokenizer_config.json"
        named = {k: config[k] for k in NAMED_SPECIAL_TOKENS if k in config}
        if "added_tokens_decoder" not in config:  # transformers reads the legacy map only then
            named.update({k: v for k, v in files.special_tokens_map.items() if k in NAMED_SPECIAL_TOKENS})
        self._add_missing_tokens(config, named, where)
        if config.get("split_special_tokens"):
            self.tk.encode_special_tokens = True

        self.special_tokens_map = {k: c for k, c in ((k, _content(v)) for k, v in named.items()) if c is not None}
        self.eos_token = self.special_tokens_map.get("eos_token")
        if self.eos_token is None:
            raise DataError(f"{where}: no eos_token (TRL appends tokenizer.eos_token to every completion, and "
                            "jsmaug does the same); add \"eos_token\" to tokenizer_config.json")
        self.eos_id = self._id_of(self.eos_token, "eos_token", where)
        self.bos_token = self.special_tokens_map.get("bos_token")
        self.bos_id = None if self.bos_token is None else self._id_of(self.bos_token, "bos_token", where)
        self.vocab_size = self.tk.get_vocab_size(with_added_tokens=True)
        probe = self.tk.encode("a", add_special_tokens=True)
        first = next((i for i, s in enumerate(probe.sequence_ids) if s is not None), len(probe.ids))
        self.prefix_ids = list(probe.ids[:first])  # what the post-processor puts before the text (BOS or none)
        cls = config.get("tokenizer_class")
        self.note = None
        if isinstance(cls, str) and cls.removesuffix("Fast") == "LlamaTokenizer" and not self._byte_level():
            self.note = (f"{where} names {cls}: jsmaug reads {path.name} as written (transformers' "
                         "TokenizersBackend), while transformers 5 may rebuild LlamaTokenizer's own Metaspace "
                         "pipeline, which splits text that starts with a space differently; set tokenizer_class "
                         "to PreTrainedTokenizerFast for transformers to read the file as jsmaug does")
        self._fingerprint = hashlib.sha256(b"tokenizers\0" + self.tk.to_str().encode() + json.dumps(
            [self.special_tokens_map, bool(self.tk.encode_special_tokens)], sort_keys=True).encode()).hexdigest()[:16]

    def _add_missing_tokens(self, config: dict, named: dict, where) -> None:
        """transformers' rule: added tokens named by the config that tokenizer.json lacks are added to it."""
        present = {t.content for t in self.tk.get_added_tokens_decoder().values()}
        todo = []
        decoder = config.get("added_tokens_decoder") or {}
        if not isinstance(decoder, dict):
            raise DataError(f"{where}: added_tokens_decoder must be an object of id -> token")
        for idx, token in sorted(decoder.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0):
            if _content(token) is None:
                raise DataError(f"{where}: added_tokens_decoder[{idx!r}] has no string 'content'")
            todo.append(_added_token(token, special=False))
        extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
        extra = list(extra.values()) if isinstance(extra, dict) else list(extra)
        for value in list(named.values()) + extra:
            if _content(value) is not None:
                todo.append(_added_token(value, special=True))
        new = []
        for token in todo:
            if token.content not in present:
                present.add(token.content)
                new.append(token)
        if new:
            self.tk.add_tokens(new)

    def _id_of(self, token: str, field: str, where) -> int:
        idx = self.tk.token_to_id(token)
        if idx is None:
            raise DataError(f"{where}: {field} {token!r} is not a token of the tokenizer")
        return idx

    def _byte_level(self) -> bool:
        pre = json.loads(self.tk.to_str()).get("pre_tokenizer") or {}
        return "ByteLevel" in json.dumps(pre)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_with_special_tokens(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=True).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def fingerprint(self) -> str:
        return self._fingerprint
