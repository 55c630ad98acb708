"""Configs as data: frozen dataclasses loaded from YAML with ``key=value`` overrides.

A config file is a mapping of sections (``model``, ``memory``, ``sampler``, ``text``, ``vae``, ``train``)
to field values. Unknown sections or keys are errors that name the key and list the valid ones.
Overrides use dotted paths: ``model.num_layers=2 memory.sma=true``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import yaml


class ConfigError(ValueError):
    """A config file or override that does not fit the schema."""


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Wan2.1 DiT architecture (defaults: Wan2.1-T2V-1.3B) and numerics."""

    model_type: str = "t2v"
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    in_dim: int = 16
    dim: int = 1536
    ffn_dim: int = 8960
    freq_dim: int = 256
    text_dim: int = 4096
    out_dim: int = 16
    num_heads: int = 12
    num_layers: int = 30
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_theta: float = 10000.0
    # numerics
    dtype: str = "float32"  # compute dtype: float32 (parity) | bfloat16 (speed)
    param_dtype: str = "float32"
    attention_impl: str = "auto"  # auto (cuDNN on GPU for bf16, else XLA) | xla | cudnn
    remat: str = "none"  # none | full | dots  (jax.checkpoint policy per block)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def validate(self) -> None:
        if self.model_type != "t2v":
            raise ConfigError(f"model.model_type={self.model_type!r}: only 't2v' is implemented")
        if self.dim % self.num_heads:
            raise ConfigError(f"model.dim={self.dim} is not divisible by model.num_heads={self.num_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")
        _check_choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _check_choice("model.param_dtype", self.param_dtype, ("float32", "bfloat16"))
        _check_choice("model.attention_impl", self.attention_impl, ("auto", "xla", "cudnn"))
        _check_choice("model.remat", self.remat, ("none", "full", "dots"))


@dataclasses.dataclass(frozen=True)
class MemoryConfig:
    """KV cache / memory layout (sizes in latent frames) and the MemFlow memory knobs.

    ``local_attn_size`` counts frames the way the reference does: sink frames included.
    """

    mode: str = "nam"  # none (local window only) | sink (LongLive frame sink) | nam (sink + NAM bank)
    local_attn_size: int = 12
    sink_size: int = 3
    bank_size: int = 3
    record_interval: int = 3
    global_sink: bool = True
    sma: bool = False
    sma_top_k: int = 3
    # reference quirks (release behaviour is the default; see docs/reference_map.md)
    nam_aggregate: str = "logits_mean"  # logits_mean (code) | softmax_mass (paper)
    nam_switch_query: str = "zeroed"  # zeroed (code: zeroed cross-attn cache) | new_prompt (paper)
    bank_record_rule: str = "interactive"  # interactive | single (CausalInferencePipeline prototype rule)

    def validate(self) -> None:
        _check_choice("memory.mode", self.mode, ("none", "sink", "nam"))
        _check_choice("memory.nam_aggregate", self.nam_aggregate, ("logits_mean", "softmax_mass"))
        _check_choice("memory.nam_switch_query", self.nam_switch_query, ("zeroed", "new_prompt"))
        _check_choice("memory.bank_record_rule", self.bank_record_rule, ("interactive", "single"))
        if self.local_attn_size <= 0:
            raise ConfigError("memory.local_attn_size must be > 0 (frames, sink included)")
        if self.mode != "none" and self.sink_size >= self.local_attn_size:
            raise ConfigError(
                f"memory.sink_size={self.sink_size} must be < memory.local_attn_size={self.local_attn_size}")
        if self.mode == "nam" and self.bank_size < 1:
            raise ConfigError("memory.bank_size must be >= 1 when memory.mode='nam'")
        if self.record_interval < 1:
            raise ConfigError("memory.record_interval must be >= 1")
        if self.sma and self.sma_top_k < 1:
            raise ConfigError("memory.sma_top_k must be >= 1")


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """Streaming sampler: chunking, denoising schedule, resolution."""

    chunk_frames: int = 3  # latent frames per chunk (num_frame_per_block)
    denoising_step_list: tuple[int, ...] = (1000, 750, 500, 250)
    warp_denoising_step: bool = True
    timestep_shift: float = 5.0
    num_train_timesteps: int = 1000
    context_noise: float = 0.0
    height: int = 480  # pixels
    width: int = 832
    vae_stride: tuple[int, int, int] = (4, 8, 8)
    num_output_frames: int = 21  # latent frames
    batch_size: int = 1
    seed: int = 0
    fps: int = 16
    attention_kv_splits: int = 0  # split-KV self-attention on GPU: 0 = auto (wave model), 1 = off, n = n parts

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.height // self.vae_stride[1], self.width // self.vae_stride[2]

    def validate(self) -> None:
        if self.height % self.vae_stride[1] or self.width % self.vae_stride[2]:
            raise ConfigError(
                f"sampler.height/width ({self.height}x{self.width}) must be multiples of the VAE stride "
                f"{self.vae_stride[1:]}")
        if self.chunk_frames < 1:
            raise ConfigError("sampler.chunk_frames must be >= 1")
        if self.num_output_frames % self.chunk_frames:
            raise ConfigError(
                f"sampler.num_output_frames={self.num_output_frames} is not a multiple of "
                f"sampler.chunk_frames={self.chunk_frames}; use a multiple")
        if not self.denoising_step_list:
            raise ConfigError("sampler.denoising_step_list must not be empty")
        if self.attention_kv_splits < 0:
            raise ConfigError(f"sampler.attention_kv_splits={self.attention_kv_splits} must be >= 0 "
                              "(0 = auto, 1 = off, n = n key parts)")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """UMT5 encoder (defaults: umt5-xxl encoder as shipped with Wan2.1)."""

    vocab_size: int = 256384
    dim: int = 4096
    dim_attn: int = 4096
    dim_ffn: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_dist: int = 128
    text_len: int = 512
    eps: float = 1e-6
    dtype: str = "float32"

    def validate(self) -> None:
        if self.dim_attn % self.num_heads:
            raise ConfigError("text.dim_attn must be divisible by text.num_heads")
        _check_choice("text.dtype", self.dtype, ("float32", "bfloat16"))


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Wan2.1 causal 3-D VAE (defaults: Wan2.1_VAE.pth), or a fixed pixel codec with the same strides
    (``nn.pixel_codec``): ``pixel`` (lossless, no params, ``z_dim = time stride * 3 * space stride^2``) or ``pca``
    (the ``z_dim`` leading principal components of that). ``pca_decoder`` (``pca`` only): decode with a trained
    Wan-architecture decoder (``dim``, ``dim_mult``, ... as for ``wan``) instead of the basis; the PCA still encodes."""

    codec: str = "wan"
    pca_decoder: bool = False
    dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    # per-channel latent statistics of the released VAE (WanVAEWrapper constants); one value = every channel
    latent_mean: tuple[float, ...] = (
        -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
        0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
    latent_std: tuple[float, ...] = (
        2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
    dtype: str = "float32"

    def validate(self) -> None:
        _check_choice("vae.codec", self.codec, ("wan", "pixel", "pca"))
        if self.codec in ("pixel", "pca"):
            ts, ss = 2 ** sum(bool(t) for t in self.temporal_downsample), 2 ** (len(self.dim_mult) - 1)
            cell = ts * 3 * ss * ss
            if self.codec == "pixel" and self.z_dim != cell:
                raise ConfigError(f"vae.codec=pixel stores {ts} frames x 3 x {ss}x{ss} pixels per latent cell: "
                                  f"set vae.z_dim={cell} (and model.in_dim / out_dim), not {self.z_dim}")
            if self.codec == "pca" and not 1 <= self.z_dim <= cell:
                raise ConfigError(f"vae.codec=pca keeps 1..{cell} principal components of the {cell} values a "
                                  f"latent cell holds; vae.z_dim={self.z_dim} is out of range")
        if self.pca_decoder and self.codec != "pca":
            raise ConfigError(f"vae.pca_decoder=true decodes PCA latents with a trained decoder, but vae.codec="
                              f"{self.codec}: set vae.codec=pca or drop vae.pca_decoder")
        if len(self.latent_mean) not in (1, self.z_dim) or len(self.latent_std) not in (1, self.z_dim):
            raise ConfigError(f"vae.latent_mean/latent_std need z_dim={self.z_dim} values each (or one value for "
                              f"every channel), got {len(self.latent_mean)} / {len(self.latent_std)}")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ConfigError("vae.temporal_downsample needs len(dim_mult) - 1 entries")
        _check_choice("vae.dtype", self.dtype, ("float32", "bfloat16"))


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "memory": MemoryConfig,
    "sampler": SamplerConfig,
    "text": TextConfig,
    "vae": VAEConfig,
}
# what a converted (sampling) checkpoint's config.json holds; training registers train / run / teacher_model
CHECKPOINT_SECTIONS: tuple[str, ...] = tuple(SECTIONS)


def register_section(name: str, cls: type) -> None:
    """Add a config section (e.g. ``train``) defined by another module."""
    SECTIONS[name] = cls


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole configuration: one frozen dataclass per section (missing sections take defaults)."""

    sections: tuple[tuple[str, Any], ...]

    def __getattr__(self, name: str) -> Any:
        for key, value in object.__getattribute__(self, "sections"):
            if key == name:
                return value
        raise AttributeError(f"config has no section {name!r}")

    def replace(self, **kw: Any) -> "Config":
        d = dict(self.sections)
        for k, v in kw.items():
            if k not in d:
                raise ConfigError(f"unknown config section {k!r}")
            d[k] = v
        return Config(tuple(d.items()))

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return {k: _to_plain(dataclasses.asdict(v)) for k, v in self.sections}

    def checkpoint_dict(self) -> dict[str, dict[str, Any]]:
        """The sections a converted checkpoint's ``config.json`` holds (:data:`CHECKPOINT_SECTIONS`): never the
        ``train`` / ``run`` / ``teacher_model`` sections that importing the training package registers, which a
        sampling process could not read back."""
        return {k: v for k, v in self.to_dict().items() if k in CHECKPOINT_SECTIONS}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {list(choices)}")


def _to_plain(x: Any) -> Any:
    if isinstance(x, (tuple, list)):
        return [_to_plain(v) for v in x]
    if isinstance(x, dict):
        return {k: _to_plain(v) for k, v in x.items()}
    return x


def _coerce(section: str, field: dataclasses.Field, value: Any) -> Any:
    """Coerce a YAML / command-line value to the dataclass field's declared type."""
    name = f"{section}.{field.name}"
    default = field.default
    if isinstance(value, str) and not isinstance(default, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"{name}: cannot parse {value!r}: {e}") from None
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} expects true/false, got {value!r}")
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} expects an integer, got {value!r}")
        return value
    if isinstance(default, float):
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} expects a number, got {value!r}")
        return float(value)
    if isinstance(default, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} expects a list, got {value!r}")
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    if isinstance(default, str):
        if not isinstance(value, str):
            value = str(value)
        return value
    return value


def _build_section(section: str, values: Mapping[str, Any]) -> Any:
    cls = SECTIONS[section]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(
                f"unknown config key '{section}.{key}'; valid keys of '{section}': {sorted(fields)}")
        kwargs[key] = _coerce(section, fields[key], value)
    obj = cls(**kwargs)
    if hasattr(obj, "validate"):
        obj.validate()
    return obj


def from_dict(data: Mapping[str, Any] | None) -> Config:
    """Build a Config from a mapping of sections; every section not given takes its defaults."""
    data = dict(data or {})
    if "train" in data and "train" not in SECTIONS:
        import memflow_jax.training.config  # noqa: F401  (registers the `train` section)
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}; valid sections: {sorted(SECTIONS)}")
    sections = []
    for name in SECTIONS:
        values = data.get(name) or {}
        if not isinstance(values, Mapping):
            raise ConfigError(f"config section '{name}' must be a mapping, got {type(values).__name__}")
        sections.append((name, _build_section(name, values)))
    return Config(tuple(sections))


def parse_overrides(overrides: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``["model.dim=64", "memory.sma=true"]`` -> ``{"model": {"dim": "64"}, "memory": {"sma": "true"}}``."""
    out: dict[str, dict[str, Any]] = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        path, value = item.split("=", 1)
        if "." not in path:
            raise ConfigError(f"override {item!r}: key must be 'section.key' (sections: {sorted(SECTIONS)})")
        section, key = path.split(".", 1)
        out.setdefault(section, {})[key] = value
    return out


def merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: dict(v or {}) for k, v in base.items()}
    for section, values in extra.items():
        out.setdefault(section, {}).update(values)
    return out


def read_yaml(path: str | os.PathLike, _chain: tuple[str, ...] = ()) -> dict[str, Any]:
    """The sections of a YAML config; ``base: other.yaml`` (relative to the file) is read first and this file's
    keys are merged over it, section by section."""
    path = os.path.abspath(os.fspath(path))
    if path in _chain:
        raise ConfigError(f"{path}: `base:` chain loops back to itself ({' -> '.join(_chain + (path,))})")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except FileNotFoundError:
        where = f" (the `base:` of {_chain[-1]})" if _chain else ""
        raise ConfigError(f"config file {path} does not exist{where}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    data = dict(data)
    data.pop("name", None)
    data.pop("description", None)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: `base:` must be a path to another YAML config, got {base!r}")
    parent = read_yaml(os.path.join(os.path.dirname(path), base), _chain + (path,))
    return merge(parent, data)


def load(path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> Config:
    """Load ``path`` (YAML, optionally on a ``base:`` YAML; None for all defaults) and apply ``key=value``
    overrides."""
    data = read_yaml(path) if path is not None else {}
    return from_dict(merge(data, parse_overrides(overrides)))


def model_config_from_wan_json(config_json: Mapping[str, Any], **numerics: Any) -> ModelConfig:
    """ModelConfig from a diffusers ``config.json`` of a Wan2.1 folder.

    Reference quirk: ``text_dim``, ``patch_size``, ``qk_norm``, ``cross_attn_norm`` and ``window_size`` are in
    ``WanModel.ignore_for_config``, so the release's loader never reads them from the file: they always take
    the constructor defaults (text_dim 4096, patch (1,2,2), qk_norm/cross_attn_norm True). We do the same.
    """
    known = {"model_type", "text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "out_dim", "num_heads",
             "num_layers", "eps"}
    kwargs = {k: config_json[k] for k in known if k in config_json}
    if "model_type" in kwargs and kwargs["model_type"] != "t2v":
        raise ConfigError(f"Wan folder model_type={kwargs['model_type']!r}: only t2v is supported")
    cfg = ModelConfig(**kwargs, **numerics)
    cfg.validate()
    return cfg
