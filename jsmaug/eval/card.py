"""The model card (README.md) of an exported model, in the form the Hugging Face Hub reads.

    write_card(out_dir, base_model=..., license=..., family="mixtral", loss="dpop", training={...},
               datasets=["pairs.jsonl"], results=None)          # out_dir/README.md
    add_results(model_dir, json.load(open("OUT.json")))        # jsmaug evaluate's OUT.json, or lm-eval's

A card is YAML front matter (`base_model`, `library_name: transformers`, `license`, `tags`, `datasets`,
`model-index`) and a Markdown body (what the model is, its training settings, a results table between two
markers that `add_results` rewrites). `huggingface_hub.ModelCard.load` parses it; every card written here is
parsed that way before it is written, so a card the Hub cannot read is never written.

The model-index is grouped by jsmaug/eval/card_results.py, not by `huggingface_hub.ModelCardData`: that groups
results by (task, dataset type, config, split, revision) only, so two few-shot settings of one dataset would share
the first one's `args.num_few_shot`. Here a group is one task on one dataset with its args and source; a result is
identified by (task, dataset, its args, metric type and config), and merging a result with the same identity
replaces it.

Where the base model comes from (`trace_base`): the converter records its source in the checkpoint
(`source.json`: the Hub id when it is known, the folder, the license of the folder's README); a training run
names its start in config.json's `init_from`, followed back (a run from a run) to the first Hub id. A start
known only as a local path is named in the body and left out of `base_model`, which the Hub takes to be a
Hub model id (pass one with `jsmaug export --base_model` or `jsmaug convert --base_model`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from etils import epath
from huggingface_hub import EvalResult, ModelCard

from jsmaug.errors import CheckpointError, ConfigError
from jsmaug.eval.card_results import TASK_TYPE, eval_results, merge_results, model_index
from jsmaug.paths import absolute, atomic_write

CARD = "README.md"
SOURCE_FILE = "source.json"  # what `jsmaug convert` records about the folder it converted
RESULTS_START, RESULTS_END = "<!-- jsmaug:results -->", "<!-- /jsmaug:results -->"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$|^[A-Za-z0-9][\w.-]*$")
_SNAPSHOT = re.compile(r"models--([^/]+)--([^/]+)/snapshots/[^/]+/?$")


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
