"""Evaluation of a model, as the ecosystem scores it: preference pairs (log-probs, implicit rewards), multiple
choice (lm-eval's acc / acc_norm, with few-shot contexts), GSM8K by generation (lm-eval's exact match), and
the reports (JSON, table; the model card is `jsmaug.eval.card`).

    from jsmaug import eval as ev
    config, params = ev.load_model("runs/x/hf")
    res = ev.gsm8k_eval(config, params, tok, ev.read_gsm8k("test.jsonl"), num_fewshot=5,
                        fewshot_rows=ev.read_gsm8k("train.jsonl"))
"""

from jsmaug.eval.gsm8k import gsm8k_eval, read_gsm8k
from jsmaug.eval.loading import load_model, model_tokenizer_path
from jsmaug.eval.logprobs import completion_logps
from jsmaug.eval.multiple_choice import (CONTEXT_KEYS, GOLD_KEYS, encode_pair, multiple_choice_eval,
                                         read_multiple_choice)
from jsmaug.eval.preference import preference_eval
from jsmaug.eval.results import mean_stderr, summary_table, write_json

__all__ = ["CONTEXT_KEYS", "GOLD_KEYS", "completion_logps", "encode_pair", "gsm8k_eval", "load_model",
           "mean_stderr", "model_tokenizer_path", "multiple_choice_eval", "preference_eval", "read_gsm8k",
           "read_multiple_choice", "summary_table", "write_json"]
