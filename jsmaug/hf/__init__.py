"""Hugging Face <-> jsmaug weight conversion (safetensors files through numpy; no torch).

Import (`load`, in `jsmaug/hf/read.py`) reads tensor by tensor and builds each stacked parameter one layer at a
time, so host memory stays near one layer's expert stack. Export (`save`, in `jsmaug/hf/write.py`) writes the
hub layout with the tokenizer files a Mixtral hub repository ships. This module is the public API of both.
"""

from jsmaug.hf.layout import CheckpointError
from jsmaug.hf.read import load, read_config
from jsmaug.hf.write import check_tokenizer_path, commit_dir, prepare_out_dir, save

__all__ = ["CheckpointError", "load", "read_config", "save", "prepare_out_dir", "commit_dir", "check_tokenizer_path"]
