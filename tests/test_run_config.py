"""The run config: every spelling of a float, errors that name the key, YAML syntax errors located in the file."""

import pytest

from jsmaug.models.config import ConfigError
from jsmaug.train.config import load_run_config


def test_floats_in_every_spelling(tmp_path):
    cfg, _ = load_run_config("configs/tiny_dpop.yaml", ["train.learning_rate=3e-3", "loss.beta=1e-1",
                                                         "loss.dpop_lambda=5E1", "train.weight_decay=.01"])
    assert (cfg.train.learning_rate, cfg.loss.beta, cfg.loss.dpop_lambda, cfg.train.weight_decay) == \
        (3e-3, 0.1, 50.0, 0.01)
    # YAML 1.1 reads `3e-3` (no dot) in a file as a string, too.
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  train_path: x.jsonl\ntrain:\n  learning_rate: 3e-3\nloss:\n  beta: 2e-1\n")
    cfg, _ = load_run_config(str(path))
    assert cfg.train.learning_rate == 0.003 and cfg.loss.beta == 0.2


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", "unknown config key 'train.stepz'"),
    ("loss.beta=high", "loss.beta: expected a number, got 'high'"),
    ("loss.type=kto", "loss.type: unknown loss type .kto.; known: \[.aot."),
    ("model.hidden_sizes=3", "model.hidden_sizes"),
    ("train.batch_size=1.5", "train.batch_size: expected an integer"),
    ("model=5", "^model: expected a mapping, got 5$"),
    ("train=5", "^train: expected a mapping, got 5$"),
    ("train.steps=[1", r"^override 'train.steps=\[1':1:3: expected ',' or '\]'"),
    ("lora.targets=[w4]", r"^lora.targets: must be a non-empty list from"),
    ("lora.base_dtype=int8", r"^lora.base_dtype: must be float32 or bfloat16"),
    ("mesh.distributed=true", r"^mesh.distributed moved to its own section: use distributed.enabled=true"),
    ("distributed.coordinator_address=localhost", r"^distributed.coordinator_address: expected host:port"),
    ("distributed.process_id=2", None),
    ("distributed.initialization_timeout=0", r"^distributed.initialization_timeout: must be >= 1 second"),
    ("train.warmup_ratio=0.1", r"^train.warmup_ratio: set train.warmup_steps=10 or train.warmup_ratio=0.1, not both"),
    (["train.warmup_steps=0", "train.warmup_ratio=1.0"], r"^train.warmup_ratio: must be in \[0, 1\)"),
    ("train.schedule=polynomial", r"^train.schedule: must be one of cosine, linear, constant, constant_with_warmup, "
                                  r"cosine_with_min_lr \(transformers' names\)"),
    ("train.schedule=constant", r"^train.schedule: constant has no warm-up .* write constant_with_warmup"),
    (["train.schedule=constant_with_warmup", "train.end_lr_fraction=0.1"],
     r"^train.end_lr_fraction: means nothing to a constant_with_warmup schedule"),
    ("train.end_lr_fraction=1.5", r"^train.end_lr_fraction: must be in \[0, 1\]"),
    ("train.weight_decay_exclude=[bias, '']", r"^train.weight_decay_exclude: holds an empty name"),
    ("train.eps=-1e-8", r"^train.eps: must be >= 0"),
])
def test_errors_name_the_key(override, message):
    if message is None:  # process_id 2 with num_processes 2
        override, message = [override, "distributed.num_processes=2"], r"^distributed.process_id: must be in \[0, "
    with pytest.raises(ConfigError, match=message):
        load_run_config("configs/tiny_dpop.yaml", override if isinstance(override, list) else [override])


def test_trl_settings_as_keys():
    """TRL's adam_epsilon / warmup_ratio / schedule names / decay rule have keys; the defaults keep old configs."""
    cfg, _ = load_run_config("configs/tiny_dpop.yaml", [
        "train.warmup_steps=0", "train.warmup_ratio=0.1", "train.schedule=cosine_with_min_lr",
        "train.end_lr_fraction=0.1", "train.eps=1e-6", "train.weight_decay_exclude=[bias, norm, embed_tokens]"])
    t = cfg.train
    assert (t.warmup_ratio, t.schedule, t.eps, t.weight_decay_exclude) == \
        (0.1, "cosine_with_min_lr", 1e-6, ("bias", "norm", "embed_tokens"))
    default, _ = load_run_config("configs/tiny_dpop.yaml")
    assert (default.train.eps, default.train.warmup_ratio, default.train.weight_decay_exclude) == \
        (1e-8, 0.0, ("bias", "norm"))


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  steps: 3\n  learning_rate: [0.1\nloss:\n  beta: 0.3\n")
    with pytest.raises(ConfigError, match=rf"^{path}:4:5: expected .,. or .\]."):
        load_run_config(str(path))


def test_shipped_configs_load():
    for name in ("tiny_dpop", "tiny_dpo", "smaug_mixtral_8x7b"):
        cfg, _ = load_run_config(f"configs/{name}.yaml")
        assert cfg.loss.type in ("dpop", "dpo")
        assert cfg.distributed.active == (name == "smaug_mixtral_8x7b")  # the pod config runs one process per host
