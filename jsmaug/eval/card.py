"""The model card (README.md) of an exported model, in the form the Hugging Face Hub reads.

    write_card(out_dir, base_model=..., license=..., family="mixtral", loss="dpop", training={...},
               datasets=["pairs.jsonl"], results=None)          # out_dir/README.md
    add_results(model_dir, json.load(open("OUT.json")))        # jsmaug evaluate's OUT.json, or lm-eval's

A card is YAML front matter (`base_model`, `library_name: transformers`, `license`, `tags`, `datasets`,
`model-index`) and a Markdown body (what the model is, its training settings, a results table between two
markers that `add_results` rewrites). `huggingface_hub.ModelCard.load` parses it; every card written here is
parsed that way before it is written, so a card the Hub cannot read is never written.

The model-index is grouped here, not by `huggingface_hub.ModelCardData`: that groups results by (task, dataset
type, config, split, revision) only, so two few-shot settings of one dataset would share the first one's
`args.num_few_shot`. Here a group is one task on one dataset with its args and source; a result is identified
by (task, dataset, its args, metric type and config), and merging a result with the same identity replaces it.

Where the base model comes from (`trace_base`): the converter records its source in the checkpoint
(`source.json`: the Hub id when it is known, the folder, the license of the folder's README); a training run
names its start in config.json's `init_from`, followed back (a run from a run) to the first Hub id. A start
known only as a local path is named in the body and left out of `base_model`, which the Hub takes to be a
Hub model id (pass one with `jsmaug export --base_model` or `jsmaug convert --base_model`).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePath
from typing import Any

import yaml
from etils import epath
from huggingface_hub import EvalResult, ModelCard

from jsmaug.errors import CheckpointError, ConfigError, DataError
from jsmaug.paths import absolute, atomic_write

CARD = "README.md"
SOURCE_FILE = "source.json"  # what `jsmaug convert` records about the folder it converted
RESULTS_START, RESULTS_END = "<!-- jsmaug:results -->", "<!-- /jsmaug:results -->"
TASK_TYPE = "text-generation"  # the pipeline every result is scored through (as on Open LLM Leaderboard cards)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$|^[A-Za-z0-9][\w.-]*$")
_SNAPSHOT = re.compile(r"models--([^/]+)--([^/]+)/snapshots/[^/]+/?$")
_METRIC_NAMES = {"acc": "accuracy", "acc_norm": "normalized accuracy", "exact_match": "exact match",
                 "rewards/accuracies": "reward accuracy", "logps/accuracy": "chosen more likely than rejected"}
LM_EVAL_URL = "https://github.com/EleutherAI/lm-evaluation-harness"
_LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow")  # lm-eval tasks reading local files


# ------------------------------------------------------------------------------------------------ the base model

def hub_id_of_folder(hf_dir: str | os.PathLike) -> str | None:
    """The Hub id of a Hugging Face folder, when it can be known: a folder in the Hub cache
    (`.../models--ORG--NAME/snapshots/SHA`), else config.json's `_name_or_path` when that is an id and not a
    local path (transformers 5 no longer writes it; older exports have it)."""
    folder = Path(hf_dir).resolve()
    m = _SNAPSHOT.search(folder.as_posix())
    if m:
        return f"{m.group(1)}/{m.group(2)}"
    try:
        name = json.loads((folder / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(name, str) and _HUB_ID.match(name) and not Path(name).exists() and not name.startswith("."):
        return name
    return None


def check_hub_id(value: str | None, flag: str = "--base_model") -> str | None:
    """`value` if it reads as a Hub model id (`org/name` or `name`), else a ConfigError naming the flag."""
    if value is not None and not _HUB_ID.match(value):
        raise ConfigError(f"{flag} {value!r}: not a Hub model id (org/name); the Hub reads base_model as one")
    return value


def card_license(folder: str | os.PathLike) -> dict[str, str]:
    """`license` (and `license_name` / `license_link` for "other") from a folder's README.md front matter."""
    path = Path(folder) / CARD
    if not path.is_file():
        return {}
    try:
        data = ModelCard.load(path, ignore_metadata_errors=True).data.to_dict()
    except (ValueError, OSError, yaml.YAMLError):
        return {}
    return {k: str(data[k]) for k in ("license", "license_name", "license_link") if data.get(k)}


def source_metadata(hf_dir: str | os.PathLike, base_model: str | None = None) -> dict[str, Any]:
    """What the converter records in its checkpoint's source.json."""
    return {"hf_dir": str(Path(hf_dir).resolve()), "base_model": check_hub_id(base_model) or hub_id_of_folder(hf_dir),
            **card_license(hf_dir)}


@dataclass
class Base:
    """The model a checkpoint started from: its Hub id (None when only local paths are known), the license
    found on the way, and the local chain from the nearest start back to the first Hub id."""
    base_model: str | None = None
    license: dict[str, str] = field(default_factory=dict)
    chain: list[str] = field(default_factory=list)


def trace_base(path: str | os.PathLike | None, _depth: int = 0) -> Base:
    """The base of a start `path` (a training run's `init_from`): a converter checkpoint (its source.json), a
    training workdir (its own `init_from`, followed), or a Hugging Face folder. None: a random init."""
    if not path or _depth > 8:
        return Base()
    p = Path(path)
    if (p / SOURCE_FILE).is_file():
        try:
            meta = json.loads((p / SOURCE_FILE).read_text())
        except ValueError:  # damaged: the path is all that is known
            return Base(chain=[str(path)])
        lic = {k: meta[k] for k in ("license", "license_name", "license_link") if meta.get(k)}
        chain = [str(path)] + ([meta["hf_dir"]] if meta.get("hf_dir") else [])
        return Base(meta.get("base_model"), lic, chain)
    if (p / "checkpoints").is_dir() and (p / "config.json").is_file():
        try:
            start = json.loads((p / "config.json").read_text()).get("init_from")
        except ValueError:
            start = None
        up = trace_base(start, _depth + 1)
        return Base(up.base_model, up.license, [str(path), *up.chain])
    if (p / "config.json").is_file() and not (p / "model_config.json").is_file():  # a Hugging Face folder
        return Base(hub_id_of_folder(p), card_license(p), [str(path)])
    return Base(chain=[str(path)])


def choose_license(base_license: dict[str, str], given: str | None, log=print) -> dict[str, str]:
    """The card's license fields: the base's when known (its terms bind its fine-tunes), else `given`."""
    if given and base_license.get("license") not in (None, given):
        log(f"note: --license {given} not used: the base's license is {base_license['license']}")
    return dict(base_license) or ({"license": given} if given else {})


# ------------------------------------------------------------------------------------------------ results

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


# ------------------------------------------------------------------------------------------------ the card

def results_table(results: list[EvalResult]) -> str:
    if not results:
        return ("No results recorded yet: `jsmaug evaluate --model DIR ... --out OUT.json --card DIR` adds them "
                "(or `--card DIR --lm_eval_results FILE` for lm-evaluation-harness's).")
    rows = ["| task | dataset | split | shots | metric | value | source |", "|---|---|---|---|---|---|---|"]
    for r in results:
        shots = (r.dataset_args or {}).get("num_few_shot", "")
        rows.append(f"| {r.task_name or r.task_type} | {r.dataset_name} | {r.dataset_split or ''} | {shots} | "
                    f"{r.metric_name or r.metric_type} | {r.metric_value:.4f} | {r.source_name or 'jsmaug'} |")
    return "\n".join(rows)


def _results_block(results: list[EvalResult]) -> str:
    return f"{RESULTS_START}\n{results_table(results)}\n{RESULTS_END}"


def _body(name: str, base_model: str | None, base_note: str | None, family: str, loss: str, training: dict,
          datasets: list[str], results: list[EvalResult], description: str | None) -> str:
    start = (f"[{base_model}](https://huggingface.co/{base_model})" if base_model else
             f"`{base_note}` (a local checkpoint; no Hub id known)" if base_note else "a random initialisation")
    what = (f"fine-tuned from {start} with jsmaug (JAX), loss `{loss}`" if loss else
            f"converted from {start} by jsmaug, not fine-tuned")
    lines = [f"# {name}", "", description or f"A {family} decoder, {what}."]
    if datasets:
        lines += ["", "Training data: " + ", ".join(f"`{d}`" for d in datasets) + "."]
    if training:
        lines += ["", "## Training", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in training.items()]
    lines += ["", "## Results", "", "Fractions in [0, 1] (lm-evaluation-harness's scale).", "",
              _results_block(results), "", "## Use", "", "```python",
              "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              'model = AutoModelForCausalLM.from_pretrained("PATH_OR_REPO")',
              'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")', "```", ""]
    return "\n".join(lines)


def _render(meta: dict[str, Any], body: str, path) -> str:
    """Front matter + body, parsed back with huggingface_hub before it may be written."""
    text = "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n" + body
    try:
        ModelCard(text)
    except ValueError as err:
        raise CheckpointError(f"{path}: the model card would not parse on the Hub ({err})") from err
    return text


def write_card(out_dir, *, base_model: str | None, license: str | None, family: str, loss: str,
               training: dict, datasets: list[str], results: list | None = None, model_name: str | None = None,
               base_note: str | None = None, tags: list[str] | None = None, metadata: dict | None = None,
               description: str | None = None) -> epath.Path:
    """Writes out_dir/README.md (atomically) and returns its path. `loss` may name several (`dpo+sft`) or be ''
    (a converted checkpoint); `training` is a table of setting -> value; `results` EvalResults or a results
    JSON (`eval_results`); `base_note` names a local start when no Hub id is known; `metadata` adds front-matter
    keys (`license_name`, `license_link`); `description` replaces the first line of the body. The model's name is
    the folder's (a run's `WORKDIR/hf`: the run's)."""
    out_dir = absolute(out_dir)
    name = model_name or (out_dir.parent.name if out_dir.name == "hf" else out_dir.name)
    if results is not None and not isinstance(results, list):
        results = eval_results(results)
    results = list(results or [])
    losses = [s.strip() for s in loss.split("+") if s.strip()]
    all_tags = list(dict.fromkeys(["jsmaug", *(t.rpartition(":")[2] for t in losses), family, *(tags or [])]))
    meta: dict[str, Any] = {"base_model": base_model, "library_name": "transformers", "license": license,
                            "tags": all_tags, "datasets": list(datasets) or None, "pipeline_tag": TASK_TYPE}
    meta = {k: v for k, v in {**meta, **(metadata or {})}.items() if v is not None}
    if results:
        meta["model-index"] = model_index(name, results)
    path = out_dir / CARD
    body = _body(name, base_model, base_note, family, loss, training, datasets, results, description)
    atomic_write(path, _render(meta, body, path))
    return path


def load_card(model_dir) -> tuple[dict[str, Any], str, list[EvalResult]]:
    """(front matter, body, results) of model_dir/README.md; a card that does not parse is an error naming it."""
    path = epath.Path(model_dir) / CARD
    text = path.read_text()
    try:
        card = ModelCard(text)
        meta = yaml.safe_load(text.split("---", 2)[1]) if text.startswith("---") else {}
    except (ValueError, yaml.YAMLError, IndexError) as err:
        raise CheckpointError(f"{path}: not a model card the Hub reads ({err})") from err
    return meta or {}, card.text, list(card.data.eval_results or [])


def add_results(model_dir, results: dict, *, source_name: str | None = None, source_url: str | None = None,
                where: str | None = None) -> epath.Path:
    """Merges a jsmaug OUT.json or an lm-eval results JSON into model_dir/README.md's model-index (the same task,
    dataset and metric replaced) and its results table, atomically. A folder without a card gets a minimal one
    (its family from config.json)."""
    model_dir = absolute(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: no such model folder (--card names the exported model's folder)")
    new = eval_results(results, source_name=source_name, source_url=source_url, where=where or "results")
    path = model_dir / CARD
    if not path.is_file():
        try:
            family = json.loads((model_dir / "config.json").read_text()).get("model_type", "")
        except (OSError, ValueError, AttributeError):
            family = ""
        return write_card(model_dir, base_model=None, license=None, family=family or "decoder", loss="",
                          training={}, datasets=[], results=new,
                          description=f"A {family or 'decoder'} model. This card was started by `jsmaug evaluate "
                          "--card` and holds its results only.")
    meta, body, old = load_card(model_dir)
    merged = merge_results(old, new)
    index = meta.get("model-index")
    name = index[0].get("name") if isinstance(index, list) and index and isinstance(index[0], dict) else None
    meta["model-index"] = model_index(name or model_dir.name, merged)
    if RESULTS_START in body and RESULTS_END in body:
        head, rest = body.split(RESULTS_START, 1)
        body = head + _results_block(merged) + rest.split(RESULTS_END, 1)[1]
    else:  # a card written elsewhere: the table goes at the end
        body = body.rstrip("\n") + "\n\n## Results\n\n" + _results_block(merged) + "\n"
    atomic_write(path, _render(meta, body.lstrip("\n"), path))
    return path
