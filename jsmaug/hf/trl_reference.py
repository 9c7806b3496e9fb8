"""TRL's own numbers for an exported checkpoint: the per-completion log-probs HF TRL 1.16's `DPOTrainer`,
unmodified, precomputes as its reference (`precompute_ref_log_probs=True`), which is the export scored as its
own reference. `tests/test_trl_parity.py` and `tools/real_weights.py` hold jsmaug's `evaluate` numbers to them.

Needs torch, transformers, datasets and trl (the test extra); they are imported on call.
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np


def trl_reference_logps(hf_dir: str | Path, rows: list[dict], workdir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(chosen, rejected) log-probs, float64, one per row of `rows` ({prompt, chosen, rejected}, TRL's plain or
    conversational format), from the HF checkpoint in `hf_dir` and its tokenizer; TRL writes under `workdir`."""
    import datasets
    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model_pt = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    args = trl.DPOConfig(output_dir=str(workdir), precompute_ref_log_probs=True, per_device_train_batch_size=2,
                         report_to="none", use_cpu=True, max_length=None, bf16=False, dataset_num_proc=None)
    trainer = trl.DPOTrainer(model=model_pt, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=tok)
    ds = trainer.train_dataset
    out = np.asarray(ds["ref_chosen_logps"], np.float64), np.asarray(ds["ref_rejected_logps"], np.float64)
    del trainer, model_pt
    gc.collect()
    return out
