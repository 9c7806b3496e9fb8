"""HF TRL's preference-data formats, so hub preference sets load as they ship, and chat templates.

A file's format is read from its first row (as TRL reads a dataset's from its first example); every other row
must be in the same format, or it is a bad row named by file and line.

    standard                  {"prompt": str, "chosen": str, "rejected": str}
    implicit prompt           {"chosen": str, "rejected": str}
    conversational            {"prompt": [msg, ...], "chosen": [msg, ...], "rejected": [msg, ...]}
    conversational, implicit  {"chosen": [msg, ...], "rejected": [msg, ...]}
    msg = {"role": str, "content": str}   (further keys are passed to the template as they are)

Implicit prompt: the prompt is what chosen and rejected share at the start, by TRL 1.16's `extract_prompt`:
the first index where they differ, moved back one when the character before it is a space (so the space opens
the completions); for message lists, the leading messages both share. Two details of TRL's rule are kept so the
same rows give the same pairs: when one completion is a prefix of the other, the split falls one element before
the shorter one's end; when nothing is shared, the prompt is empty (TRL would index from the end there).

Conversations are rendered with a Jinja chat template (`data.chat_template`) the way transformers'
`apply_chat_template` renders them (trim_blocks, lstrip_blocks, loop controls, `raise_exception`; the
tokenizer's `bos_token` and `eos_token` strings). As TRL does: the prompt is rendered with
`add_generation_prompt=True`, prompt + chosen and prompt + rejected without it; no BOS or EOS is added to what
the template renders, and the completion starts where the ids of the prompt and of the whole conversation part
(`tokenizer.split_at_prompt`). `configs/chat_templates/mixtral_instruct.jinja` is Mixtral-Instruct's `[INST]`
template.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from jsmaug.data.files import DataError
from jsmaug.data.tokenizer import Tokenizer, joined_ids, split_at_prompt
from jsmaug.data.tokenizer_folder import chat_template_of

STANDARD, IMPLICIT, CONVERSATIONAL, CONVERSATIONAL_IMPLICIT = (
    "standard", "implicit prompt", "conversational", "conversational, implicit prompt")


class ChatTemplate:
    """A Jinja chat template, rendered as transformers renders it."""

    def __init__(self, source: str, origin: str, bos_token: str | None, eos_token: str | None,
                 special_tokens: dict[str, str] | None = None):
        import datetime

        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise DataError(f"chat template {origin}: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)  # Llama 3's templates
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateSyntaxError as err:
            raise DataError(f"chat template {origin}:{err.lineno}: {err.message}") from None
        self.source, self.origin = source, origin
        # The tokenizer's named special tokens that are set, as transformers passes them (an unset BOS is undefined).
        tokens = {"bos_token": bos_token, "eos_token": eos_token, **(special_tokens or {})}
        self.tokens = {k: v for k, v in tokens.items() if v is not None}

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt, **self.tokens)


def load_chat_template(spec: str | None, tok: Tokenizer) -> ChatTemplate | None:
    """`data.chat_template`: None, a Jinja file, or 'tokenizer' (the tokenizer folder's own template:
    `chat_template.jinja`, or `chat_template` in its `tokenizer_config.json`; the tokenizer's folder is
    `init_from`'s or the model's when the tokenizer came from there)."""
    if spec is None:
        return None
    if spec == "tokenizer":
        folder = tok.folder
        found = chat_template_of(folder)
        if found is not None:
            return ChatTemplate(found[0], found[1], tok.bos_token, tok.eos_token, tok.special_tokens_map)
        raise DataError(f"data.chat_template=tokenizer: {folder} has no chat_template.jinja and no chat_template "
                        "in tokenizer_config.json; give a Jinja file instead "
                        "(e.g. configs/chat_templates/mixtral_instruct.jinja)")
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"data.chat_template: {path}: no such file")
    return ChatTemplate(path.read_text(), str(path), tok.bos_token, tok.eos_token, tok.special_tokens_map)


def detect_format(row: Any, keys: tuple[str, str, str]) -> str | None:
    """The format of a (first) row, or None when it is not a mapping."""
    prompt_key, chosen_key, _ = keys
    if not isinstance(row, dict):
        return None
    conversational = isinstance(row.get(chosen_key), list)
    if prompt_key in row:
        return CONVERSATIONAL if conversational else STANDARD
    return CONVERSATIONAL_IMPLICIT if conversational else IMPLICIT


def _messages(where: str, key: str, value: Any) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field {key!r} must be a non-empty list of messages, got "
                        f"{type(value).__name__ if value != [] else 'an empty list'}")
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise DataError(f"{where}: field {key!r}: message {i} must be an object with 'role' and 'content'")
        for field in ("role", "content"):
            if not isinstance(msg.get(field), str):
                raise DataError(f"{where}: field {key!r}: message {i} needs a string {field!r}")
    return value


def extract_prompt(chosen: Sequence, rejected: Sequence) -> tuple[Sequence, Sequence, Sequence]:
    """TRL 1.16's `extract_prompt` on strings or message lists: (prompt, chosen rest, rejected rest)."""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if idx and chosen[idx - 1] == " ":
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def row_ids(where: str, row: Any, fmt: str, keys: tuple[str, str, str], tok: Tokenizer,
            template: ChatTemplate | None) -> tuple[list[int], list[int], list[int]]:
    """One row of a file in format `fmt` -> (prompt ids, chosen ids, rejected ids), before truncation.
    A row that is not in the format, or malformed, raises a `DataError` naming `where`."""
    prompt_key, chosen_key, rejected_key = keys
    if isinstance(row, DataError):
        raise row
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be an object with {chosen_key!r} and {rejected_key!r}")
    need = (chosen_key, rejected_key) if fmt in (IMPLICIT, CONVERSATIONAL_IMPLICIT) else keys
    for key in need:
        if key not in row:
            raise DataError(f"{where}: missing field {key!r} (the file is in the {fmt} format, read from its "
                            "first row)")
    if fmt in (STANDARD, IMPLICIT):
        for key in need:
            if not isinstance(row[key], str):
                raise DataError(f"{where}: field {key!r} must be a string, got {type(row[key]).__name__} (the "
                                f"file is in the {fmt} format, read from its first row)")
        if fmt == STANDARD:
            prompt, chosen, rejected = row[prompt_key], row[chosen_key], row[rejected_key]
        else:
            prompt, chosen, rejected = extract_prompt(row[chosen_key], row[rejected_key])
        if not chosen.strip() or not rejected.strip():
            raise DataError(f"{where}: empty completion in {chosen_key if not chosen.strip() else rejected_key!r}")
        if chosen == rejected:
            raise DataError(f"{where}: chosen and rejected are identical")
        return split_at_prompt(*joined_ids(tok, prompt, chosen, rejected))
    msgs = {key: _messages(where, key, row[key]) for key in need}
    if fmt == CONVERSATIONAL:
        prompt, chosen, rejected = msgs[prompt_key], msgs[chosen_key], msgs[rejected_key]
    else:
        prompt, chosen, rejected = extract_prompt(msgs[chosen_key], msgs[rejected_key])
    if chosen == rejected:
        raise DataError(f"{where}: chosen and rejected are identical")
    if not chosen or not rejected:
        raise DataError(f"{where}: empty completion (one conversation is the other's start)")
    try:
        texts = (template.render(list(prompt), add_generation_prompt=True),
                 template.render(list(prompt) + list(chosen), add_generation_prompt=False),
                 template.render(list(prompt) + list(rejected), add_generation_prompt=False))
    except DataError as err:
        raise DataError(f"{where}: {err}") from None
    except Exception as err:  # noqa: BLE001 - a template that fails on this row's messages: a bad row
        raise DataError(f"{where}: chat template {template.origin} failed: {type(err).__name__}: {err}") from None
    return split_at_prompt(*(tok.encode(t) for t in texts))
