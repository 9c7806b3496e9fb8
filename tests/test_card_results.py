"""A card's results (jsmaug/eval/card_results.py) read from an lm-eval results file: a group's aggregate stands
for its subtasks, a Hub dataset is named by its path, config and split, and a file that is no results file, or a
result without any of its metrics, is refused naming the file and the key. (The round trip through a card, with
results that lm-eval's own evaluator made, is tests/test_card.py's.)"""

import pytest

from jsmaug.errors import DataError
from jsmaug.eval import card_results


def test_lm_eval_groups_hub_datasets_and_bad_files():
    """A group's aggregate stands for its subtasks; a Hub dataset is named by its path and config."""
    doc = {"results": {"mmlu": {"acc,none": 0.4, "acc_stderr,none": 0.01, "alias": "mmlu"},
                       "mmlu_anatomy": {"acc,none": 0.3, "alias": " - anatomy"},
                       "arc_challenge": {"acc,none": 0.5, "acc_norm,none": 0.55, "acc_norm_stderr,none": "N/A"}},
           "groups": {"mmlu": {"acc,none": 0.4}}, "group_subtasks": {"mmlu": ["mmlu_anatomy"], "arc_challenge": []},
           "configs": {"arc_challenge": {"dataset_path": "allenai/ai2_arc", "dataset_name": "ARC-Challenge",
                                         "test_split": "test", "num_fewshot": 25}},
           "n-shot": {"mmlu": 5, "mmlu_anatomy": 5, "arc_challenge": 25}, "versions": {}}
    got = {(r.task_name, r.dataset_type, r.dataset_config, r.dataset_split, r.dataset_args["num_few_shot"],
            r.metric_type): r.metric_value for r in card_results.eval_results(doc)}
    assert got == {("mmlu", "mmlu", None, None, 5, "acc"): 0.4,
                   ("arc_challenge", "allenai/ai2_arc", "ARC-Challenge", "test", 25, "acc"): 0.5,
                   ("arc_challenge", "allenai/ai2_arc", "ARC-Challenge", "test", 25, "acc_norm"): 0.55}
    with pytest.raises(DataError, match="scores.json: neither a jsmaug OUT.json"):
        card_results.eval_results({"results": {"x": {}}}, where="scores.json")
    with pytest.raises(DataError, match=r"o.json: results\['mc:a.jsonl'\] has none of"):
        card_results.eval_results({"results": {"mc:a.jsonl": {"rows": 2}}}, where="o.json")
