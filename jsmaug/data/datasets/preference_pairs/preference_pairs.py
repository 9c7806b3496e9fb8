"""TFDS builder for preference pairs from local JSONL / Parquet files (array_record; no TensorFlow needed).

Nothing is downloaded: the files lie in the builder's manual_dir. Builder configs describe the file layouts of
the DPOP paper's datasets as their hub repositories ship them, plus a generic one:

    generic     manual_dir/{train,test}.jsonl or .parquet
    metamath    abacusai/MetaMath_DPO_FewShot   (data/train-*.parquet, data/test-*.parquet, or *.jsonl)
    arc         abacusai/ARC_DPO_FewShot
    hellaswag   abacusai/HellaSwag_DPO_FewShot

Each example is {prompt, chosen, rejected} (text). Column names are configurable per config. Rows whose fields
are missing or not strings fail the build with the file and row; content checks (empty or identical
completions) are made when the pairs are tokenised, under `data.on_bad_row`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import tensorflow_datasets as tfds

_PATTERNS = {
    "train": ("train.jsonl", "train.parquet", "train-*.parquet", "data/train-*.parquet", "train*.jsonl"),
    "test": ("test.jsonl", "test.parquet", "test-*.parquet", "data/test-*.parquet", "test*.jsonl",
             "eval.jsonl", "data/eval-*.parquet"),
}


@dataclasses.dataclass
class PreferencePairsConfig(tfds.core.BuilderConfig):
    prompt_key: str = "prompt"
    chosen_key: str = "chosen"
    rejected_key: str = "rejected"


class PreferencePairs(tfds.core.GeneratorBasedBuilder):
    """Pairwise preference data: a prompt, a chosen completion and a rejected one."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release."}
    BUILDER_CONFIGS = [
        PreferencePairsConfig(name="generic", description="manual_dir/{train,test}.{jsonl,parquet}"),
        PreferencePairsConfig(name="metamath", description="abacusai/MetaMath_DPO_FewShot (393,999 / 1,000)"),
        PreferencePairsConfig(name="arc", description="abacusai/ARC_DPO_FewShot (3,357 / 895)"),
        PreferencePairsConfig(name="hellaswag", description="abacusai/HellaSwag_DPO_FewShot (119,715 / 30,126)"),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the dataset's files in manual_dir: train and test splits as JSONL or Parquet with string columns "
        "prompt, chosen, rejected (for the hub datasets, the repository's data/*.parquet files as they are).")

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({
                "prompt": tfds.features.Text(), "chosen": tfds.features.Text(), "rejected": tfds.features.Text()}),
            homepage="https://arxiv.org/abs/2402.13228")

    def _split_generators(self, dl_manager):
        manual = Path(dl_manager.manual_dir)
        splits = {}
        for split, patterns in _PATTERNS.items():
            files = []
            for pat in patterns:
                files += sorted(str(p) for p in manual.glob(pat))
            files = sorted(set(files))
            if files:
                splits[split] = self._generate_examples(files)
        if "train" not in splits:
            raise FileNotFoundError(f"{manual}: no train file (looked for {', '.join(_PATTERNS['train'])})")
        return splits

    def _generate_examples(self, files):
        from jsmaug.data.files import DataError, read_rows

        c = self.builder_config
        for path in files:
            for i, (where, row) in enumerate(read_rows(path)):
                if isinstance(row, DataError):
                    raise row
                out = {}
                for name, key in (("prompt", c.prompt_key), ("chosen", c.chosen_key), ("rejected", c.rejected_key)):
                    if not isinstance(row, dict) or key not in row:
                        raise DataError(f"{where}: missing field {key!r}")
                    if not isinstance(row[key], str):
                        raise DataError(f"{where}: field {key!r} must be a string, got {type(row[key]).__name__}")
                    out[name] = row[key]
                yield f"{Path(path).name}:{i}", out
