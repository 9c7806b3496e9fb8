"""The errors a user meets, one class each, defined once (every layer may import them: nothing is imported here).

Each message names the file, row, field, key, tensor or checkpoint at fault; the CLI prints it as one `error:`
line and exits with 2 (1 for a training run).
"""


class ConfigError(ValueError):
    """A config (or config.json) that jsmaug cannot use; the message names the field."""


class DataError(ValueError):
    """A bad input file or row; the message names the file and row (1-based line for JSONL)."""


class CheckpointError(ValueError):
    """A checkpoint (jsmaug's Orbax folder or a Hugging Face one) that cannot be read or written; the message
    names the folder, file or tensor at fault."""
