"""Moved to `jsmaug.eval` (a package of its own); this module re-exports its names so that older imports
(`from jsmaug.train import eval as eval_lib`) keep working."""

from jsmaug.eval import (CONTEXT_KEYS, GOLD_KEYS, completion_logps, encode_pair, load_model,  # noqa: F401
                         model_tokenizer_path, multiple_choice_eval, preference_eval, read_multiple_choice,
                         summary_table, write_json)
