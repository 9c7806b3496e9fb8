"""HF TRL 1.16, unmodified, scores a jsmaug export exactly like jsmaug: per-completion log-probs of TRL's
`DPOTrainer` (its precomputed reference log-probs: the export is its own reference) equal jsmaug's `evaluate`
numbers, for plain pairs whose completions start with a space and for conversations under a chat template.

TRL tokenises prompt + completion as one text with the EOS *string* appended; this only agrees with jsmaug if
jsmaug tokenises the same way and the export's tokenizer reads "</s>" as the EOS id."""

import json

import jax
import numpy as np
import pytest

from jsmaug import hf
from jsmaug.hf.trl_reference import trl_reference_logps

from jsmaug.data import batches as data

from jsmaug.models import config as cfg_lib, decoder as model

from jsmaug import eval as eval_lib

trl = pytest.importorskip("trl", reason="trl is in the test extra (pip install -e '.[test]')")

TEMPLATE = "configs/chat_templates/mixtral_instruct.jinja"
PLAIN = [{"prompt": "Question: Who is older, Zoe or Omar?\nAnswer:", "chosen": " Zoe", "rejected": " Omar"},
         {"prompt": "Q: Mia has 3 apples and buys 4 more. How many now?\nA:", "chosen": " 3 + 4 = 7. The answer is 7",
          "rejected": " 3 + 4 = 8. The answer is 8"},
         {"prompt": "Hello wor", "chosen": "ld", "rejected": "ld peace"},  # tokens merged across the boundary
         {"prompt": "Which planet is closest to the Sun?", "chosen": "  Mercury.", "rejected": " Venus</s>"}]
CONV = [{"prompt": [{"role": "user", "content": "What colour is the sky?"}],
         "chosen": [{"role": "assistant", "content": "It is blue."}],
         "rejected": [{"role": "assistant", "content": "Green, mostly."}]},
        {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                    {"role": "user", "content": "2+2?"}],
         "chosen": [{"role": "assistant", "content": " 4"}], "rejected": [{"role": "assistant", "content": " 5"}]}]


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    config = cfg_lib.preset("tiny", vocab_size=32000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    params = model.init_params(config, jax.random.key(7))
    hf.save(out / "hf", config, params, tokenizer_path=data.Tokenizer().path, chat_template=open(TEMPLATE).read())
    return out, config, params


@pytest.mark.parametrize("rows,chat_template", [(PLAIN, None), (CONV, TEMPLATE)], ids=["plain", "conversational"])
def test_trl_dpo_trainer_gives_jsmaugs_log_probs(export, tmp_path, rows, chat_template):
    out, config, params = export
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, report = data.prepare(path, data.DataConfig(max_length=256, max_prompt_length=128,
                                                          chat_template=chat_template))
    assert report.kept == len(rows)
    ours = eval_lib.preference_eval(config, params, examples)["per_pair"]
    trl_c, trl_r = trl_reference_logps(out / "hf", rows, tmp_path / "trl")
    np.testing.assert_allclose(ours["policy_chosen"], trl_c, atol=1e-3, rtol=0)
    np.testing.assert_allclose(ours["policy_rejected"], trl_r, atol=1e-3, rtol=0)
    # The per-completion log-probs are of order -10 nats per token here, so a stray or missing token (the old
    # tokenisation's extra "▁", or "</s>" split into three pieces) would be ~10 nats off.
    assert np.all(np.abs(trl_c) > 15)
