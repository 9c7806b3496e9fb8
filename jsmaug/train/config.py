"""The training run's configuration: typed sections read from YAML plus `key=value` overrides.

Unknown keys and values of the wrong type are errors that name the key (`train.stepz`, `loss.beta`).
The `model` section is a preset name plus any `ModelConfig` field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from jsmaug.data.batches import DataConfig
from jsmaug.models.config import ConfigError, ModelConfig, preset
from jsmaug.parallel.distributed import DistributedConfig
from jsmaug.parallel.sharding import MeshConfig


# Learning-rate schedules, with transformers' names and meanings (`get_scheduler`): each warms up linearly from 0
# over the warm-up steps (but `constant`), then cosine / cosine_with_min_lr: half a cosine to end_lr_fraction x
# peak (0: transformers' `cosine`); linear: a straight line to end_lr_fraction x peak (0: transformers' `linear`);
# constant: the peak from the first step, no warm-up; constant_with_warmup: the peak after the warm-up.
SCHEDULES = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_min_lr")


@dataclasses.dataclass(frozen=True)
class TrainSection:
    steps: int = 100
    batch_size: int = 8  # preference pairs per optimizer step (global, over all processes)
    micro_batches: int = 1  # gradient accumulation: batch_size must be divisible by it
    learning_rate: float = 5e-5
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # TRL's: warm-up of ceil(ratio x steps) steps; not with warmup_steps
    schedule: str = "cosine"  # transformers' names, SCHEDULES above (step.learning_rate_schedule)
    end_lr_fraction: float = 0.0  # cosine / linear end at this fraction of the peak (cosine_with_min_lr's min_lr_rate)
    weight_decay: float = 0.0
    weight_decay_exclude: tuple[str, ...] = ("bias", "norm")  # a path holding one of these: not decayed (HF's rule)
    b1: float = 0.9
    b2: float = 0.95  # TRL's / transformers' adam_beta2 default is 0.999
    eps: float = 1e-8  # TRL's adam_epsilon (same default)
    grad_clip: float = 1.0  # global-norm clipping; 0 = off
    on_nonfinite: str = "skip"  # skip (count and go on) | stop
    logps_chunk_size: int = 64  # >0: log-probs of completion positions only, batch x this many rows at a time; 0: all positions at once


@dataclasses.dataclass(frozen=True)
class LossSection:
    type: str | tuple[str, ...] = "dpop"  # a name (jsmaug.losses.LOSSES, TRL's names), a list, or module:function
    weights: tuple[float, ...] = ()  # one per type; default 1 each
    beta: float = 0.3
    dpop_lambda: float = 50.0
    label_smoothing: float = 0.0
    discopop_tau: float = 0.05
    f_divergence: str = "reverse_kl"  # forward_kl | js_divergence | alpha_divergence (with f_alpha)
    f_alpha: float = 0.5
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0
    ld_alpha: float | None = None  # LD-DPO: weight of the tail beyond the shorter completion
    wpo: bool = False  # WPO's pair weights (TRL's use_weighting)
    params: dict = dataclasses.field(default_factory=dict, hash=False)  # keyword arguments of your own loss


@dataclasses.dataclass(frozen=True)
class ReferenceSection:
    mode: str = "online"  # online | precomputed
    dtype: str = "float32"  # the frozen reference's weights may be kept in bfloat16
    sync_every: int = 0  # TR-DPO: every this many steps ref <- mixup_alpha * policy + (1 - mixup_alpha) * ref
    mixup_alpha: float = 0.6


@dataclasses.dataclass(frozen=True)
class LoraSection:
    rank: int = 0  # 0 = off (full training); > 0: low-rank adapters, the frozen base is the reference
    alpha: float = 16.0  # the adapters' product is scaled by alpha / rank
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "w1", "w3", "w2")
    base_dtype: str = "float32"  # dtype the frozen base is kept in (bfloat16 halves it)
    base_quant: str = "none"  # QLoRA: none | int8 | nf4 | int4, the frozen base's projections (docs/training.md)
    base_quant_group: int = 64  # nf4 / int4: values per scale along each weight's contracted axis


@dataclasses.dataclass(frozen=True)
class CheckpointSection:
    every: int = 50
    keep: int = 3
    async_save: bool = True


@dataclasses.dataclass(frozen=True)
class LogSection:
    every: int = 10
    eval_every: int = 0  # 0 = only at the end
    eval_batches: int = 0  # 0 = the whole eval split
    tensorboard: bool = True


@dataclasses.dataclass(frozen=True)
class DebugSection:
    kill_at_step: int = 0  # tests: SIGKILL this process right after this step (0 = never)
    sigterm_at_step: int = 0  # tests: SIGTERM this process right after this step, as a scheduler would (0 = never)
    nan_at_step: int = 0  # tests: make this step's gradients non-finite (0 = never)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    workdir: str = "runs/default"
    seed: int = 0
    init_from: str | None = None
    export_hf: bool = True
    # jax's persistent compilation cache (jsmaug.train.programs): "auto" = JAX_COMPILATION_CACHE_DIR if set, else
    # $XDG_CACHE_HOME/jsmaug/jax (~/.cache/jsmaug/jax); a folder; null = off
    compilation_cache: str | None = "auto"
    model: ModelConfig = dataclasses.field(default_factory=lambda: preset("tiny"))
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainSection = dataclasses.field(default_factory=TrainSection)
    loss: LossSection = dataclasses.field(default_factory=LossSection)
    reference: ReferenceSection = dataclasses.field(default_factory=ReferenceSection)
    lora: LoraSection = dataclasses.field(default_factory=LoraSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    log: LogSection = dataclasses.field(default_factory=LogSection)
    debug: DebugSection = dataclasses.field(default_factory=DebugSection)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)

    def validate(self) -> "RunConfig":
        def need(cond, key, msg):
            if not cond:
                raise ConfigError(f"{key}: {msg}")
        t = self.train
        need(t.steps > 0, "train.steps", "must be > 0")
        need(t.batch_size > 0, "train.batch_size", "must be > 0")
        need(t.micro_batches > 0 and t.batch_size % t.micro_batches == 0, "train.micro_batches",
             f"must divide train.batch_size={t.batch_size}")
        need(t.schedule in SCHEDULES, "train.schedule", f"must be one of {', '.join(SCHEDULES)} (transformers' names)")
        need(t.warmup_steps >= 0, "train.warmup_steps", "must be >= 0")
        need(0.0 <= t.warmup_ratio < 1.0, "train.warmup_ratio", "must be in [0, 1)")
        need(not (t.warmup_steps and t.warmup_ratio), "train.warmup_ratio",
             f"set train.warmup_steps={t.warmup_steps} or train.warmup_ratio={t.warmup_ratio}, not both")
        need(t.schedule != "constant" or not (t.warmup_steps or t.warmup_ratio), "train.schedule",
             "constant has no warm-up (as in transformers, which ignores it there): for a warm-up, then a constant "
             "rate, write constant_with_warmup")
        need(0.0 <= t.end_lr_fraction <= 1.0, "train.end_lr_fraction", "must be in [0, 1]")
        need(t.end_lr_fraction == 0.0 or t.schedule not in ("constant", "constant_with_warmup"),
             "train.end_lr_fraction", f"means nothing to a {t.schedule} schedule (it is for cosine and linear)")
        need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
        need(all(t.weight_decay_exclude), "train.weight_decay_exclude", "holds an empty name (it would match every "
             "parameter); [] decays every parameter")
        need(t.eps >= 0, "train.eps", "must be >= 0")
        need(t.on_nonfinite in ("skip", "stop"), "train.on_nonfinite", "must be skip or stop")
        from jsmaug.losses import config as loss_config
        objective = loss_config.objective(self.loss)
        need(self.loss.beta > 0, "loss.beta", "must be > 0")
        need(self.loss.dpop_lambda >= 0, "loss.dpop_lambda", "must be >= 0")
        need(self.reference.mode in ("online", "precomputed"), "reference.mode", "must be online or precomputed")
        need(self.reference.dtype in ("float32", "bfloat16"), "reference.dtype", "must be float32 or bfloat16")
        need(self.reference.sync_every >= 0, "reference.sync_every", "must be >= 0 (0: the reference never moves)")
        need(0.0 < self.reference.mixup_alpha <= 1.0, "reference.mixup_alpha", "must be in (0, 1]")
        if self.reference.sync_every:
            need(self.reference.mode == "online", "reference.sync_every",
                 "TR-DPO updates the reference, so it cannot be precomputed (reference.mode=precomputed)")
            need(self.lora.rank == 0, "reference.sync_every", "not with LoRA: there the reference is the policy's "
                 "own frozen base, which an update would move too")
            need(objective.needs_reference, "reference.sync_every", "the loss has no reference to update")
        need(self.data.train_path is not None, "data.train_path", "is required")
        need(self.data.on_bad_row in ("error", "skip"), "data.on_bad_row", "must be error or skip")
        need(self.data.max_prompt_length < self.data.max_length, "data.max_prompt_length",
             f"must be < data.max_length={self.data.max_length}")
        need(self.data.packing_length is None or self.data.max_length <= self.data.packing_length,
             "data.packing_length", f"must hold the longest sequence: >= data.max_length={self.data.max_length}")
        need(self.data.packing_compile_steps >= 0, "data.packing_compile_steps", "must be >= 0")
        need(not self.data.share_prompt or self.data.packing, "data.share_prompt",
             "lays pairs out in packed rows: set data.packing=true too")
        need(not self.data.share_prompt or self.data.packing_length is None
             or self.data.packing_length >= 2 * self.data.max_length, "data.share_prompt",
             f"a pair's unit (prompt, chosen, rejected) may take up to 2 x data.max_length = "
             f"{2 * self.data.max_length} tokens: data.packing_length={self.data.packing_length} must hold it")
        need(self.checkpoint.every > 0, "checkpoint.every", "must be > 0")
        need(self.lora.rank >= 0, "lora.rank", "must be >= 0")
        need(self.lora.alpha > 0, "lora.alpha", "must be > 0")
        from jsmaug.models.config import LORA_TARGETS
        need(len(self.lora.targets) > 0 and set(self.lora.targets) <= set(LORA_TARGETS), "lora.targets",
             f"must be a non-empty list from {list(LORA_TARGETS)}, got {list(self.lora.targets)}")
        need(self.lora.base_dtype in ("float32", "bfloat16"), "lora.base_dtype", "must be float32 or bfloat16")
        from jsmaug.models.quant import FORMATS
        need(self.lora.base_quant in ("none", *FORMATS), "lora.base_quant",
             f"unknown format {self.lora.base_quant!r}; must be one of none, {', '.join(FORMATS)}")
        need(self.lora.base_quant == "none" or self.lora.rank > 0, "lora.base_quant",
             f"{self.lora.base_quant} quantizes the frozen base of LoRA, but lora.rank is 0 (full fine-tuning "
             "trains the base, which cannot be stored quantized): set lora.rank > 0 or lora.base_quant: none")
        need(self.lora.base_quant_group >= 2 and self.lora.base_quant_group % 2 == 0, "lora.base_quant_group",
             f"must be an even number >= 2, got {self.lora.base_quant_group}")
        need(self.log.every > 0, "log.every", "must be > 0")
        self.distributed.validate()
        return self


def _check_type(key: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(key, value, a)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {tp}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner, _) = typing.get_args(tp)
        return tuple(_check_type(f"{key}[{i}]", v, inner) for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `3e-3` (no dot) as a string: accept what float() accepts
            try:
                return float(value.strip())
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    return value


def _build(cls, d: dict[str, Any], prefix: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - fields)
    if prefix == "mesh." and "distributed" in unknown:
        raise ConfigError("mesh.distributed moved to its own section: use distributed.enabled=true (and, outside "
                          "a cluster JAX detects, distributed.coordinator_address, num_processes, process_id)")
    if unknown:
        raise ConfigError(f"unknown config key '{prefix}{unknown[0]}'; known keys here: {sorted(fields)}")
    kw = {}
    for name, value in d.items():
        key = prefix + name
        tp = hints[name]
        if dataclasses.is_dataclass(tp) and tp is not ModelConfig:
            kw[name] = _build(tp, value, key + ".")
        elif tp is ModelConfig:
            kw[name] = _model(value, key + ".")
        else:
            kw[name] = _check_type(key, value, tp)
    return cls(**kw)


def section_values(cls, given: dict[str, Any] | None, name: str) -> dict[str, Any]:
    """One section of a run's config.json (what the run was given) as the run read it, for reports: each field
    typed as the run types it (`1e-5`, which YAML 1.1 reads as a string, is the number again), the defaults
    filled in; a value that does not type (a config.json of another version) is left as it was."""
    given, hints = dict(given or {}), typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        value = given.get(f.name, getattr(cls(), f.name))
        try:
            out[f.name] = _check_type(f"{name}.{f.name}", value, hints[f.name])
        except ConfigError:
            out[f.name] = value
    return out


def _model(d: dict[str, Any], prefix: str) -> ModelConfig:
    if d is not None and not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.')}: expected a mapping, got {d!r}")
    d = dict(d or {})
    name = d.pop("preset", "tiny")
    hints = typing.get_type_hints(ModelConfig)
    for k, v in d.items():
        if k not in hints:
            raise ConfigError(f"unknown config key '{prefix}{k}' (a ModelConfig field or 'preset')")
        d[k] = _check_type(prefix + k, v, hints[k])
    try:
        return preset(name, **d)
    except ConfigError as err:
        raise ConfigError(f"{prefix.rstrip('.')}: {err}") from err


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = tree.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
        tree = node
    tree[keys[-1]] = value


PACKAGE_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_CONFIGS = PACKAGE_ROOT / "configs"  # package data; the checkout's top-level configs/ links here


def shipped_configs() -> list[str]:
    return sorted(p.stem for p in SHIPPED_CONFIGS.glob("*.yaml"))


def resolve_config_path(path: str) -> Path:
    """A config file, or the name of a shipped config (`tiny_dpop`, `tiny_dpop.yaml`): `jsmaug train tiny_dpop`
    works from any folder of a pip-installed jsmaug."""
    p = Path(path)
    if p.exists():
        return p
    shipped = SHIPPED_CONFIGS / (p.name if p.suffix == ".yaml" else f"{p.name}.yaml")
    if p.parent == Path(".") or str(p.parent) == "configs":
        if shipped.exists():
            return shipped
    raise ConfigError(f"{p}: config file not found (nor a shipped config; they are: {', '.join(shipped_configs())})")


def _shipped_data_paths(raw: dict) -> None:
    """A shipped config names the sample data as `data/sample/...` (the checkout's path); where that is not in the
    working folder, the package's own copy is used."""
    section = raw.get("data") or {}
    for key in ("train_path", "eval_path"):
        v = section.get(key)
        if isinstance(v, str) and v.startswith("data/sample/") and not Path(v).exists():
            section[key] = str(PACKAGE_ROOT / v)


def load_run_config(path: str | None, overrides: list[str] = ()) -> tuple[RunConfig, dict]:
    """Reads a YAML file and `key=value` overrides (values parsed as YAML). Returns (config, raw dict)."""
    raw: dict = {}
    if path is not None:
        p = resolve_config_path(path)
        raw = _parse_yaml(p.read_text(), str(p)) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: the top level must be a mapping")
        if p.parent == SHIPPED_CONFIGS:
            _shipped_data_paths(raw)
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r}: expected key=value")
        k, v = ov.split("=", 1)
        _set_dotted(raw, k.strip(), _parse_yaml(v, f"override {ov!r}") if v.strip() else None)
    return _build(RunConfig, raw, "").validate(), raw


def _parse_yaml(text: str, where: str):
    """yaml.safe_load with errors as `FILE:line:col: problem` (1-based, as editors count)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        problem = getattr(err, "problem", None) or str(err)
        context = getattr(err, "context", None)
        loc = f"{where}:{mark.line + 1}:{mark.column + 1}" if mark is not None else where
        raise ConfigError(f"{loc}: {problem}" + (f" ({context})" if context else "")) from None
