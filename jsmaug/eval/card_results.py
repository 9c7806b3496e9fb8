"""A model card's results: jsmaug evaluate's OUT.json or lm-eval's results file read as the Hub's `EvalResult`s,
merged by identity (task, dataset, its args, metric type and config), and grouped into the card's `model-index`
(one group per task on one dataset with its args and source; jsmaug/eval/card.py says why not by
`huggingface_hub.ModelCardData`)."""

from __future__ import annotations

import json
import math
from pathlib import PurePath
from typing import Any

from huggingface_hub import EvalResult

from jsmaug.errors import DataError

TASK_TYPE = "text-generation"  # the pipeline every result is scored through (as on Open LLM Leaderboard cards)
_METRIC_NAMES = {"acc": "accuracy", "acc_norm": "normalized accuracy", "exact_match": "exact match",
                 "rewards/accuracies": "reward accuracy", "logps/accuracy": "chosen more likely than rejected"}
LM_EVAL_URL = "https://github.com/EleutherAI/lm-evaluation-harness"
_LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")  # lm-eval tasks reading local files


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _result(task: str, dataset_type: str, dataset_name: str, metric: str, value: float, *, shots: int | None,
            config: str | None = None, split: str | None = None, metric_config: str | None = None,
            source_name: str | None = None, source_url: str | None = None) -> EvalResult:
    name = _METRIC_NAMES.get(metric, metric.replace("_", " ")) + (f" ({metric_config})" if metric_config else "")
    if not source_url:  # the Hub's model-index wants a url with every source
        source_name = None
    return EvalResult(task_type=TASK_TYPE, task_name=task, dataset_type=dataset_type, dataset_name=dataset_name,
                      dataset_config=config, dataset_split=split,
                      dataset_args=None if shots is None else {"num_few_shot": int(shots)},
                      metric_type=metric, metric_value=value, metric_name=name, metric_config=metric_config,
                      source_name=source_name, source_url=source_url)


def _jsmaug_results(doc: dict, source_name: str | None, source_url: str | None, where: str) -> list[EvalResult]:
    """An OUT.json of `jsmaug evaluate`: per file, GSM8K-style exact match (strict and flexible), multiple-choice
    acc and acc_norm with their shots, preference-pair accuracies. A local file has no split or Hub id: the
    dataset's type is the file's stem and its name the file name."""
    out, src = [], dict(source_name=source_name or "jsmaug evaluate", source_url=source_url)  # no url: no source
    for key, res in doc["results"].items():
        kind, _, path = key.partition(":")
        if not isinstance(res, dict):
            raise DataError(f"{where}: results[{key!r}] must be an object")
        stem, name = PurePath(path).stem or path, PurePath(path).name or path
        metrics: list[tuple[str, str | None]]
        if kind == "generate":
            task, shots = str(res.get("task", "gsm8k")), res.get("num_fewshot", 0)
            metrics = [("exact_match", "strict-match"), ("exact_match", "flexible-extract")]
        elif kind == "mc":
            task, shots, metrics = "multiple_choice", res.get("num_fewshot", 0), [("acc", None), ("acc_norm", None)]
        elif kind == "preference":
            task, shots = "preference_pairs", None
            metrics = [("rewards/accuracies", None), ("logps/accuracy", None)]
        else:
            raise DataError(f"{where}: results[{key!r}]: not a jsmaug result (keys are generate:FILE, mc:FILE or "
                            "preference:FILE)")
        found = 0
        for metric, filt in metrics:
            value = _number(res.get(f"{metric},{filt}" if filt else metric))
            if value is not None:
                out.append(_result(task, stem, name, metric, value, shots=shots, metric_config=filt, **src))
                found += 1
        if not found and kind != "preference":
            raise DataError(f"{where}: results[{key!r}] has none of {[m for m, _ in metrics]}")
    return out


def _lm_eval_dataset(task: str, cfg: dict) -> tuple[str, str, str | None]:
    """(type, name, config) of an lm-eval task's dataset: the Hub dataset it reads, or for a task over local
    files (`dataset_path: json` with `data_files`) the task's name and the files' names."""
    path = cfg.get("dataset_path") or task
    config = cfg.get("dataset_name")
    if path in _LOCAL_BUILDERS:
        files = (cfg.get("dataset_kwargs") or {}).get("data_files")
        if isinstance(files, dict):  # split -> file(s): the evaluated split's
            split = cfg.get("test_split") or cfg.get("validation_split")
            files = files.get(split, list(files.values()))
        files = [files] if isinstance(files, str) else list(files or [])
        names = [PurePath(str(f)).name for f in files]
        return task, ", ".join(names) or task, config
    return path, path + (f" ({config})" if config else ""), config


def _lm_eval_results(doc: dict, source_name: str | None, source_url: str | None, where: str) -> list[EvalResult]:
    """An lm-evaluation-harness results JSON (0.4's `results`, `n-shot`, `configs`): every `metric,filter` value
    except the standard errors. A subtask of a group with an aggregate (MMLU's 57) is left to its group's figure."""
    version = doc.get("lm_eval_version")
    src = dict(source_name=source_name or ("lm-evaluation-harness" + (f" {version}" if version else "")),
               source_url=source_url or LM_EVAL_URL)
    under_groups = {t for g in doc.get("groups") or {} for t in (doc.get("group_subtasks") or {}).get(g, [])}
    out = []
    for task, metrics in doc["results"].items():
        if task in under_groups:
            continue
        if not isinstance(metrics, dict):
            raise DataError(f"{where}: results[{task!r}] must be an object")
        cfg = (doc.get("configs") or {}).get(task) or {}
        shots = (doc.get("n-shot") or {}).get(task, cfg.get("num_fewshot"))
        dtype, dname, dconfig = _lm_eval_dataset(task, cfg)
        split = cfg.get("test_split") or cfg.get("validation_split")
        for key, v in metrics.items():
            metric, sep, filt = key.partition(",")
            value = _number(v)
            if not sep or metric.endswith("_stderr") or value is None:
                continue
            out.append(_result(task, dtype, dname, metric, value, shots=shots, config=dconfig, split=split,
                               metric_config=None if filt == "none" else filt, **src))
    return out


def eval_results(doc: dict, *, source_name: str | None = None, source_url: str | None = None,
                 where: str = "results") -> list[EvalResult]:
    """The card's results from a jsmaug OUT.json or an lm-evaluation-harness results JSON (told apart by their
    keys); `where` names the file in errors."""
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), dict):
        raise DataError(f"{where}: not a results file: needs a 'results' object (jsmaug evaluate --out, or "
                        "lm_eval --output_path)")
    keys = list(doc["results"])
    if keys and all(k.partition(":")[0] in ("generate", "mc", "preference") and ":" in k for k in keys):
        return _jsmaug_results(doc, source_name, source_url, where)
    if "n-shot" in doc or "configs" in doc or "versions" in doc:
        return _lm_eval_results(doc, source_name, source_url, where)
    raise DataError(f"{where}: neither a jsmaug OUT.json (results keyed generate:/mc:/preference:FILE) nor an "
                    "lm-evaluation-harness results JSON (with n-shot and configs)")


def result_key(r: EvalResult) -> tuple:
    """What makes two results the same figure: task, dataset with its args, metric (a merge replaces it)."""
    return (r.task_type, r.task_name, r.dataset_type, r.dataset_name, r.dataset_config, r.dataset_split,
            json.dumps(r.dataset_args, sort_keys=True), r.metric_type, r.metric_config)


def merge_results(old: list[EvalResult], new: list[EvalResult]) -> list[EvalResult]:
    """`old` with each result of `new` in place of the one with its key; new keys appended in order."""
    fresh = {result_key(r): r for r in new}
    merged = [fresh.pop(result_key(r), r) for r in old]
    return merged + list(fresh.values())


def model_index(model_name: str, results: list[EvalResult]) -> list[dict[str, Any]]:
    """The Hub's `model-index` with one group per (task, dataset with args, source); empty fields left out."""
    groups: dict[tuple, dict[str, Any]] = {}
    for r in results:
        task = {"type": r.task_type, "name": r.task_name}
        dataset = {"name": r.dataset_name, "type": r.dataset_type, "config": r.dataset_config,
                   "split": r.dataset_split, "revision": r.dataset_revision, "args": r.dataset_args}
        source = {"name": r.source_name, "url": r.source_url}
        key = json.dumps([task, dataset, source], sort_keys=True)
        group = groups.setdefault(key, {"task": task, "dataset": dataset, "metrics": [], "source": source})
        group["metrics"].append({"type": r.metric_type, "value": r.metric_value, "name": r.metric_name,
                                 "config": r.metric_config, "args": r.metric_args, "verified": r.verified})
    clean = [_drop_none(g) for g in groups.values()]
    return [{"name": model_name, "results": clean}]


def _drop_none(d):
    if isinstance(d, list):
        return [_drop_none(v) for v in d]
    if isinstance(d, dict):
        kept = {k: _drop_none(v) for k, v in d.items() if v is not None}
        return {k: v for k, v in kept.items() if v != {}}
    return d
