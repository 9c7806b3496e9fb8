"""Tokenising preference pairs as the model meets them at inference: the prompt and its completion as one text.

`Tokenizer(path)` is a checkpoint's own tokenizer (`jsmaug.data.tokenizer_folder` finds the files):
  - `tokenizer.json` (a folder that has one, or the file): HF `tokenizers`, with the special tokens
    transformers gives it (`jsmaug.data.hf_tokenizers`): byte-level BPE (Llama 3, Qwen, SmolLM2) or
    SentencePiece-style BPE (Mistral, Llama 2); BOS as its post-processor adds it, EOS the config's `eos_token`;
  - `tokenizer.model` (a folder without tokenizer.json, or the file): SentencePiece, read the way the hub's
    Mixtral tokenizer reads text: the strings of the special tokens (`<unk>`, `<s>`, `</s>`) become their ids,
    and each piece of text between them is SentencePiece-encoded on its own, dummy-prefix `▁` included (the
    hub's `tokenizer.json` lists them as added tokens, and its `Prepend` normaliser runs on each piece). On
    text without those strings it is SentencePiece itself;
  - no path: Mixtral's `tokenizer.model.v1` from mistral-common, read as above.
`encode(text)` gives the ids without special tokens, `encode_with_special_tokens(text)` those of
transformers' `tokenizer(text)` (the BOS a post-processor adds).

`tokenize_pair` follows HF TRL 1.16 (`DPOTrainer._prepare_dataset`) and lm-evaluation-harness, for every
tokenizer: a completion is never tokenised alone. The ids are those of the joined text, split where the prompt
ends (`tok(...)` is `encode_with_special_tokens`, EOS the tokenizer's `eos_token` string):

    prompt_ids   = tok(prompt)                               [<s>] + encode(prompt) for Mixtral
    chosen_full  = tok(prompt + chosen + EOS)                (EOS is not added twice)
    rejected_full likewise
    n = min(common_prefix(prompt_ids, chosen_full), common_prefix(prompt_ids, rejected_full))
    prompt, chosen, rejected = prompt_ids[:n], chosen_full[n:], rejected_full[n:]

Example, with Mixtral's tokenizer (pieces shown instead of ids):

    prompt "Question: Who is older?\\nAnswer:"   -> <s> ▁Question : ... An swer :
    chosen " Zoe"                               -> ▁Z oe </s>
Tokenised alone, " Zoe" would be `▁ ▁Z oe`: an extra `▁` piece (the text `Answer:  Zoe`, two spaces) that the
model never sees at inference. Where the joined text merges tokens across the boundary, the completion starts
where the two tokenisations part:
    prompt "Hello wor", chosen "ld"             -> prompt <s> ▁Hello, chosen ▁world </s>
(the prompt's `▁wor` is not in the joined text, so the completion takes over from there).

Conversations rendered by a chat template (`jsmaug.data.formats`) go through the same split
(`split_at_prompt`), with the ids exactly as the template renders them (its own BOS and EOS strings; nothing
added, as transformers' `apply_chat_template` tokenises).

Truncation (`truncate`): the prompt keeps its END, cut from the left to `max_prompt_length` tokens with its
leading BOS kept; each completion is cut from the right to fit `max_length` (a cut completion loses its
EOS). A pair whose prompt alone leaves no room is dropped and counted (`prompt_too_long`).
"""

from __future__ import annotations

import hashlib
import os
import re
from typing import Sequence

import numpy as np

from jsmaug.data import tokenizer_folder
from jsmaug.data.files import DataError


def default_tokenizer_path() -> str:
    """Mixtral's tokenizer, `tokenizer.model.v1` of the mistral-common package (nothing is downloaded)."""
    import mistral_common

    return os.path.join(os.path.dirname(mistral_common.__file__), "data", "tokenizer.model.v1")


class SentencePieceBackend:
    """A SentencePiece model (Mixtral's: <unk>=0, <s>=1, </s>=2; no pad id: padding uses 0 and is always
    masked), with the special-token strings read as the hub tokenizer reads them."""

    kind = "sentencepiece"
    note = None

    def __init__(self, path):
        import sentencepiece as spm

        self._bytes = path.read_bytes()
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=self._bytes)
        except (RuntimeError, OSError) as err:
            raise DataError(f"{path}: not a SentencePiece model ({str(err).splitlines()[0]})") from None
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        if self.eos_id < 0:
            raise DataError(f"{path}: the SentencePiece model has no EOS piece")
        self.bos_id = self.bos_id if self.bos_id >= 0 else None
        self.bos_token = None if self.bos_id is None else self.sp.id_to_piece(self.bos_id)
        self.eos_token = self.sp.id_to_piece(self.eos_id)
        self.prefix_ids = [] if self.bos_id is None else [self.bos_id]
        self.vocab_size = self.sp.get_piece_size()
        self.special = {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size())
                        if self.sp.is_control(i) or self.sp.is_unknown(i)}
        self.special_tokens_map = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                                     ("unk_token", self.sp.id_to_piece(self.sp.unk_id())))
                                   if v is not None}
        # Longest first, so that a string that contains another special string is matched whole.
        self._split = re.compile("(" + "|".join(re.escape(s) for s in sorted(self.special, key=len, reverse=True))
                                 + ")")

    def encode(self, text: str) -> list[int]:
        out: list[int] = []
        for i, piece in enumerate(self._split.split(text)):
            if i % 2:
                out.append(self.special[piece])
            elif piece:
                out += self.sp.encode(piece)
        return out

    def encode_with_special_tokens(self, text: str) -> list[int]:
        return self.prefix_ids + self.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def fingerprint(self) -> str:
        return hashlib.sha256(self._bytes).hexdigest()[:16]


class Tokenizer:
    """A checkpoint's tokenizer (module docstring): a folder or file path, or None for Mixtral's.

    `path` is the file read (tokenizer.json or tokenizer.model), `folder` the folder of its files (where the
    chat template and tokenizer_config.json are), `kind` "tokenizers" or "sentencepiece". `bos_id` is None
    for a tokenizer without BOS (Qwen); `prefix_ids` is what `tokenizer(text)` puts before the text."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.files = tokenizer_folder.locate(path or default_tokenizer_path())
        self.path, self.folder = str(self.files.main), str(self.files.folder)
        if self.files.tokenizer_json is not None:
            from jsmaug.data.hf_tokenizers import HFTokenizerBackend

            self.backend = HFTokenizerBackend(self.files)
        else:
            self.backend = SentencePieceBackend(self.files.tokenizer_model)
        b = self.backend
        self.kind, self.note, self.vocab_size = b.kind, b.note, b.vocab_size
        self.bos_id, self.bos_token, self.eos_id, self.eos_token = b.bos_id, b.bos_token, b.eos_id, b.eos_token
        self.prefix_ids: list[int] = list(b.prefix_ids)
        self.special_tokens_map: dict[str, str] = dict(b.special_tokens_map)

    @property
    def sp(self):
        """The SentencePiece processor (SentencePiece tokenizers only)."""
        if self.kind != "sentencepiece":
            raise AttributeError(f"{self.path}: a tokenizer.json tokenizer has no SentencePiece processor")
        return self.backend.sp

    def encode(self, text: str) -> list[int]:
        """Ids of `text` without special tokens added; special-token strings in it are their ids."""
        return self.backend.encode(text)

    def encode_with_special_tokens(self, text: str) -> list[int]:
        """Ids as transformers' `tokenizer(text)` gives them: with what the post-processor adds (BOS or none)."""
        return self.backend.encode_with_special_tokens(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode(ids)

    def fingerprint(self) -> str:
        """Differs between tokenizers (the reference cache's key covers it)."""
        return self.backend.fingerprint()


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading ids `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def split_at_prompt(prompt_ids: list[int], chosen_full: list[int], rejected_full: list[int]
                    ) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) ids from the prompt's ids and the two joined sequences: the completion starts
    where the prompt's ids and the joined ids part (the shorter common prefix over chosen and rejected)."""
    n = min(common_prefix_length(prompt_ids, chosen_full), common_prefix_length(prompt_ids, rejected_full))
    return prompt_ids[:n], chosen_full[n:], rejected_full[n:]


def joined_ids(tok: Tokenizer, prompt: str, chosen: str, rejected: str) -> tuple[list[int], list[int], list[int]]:
    """Plain-text pair -> (prompt ids, prompt+chosen ids, prompt+rejected ids), each as `tokenizer(text)` gives
    it (the BOS its post-processor adds, or none), with the EOS string appended to each completion unless it ends
    with it (TRL's rule)."""
    def full(completion: str) -> list[int]:
        eos = "" if completion.endswith(tok.eos_token) else tok.eos_token
        return tok.encode_with_special_tokens(prompt + completion + eos)
    return tok.encode_with_special_tokens(prompt), full(chosen), full(rejected)


def truncate(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int, max_prompt_length: int,
             bos_id: int | None) -> dict[str, np.ndarray] | str:
    """The pair as int32 arrays, cut to fit (see the module docstring), or a drop reason (str)."""
    if len(prompt) > max_prompt_length:
        keep_bos = bool(prompt) and prompt[0] == bos_id
        prompt = ([bos_id] if keep_bos else []) + prompt[len(prompt) - max_prompt_length + keep_bos:]
    room = max_length - len(prompt)
    if room < 1:
        return "prompt_too_long"
    if not prompt or not chosen or not rejected:
        return "empty_prompt" if not prompt else "empty_completion"
    return {"prompt": np.asarray(prompt, np.int32), "chosen": np.asarray(chosen[:room], np.int32),
            "rejected": np.asarray(rejected[:room], np.int32)}


def tokenize_pair(tok: Tokenizer, prompt: str, chosen: str, rejected: str, max_length: int,
                  max_prompt_length: int) -> dict[str, np.ndarray] | str:
    """A plain-text pair's ids by the joined rule (module docstring), truncated; or a drop reason (str)."""
    return truncate(*split_at_prompt(*joined_ids(tok, prompt, chosen, rejected)), max_length, max_prompt_length,
                    tok.bos_id)
