"""Train states, jitted steps and the training loop of the nine recipes.

Recipes (``train.recipe``):

* ``teacher``  — flow matching of a bidirectional DiT on data latents (:func:`losses.flow_matching_loss`).
* ``teacher_story`` — the same on whole storyworld ``stories`` (not in the reference): each latent frame conditioned
  on its own segment's prompt (:func:`rollout.frame_contexts`, the DiT's per-frame cross-attention), the videos
  encoded by the frozen ``run.vae_ckpt`` inside the step. A teacher that sees a story whole (an object before it
  leaves and after it comes back) is what a distillation that rewards memory needs as its real score.
* ``ode_init`` — causal ODE regression of the generator on teacher trajectories (:func:`losses.ode_regression_loss`),
  block-causal attention over the whole clip.
* ``dmd``      — Self-Forcing DMD (reference ``train_init.yaml``): per step a generator update (every
  ``dfake_gen_update_ratio`` steps) and a critic update, each on its own backward-simulated rollout.
* ``dmd_long`` — streaming long tuning with prompt switches (reference ``train_long.yaml``): the rollout goes on
  window by window across steps, the generator and the critic each consume the next window.
* ``dmd_story`` — DMD on whole storyworld stories (not in the reference): the generator rolls out each story of a
  ``stories`` dataset (its prompts and switch frames; no video is read) chunk by chunk from a fresh memory, with the
  sampler's memory semantics and each sample's own prompt switches (:func:`rollout.story_rollout`); the real score
  (a ``teacher_story`` teacher) and the critic see the whole story, a prompt per frame. Unlike ``dmd_long``, whose
  teacher sees one window, the real score sees an object before it leaves and after it comes back, so the
  distribution it pulls the rollout towards is one where a returning object keeps its look.
  ``train.story_return_weight`` weighs the DMD loss's frames of the chunks where an object returns from
  ``train.story_return_min_absent`` or more latent frames off screen (``1 + weight``; metric
  ``return_frame_fraction``).
* ``story``    — teacher forcing on ground-truth stories (not in the reference; Self-Forcing's "teacher forcing"
  baseline, with MemFlow's memory): a storyworld ``stories`` dataset (segment boundaries on chunk boundaries) is
  encoded by the frozen ``run.vae_ckpt`` inside the step; chunk by chunk the generator denoises the ground-truth
  chunk (noised to a drawn denoising step) against a memory built from the ground-truth story with the sampler's
  semantics (prompt switches re-cache), loss ``mean((x0 - x0_gt)²)`` (:func:`rollout.teacher_forced_story`). The
  regression target shows a returning object as it was, so the loss rewards reading the memory, which the
  DMD recipes (whose teacher sees one window) cannot. Alone it makes a distilled few-step generator's objects fade
  (exposure bias; ``storyworld/TRAINING.md`` round 11). ``train.story_weight > 0`` adds it, weighted, to the
  generator loss of ``dmd`` / ``dmd_long`` instead (stories of ``train.story_data_path``, drawn by index from the
  step; metrics ``generator_dmd_loss`` and ``story_loss``).
* ``ode_story`` — the ``story`` recipe on a story teacher's ODE trajectories (``training.ode_pairs --stories``, data
  ``train.latent_data_path``; not in the reference): the noisy input of a chunk is the trajectory's state at the
  drawn step, the target and the memory its end, so the target is a deterministic function of the input (no
  posterior-mean blur) and the generator learns the teacher's rendering of whole stories through its memory;
  ``ode_init``'s role for a ``dmd_story`` that follows.
* ``vae``      — the Wan VAE (encoder + decoder, :mod:`memflow_jax.nn.vae`) on windows of storyworld videos:
  reparameterised posterior sample -> decoder, loss ``L1 + MSE + train.vae_kl_weight * KL``
  (:func:`losses.vae_loss`). The VAE tree takes the generator's place (state, optimizer, EMA, shardings);
  no text encoder, teacher or critic.

The ``teacher`` recipes drop the prompt (-> ``train.negative_prompt``'s embedding; a story: every segment's) per
sample with probability ``train.text_dropout``, so the teacher learns the unconditional flow for classifier-free
guidance.

Every step is ONE ``jax.jit`` with explicit ``in_shardings`` / ``out_shardings`` on a ``(data, fsdp)`` mesh: params
(generator, critic, frozen teacher, LoRA, EMA, optimizer moments) sharded by :mod:`training.sharding`'s rules
table, batches and the streaming memory over the batch axes, train states donated. Master params are float32,
compute runs in ``model.dtype`` (``train.mixed_precision`` -> bfloat16). Randomness: one device key per step
(``fold_in(key(seed), step)``) and a host generator seeded with ``(seed, step)`` for the streaming bookkeeping, so
every process draws the same values and a resumed run replays an uninterrupted one exactly.

Extra config sections registered here: ``run`` (:class:`RunConfig`: checkpoints of the frozen models, synthetic
data, the reference-quirk switches, logging) and ``teacher_model`` (the real score's architecture, a
``ModelConfig``; reference ``real_name`` Wan2.1-T2V-14B).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import zlib
from typing import Any, Callable, Mapping, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from memflow_jax import config as cfg_lib
from memflow_jax.config import Config, ConfigError, ModelConfig
from memflow_jax.diffusion import scheduler as sch
from memflow_jax.nn import attention as attn_lib
from memflow_jax.nn import dit
from memflow_jax.training import config as train_config  # noqa: F401  (registers the ``train`` section)
from memflow_jax.training import lora as lora_lib
from memflow_jax.training import losses
from memflow_jax.training import optim
from memflow_jax.training import rollout as ro
from memflow_jax.training import sharding as sh

Params = Any
sg = jax.lax.stop_gradient


# --------------------------------------------------------------------------------------------------
# Config sections owned by the trainer
# --------------------------------------------------------------------------------------------------


CRITIC_ARCHS = ("generator", "teacher")  # run.critic_arch: whose architecture the fake score has
SCRATCH = "scratch"  # a checkpoint path meaning "start from the Wan initialisation"
STORY_SALT = 0x5701  # the story term's own streams: its host draw of stories and its in-step key


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Trainer knobs that the ``train`` section does not cover."""

    teacher_ckpt: str = ""  # real score weights (Wan folder | converted dir | .pt | "scratch"); "" only with
    # synthetic_data
    critic_ckpt: str = ""  # fake score init; "" -> a copy of the initial weights of critic_arch's model
    # the fake score's architecture: "generator" (reference: fake_name is the generator's model) | "teacher"
    # (teacher_model's, e.g. a story teacher wider than the generator; with critic_ckpt "" a copy of the teacher,
    # DMD2's initialisation: the fake score starts as a good score model and only learns the generator's shift)
    critic_arch: str = "generator"
    # VAE weights (first-frame re-encoding of streaming windows; the vae recipe's init, "" = random):
    # Wan2.1_VAE.pth | converted checkpoint dir (component "vae") | a vae-recipe run dir (newest checkpoint, EMA
    # params if saved) — see load_vae_host
    vae_ckpt: str = ""
    reencode_first_frame: bool = True  # reference _process_first_frame_encoding (needs a VAE)
    score_timestep_shift: float = 8.0  # table of the score nets (reference WanDiffusionWrapper default)
    teacher_training_weight: bool = True  # teacher recipe: weight the flow loss by the table's training weights
    # reference quirks (training pipelines) — see memflow_jax.training.rollout
    ctx_noise_always: bool = True
    ctx_qbank_quirk: bool = True
    reset_cache_at_switch: bool = True
    critic_reconvert_quirk: bool = True
    # synthetic data (no downloads): prompts "synthetic prompt i", seeded random text-embedding stand-in,
    # random latents / trajectories, random-init frozen models
    synthetic_data: bool = False
    synthetic_size: int = 64
    # logging
    tensorboard: bool = True
    progress: bool = True

    def validate(self) -> None:
        if self.score_timestep_shift <= 0:
            raise ConfigError("run.score_timestep_shift must be > 0")
        if self.synthetic_size < 1:
            raise ConfigError("run.synthetic_size must be >= 1")
        if self.critic_arch not in CRITIC_ARCHS:
            raise ConfigError(f"run.critic_arch={self.critic_arch!r}: choose one of {', '.join(CRITIC_ARCHS)}")


cfg_lib.register_section("run", RunConfig)
cfg_lib.register_section("teacher_model", ModelConfig)


def with_numerics(m: ModelConfig, train: Any) -> ModelConfig:
    """Apply ``train.mixed_precision`` (bfloat16 compute, float32 masters) and ``gradient_checkpointing``."""
    kw: dict[str, Any] = {"param_dtype": "float32"}
    if train.mixed_precision:
        kw["dtype"] = "bfloat16"
    if train.gradient_checkpointing and m.remat == "none":
        kw["remat"] = "full"
    return dataclasses.replace(m, **kw)


# --------------------------------------------------------------------------------------------------
# States
# --------------------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
    """Trainable params (full model or LoRA tree) and their optimizer state."""

    params: Params
    opt_state: Any


def stream_shardings(carry: Any, mesh: jax.sharding.Mesh) -> Any:
    """Shardings of a :class:`rollout.StreamCarry`: batch axis over the data-parallel mesh axes."""
    bspec = sh.batch_sharding(mesh).spec[0]
    cache_batch = NamedSharding(mesh, P(None, bspec))
    lead_batch = NamedSharding(mesh, P(bspec))
    rep = NamedSharding(mesh, P())

    def one(path, x):
        name = sh.path_str(path)
        if np.ndim(x) == 0:
            return rep
        if name.startswith("state/cache/") and name.split("/")[-1] in ("k", "v", "bank_frame",
                                                                        "proto_k", "proto_v"):
            return cache_batch
        if name in ("state/history", "prev", "cond", "cond2"):
            return lead_batch
        return rep

    return jax.tree_util.tree_map_with_path(one, carry)


# --------------------------------------------------------------------------------------------------
# Synthetic data (no downloads) and data sources
# --------------------------------------------------------------------------------------------------


class SyntheticEmbedder:
    """Seeded stand-in for UMT5: prompt -> ``[text_len, dim]`` (rows past a prompt-dependent length are zero,
    like the encoder's padding). Identical across processes and runs."""

    def __init__(self, text_len: int, dim: int, seed: int = 0):
        self.text_len, self.dim, self.seed = text_len, dim, seed

    def __getitem__(self, prompt: str) -> np.ndarray:
        h = zlib.crc32(prompt.encode("utf-8"))
        rng = np.random.default_rng([self.seed, h])
        n = 1 + h % self.text_len
        out = np.zeros((self.text_len, self.dim), np.float32)
        out[:n] = rng.standard_normal((n, self.dim)).astype(np.float32)
        return out

    def __contains__(self, prompt: str) -> bool:
        return True


class EmbeddingSource:
    """Adds ``prompt_embeds`` / ``switch_prompt_embeds`` ([text_len, dim] float32) to a prompt source's records
    from ``embedder[prompt]`` (a :class:`data.TextEmbeddingCache` or :class:`SyntheticEmbedder`)."""

    FIELDS = {"prompts": "prompt_embeds", "switch_prompts": "switch_prompt_embeds"}

    def __init__(self, source: Any, embedder: Any):
        self.source, self.embedder = source, embedder

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = dict(self.source[i])
        for field, out in self.FIELDS.items():
            if field in rec:
                rec[out] = np.asarray(self.embedder[str(rec[field])], np.float32)
        return rec


class SyntheticPromptSource:
    """``{"prompts", "switch_prompts", "idx"}`` records of generated prompt strings."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"prompts": f"synthetic prompt {i}", "switch_prompts": f"synthetic switch prompt {i}",
                "idx": np.int64(i)}


def synthetic_latent(i: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """A smooth random latent clip ``[F, C, h, w]`` (low-frequency in time and space, so it is learnable)."""
    f, c, h, w = shape
    rng = np.random.default_rng([seed, 1729, i])
    coef = rng.standard_normal((c, 3)).astype(np.float32)
    tt = np.linspace(-1, 1, f, dtype=np.float32)[:, None, None, None]
    yy = np.linspace(-1, 1, h, dtype=np.float32)[None, None, :, None]
    xx = np.linspace(-1, 1, w, dtype=np.float32)[None, None, None, :]
    base = coef[None, :, 0, None, None] * np.cos(np.pi * (yy + 0.5 * tt)) + coef[None, :, 1, None, None] * \
        np.sin(np.pi * (xx - 0.5 * tt)) + coef[None, :, 2, None, None]
    return base.astype(np.float32)


class SyntheticLatentSource:
    """Teacher data: ``{"latents": [F, C, h, w], "prompts", "idx"}``."""

    def __init__(self, n: int, shape: tuple[int, ...], seed: int = 0):
        self.n, self.shape, self.seed = n, tuple(shape), seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"latents": synthetic_latent(i, self.shape, self.seed), "prompts": f"synthetic video {i}",
                "idx": np.int64(i)}


class SyntheticOdeSource:
    """ODE-init data: ``{"ode_latent": [S+1, F, C, h, w], ...}`` — a clean synthetic clip and its straight-line
    flow trajectory ``(1-σ) x0 + σ ε`` at the generator's denoising timesteps."""

    def __init__(self, n: int, shape: tuple[int, ...], sigmas: np.ndarray, seed: int = 0):
        self.n, self.shape, self.sigmas, self.seed = n, tuple(shape), np.asarray(sigmas, np.float32), seed

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        x0 = synthetic_latent(i, self.shape, self.seed)
        eps = np.random.default_rng([self.seed, 31, i]).standard_normal(x0.shape).astype(np.float32)
        states = [(1 - s) * x0 + s * eps for s in self.sigmas] + [x0]
        return {"ode_latent": np.stack(states).astype(np.float32), "prompts": f"synthetic video {i}",
                "idx": np.int64(i)}


class VideoClipSource:
    """Windows of ``clip_frames`` consecutive frames of a storyworld dataset's videos (the vae recipe's data).

    Record ``i`` is one (video, first frame) pair: every window of every video at least ``clip_frames`` long
    is one record, so a shuffled epoch visits each window once, and a (seeded, checkpointed) loader replays
    the same windows on resume. Records: ``{"video": uint8 [clip_frames, H, W, 3], "idx": int64}``.
    """

    def __init__(self, path: str, clip_frames: int):
        from memflow_jax.storyworld.dataset import StoryworldSource

        self.source = StoryworldSource(path)
        self.clip_frames = int(clip_frames)
        self.height, self.width = int(self.source.meta["height"]), int(self.source.meta["width"])
        lengths = self.source.num_frames()
        windows = np.maximum(lengths - self.clip_frames + 1, 0)  # [N] windows per video
        if not windows.any():
            raise ValueError(f"{path}: every video is shorter than {self.clip_frames} frames (longest "
                             f"{int(lengths.max())}); lower train.vae_clip_frames or export longer videos")
        self.num_skipped = int((windows == 0).sum())
        self._video = np.repeat(np.arange(len(lengths)), windows)  # [W] video of each window
        self._start = np.concatenate([np.arange(n) for n in windows if n])  # [W] its first frame

    def __len__(self) -> int:
        return len(self._video)

    def __getitem__(self, i: int) -> dict[str, Any]:
        v, s = int(self._video[i]), int(self._start[i])
        video = self.source[v]["video"]  # [T, H, W, 3] uint8
        return {"video": np.ascontiguousarray(video[s:s + self.clip_frames]), "idx": np.int64(i)}


class StorySource:
    """A storyworld ``stories`` dataset as teacher-forcing records (the story recipe's data).

    ``src[i]``: ``{"video": uint8 [T, H, W, 3], "contexts": float32 [P, text_len, text_dim] (rows past the
    story's segments repeat its last prompt, never selected), "switch_frames": int32 [P - 1] (latent frames,
    ``rollout.NO_SWITCH`` padding), "idx"}`` with ``P`` the most segments of any story in the dataset.
    ``videos=False``: the prompts alone, read from the index (no video decoded; the dmd_story recipe's data).
    ``return_min_absent`` (not None): records add ``"return_mask"`` float32 [F] (:func:`return_mask`).
    """

    def __init__(self, path: str, embedder: Any, videos: bool = True, return_min_absent: int | None = None):
        from memflow_jax.storyworld.dataset import StoryworldSource

        self.source = StoryworldSource(path)
        meta = self.source.meta
        if meta.get("kind") != "stories":
            raise ValueError(f"{path}: a {meta.get('kind')!r} dataset; the story recipe needs segment boundaries on "
                             "the model's chunks: export one with `python -m memflow_jax.storyworld.export --kind "
                             "stories --num-latent F --chunk C --t-stride S`")
        kw = meta["sampler_kwargs"]
        self.num_latent, self.chunk, self.t_stride = int(kw["num_latent"]), int(kw["chunk"]), int(kw["t_stride"])
        self.height, self.width = int(meta["height"]), int(meta["width"])
        self.records = self.source.index_records()
        self.num_prompts = max(len(r["prompts"]) for r in self.records)
        self.embedder = embedder
        self.videos = videos
        missing = [p for r in self.records for p in r["prompts"] if p not in embedder]
        if missing:
            raise ValueError(f"{len(missing)} prompts of {path} are not in the text cache (e.g. {missing[0]!r}): "
                             f"build it over {os.path.join(path, 'segment_prompts.txt')}")
        self.return_min_absent = return_min_absent
        if return_min_absent is not None:
            _require_returns(self.records, path, "re-export the stories")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ex = self.source[int(i)] if self.videos else self.records[int(i)]
        item = story_prompt_fields(ex["prompts"], ex["latent_switch_frames"], self.num_prompts, self.embedder)
        item["idx"] = np.int64(i)
        if self.return_min_absent is not None:
            item["return_mask"] = return_mask(self.records[int(i)]["latent_returns"], self.num_latent, self.chunk,
                                              self.return_min_absent)
        return {"video": ex["video"], **item} if self.videos else item


def return_chunks(latent_returns: Sequence[Sequence[int]], num_latent: int, chunk: int, min_absent: int
                  ) -> list[tuple[int, int, int]]:
    """``(object, first, end)`` latent frames of the first chunk of every return segment whose object was off
    screen for at least ``min_absent`` latent frames (``latent_returns``: ``[object, return latent frame, frames
    absent]`` rows, :func:`storyworld.scripts.latent_returns`): where only a memory can show the object as it was."""
    return [(int(o), int(start), min(int(start) + chunk, num_latent)) for o, start, absent in latent_returns
            if absent >= min_absent and 0 <= start < num_latent]


def return_mask(latent_returns: Sequence[Sequence[int]], num_latent: int, chunk: int, min_absent: int
                ) -> np.ndarray:
    """float32 [num_latent]: 1 on the frames of :func:`return_chunks`, else 0."""
    mask = np.zeros((num_latent,), np.float32)
    for _, first, end in return_chunks(latent_returns, num_latent, chunk, min_absent):
        mask[first:end] = 1.0
    return mask


def _require_returns(records: Sequence[Mapping[str, Any]], path: str, fix: str) -> None:
    if any("latent_returns" not in r for r in records):
        raise ValueError(f"{path}: records without latent_returns (made before the return-weighted story loss); "
                         f"{fix} with this code, or set train.story_return_weight=0")


def story_prompt_fields(prompts: Sequence[str], switch_frames: Sequence[int], num_prompts: int, embedder: Any
                        ) -> dict[str, np.ndarray]:
    """A story's ``contexts`` [P, text_len, text_dim] float32 (rows past its segments repeat its last prompt,
    never selected) and ``switch_frames`` [P - 1] int32 (``rollout.NO_SWITCH`` padding), ``P = num_prompts``."""
    prompts = list(prompts) + [prompts[-1]] * (num_prompts - len(prompts))
    sw = [int(x) for x in switch_frames] + [ro.NO_SWITCH] * (num_prompts - 1 - len(switch_frames))
    return {"contexts": np.stack([np.asarray(embedder[p], np.float32) for p in prompts]),
            "switch_frames": np.asarray(sw, np.int32)}


class StoryOdeSource:
    """Story ODE pairs (``python -m memflow_jax.training.ode_pairs --stories``) as the ode_story recipe's records.

    ``src[i]``: ``{"ode_latent": float32 [S + 1, F, C, h, w] (the teacher's states at the generator's denoising
    steps, then its clean story), "contexts": float32 [P, text_len, text_dim], "switch_frames": int32 [P - 1],
    "idx"}``, padded as :class:`StorySource`'s; with ``return_min_absent`` also ``"return_mask"`` (the pairs'
    ``latent_returns``, :func:`return_mask` on chunks of ``chunk``).
    """

    def __init__(self, path: str, embedder: Any, chunk: int = 0, return_min_absent: int | None = None):
        meta_path = os.path.join(path, "ode_pairs.json")
        if not os.path.isfile(meta_path):
            raise ValueError(f"{path}: no ode_pairs.json; make story ODE pairs with `python -m "
                             "memflow_jax.training.ode_pairs --config CFG --stories STORIES --out DIR`")
        with open(meta_path) as f:
            self.meta = json.load(f)
        if self.meta.get("kind") != "stories":
            raise ValueError(f"{path}: ODE pairs of {self.meta.get('kind', 'clips')!r}, not stories; the ode_story "
                             "recipe needs `ode_pairs --stories` (clips: train.recipe=ode_init)")
        self.files = [os.path.join(path, f"ode_{i:06d}.npz") for i in range(int(self.meta["count"]))]
        missing = [f for f in self.files if not os.path.isfile(f)]
        if missing:
            raise ValueError(f"{path}: {len(missing)} of the {len(self.files)} trajectories in ode_pairs.json are "
                             f"missing (e.g. {os.path.basename(missing[0])}): regenerate the ODE pairs")
        with np.load(self.files[0], allow_pickle=False) as z:
            self.shape = tuple(z["ode_latent"].shape)  # [S + 1, F, C, h, w]; every file is checked when read
        self.records = []
        for fn in self.files:
            with np.load(fn, allow_pickle=False) as z:
                rec = {"prompts": [str(p) for p in z["prompts"]],
                       "latent_switch_frames": [int(x) for x in z["latent_switch_frames"]]}
                if "latent_returns" in z.files:
                    rec["latent_returns"] = np.asarray(z["latent_returns"], np.int64).reshape(-1, 3).tolist()
                self.records.append(rec)
        self.num_latent = int(self.shape[1])
        self.num_prompts = max(len(r["prompts"]) for r in self.records)
        self.embedder = embedder
        absent = [p for r in self.records for p in r["prompts"] if p not in embedder]
        if absent:
            raise ValueError(f"{len(absent)} prompts of {path} are not in the text cache (e.g. {absent[0]!r}): "
                             "build it over the stories' segment_prompts.txt")
        self.chunk, self.return_min_absent = int(chunk), return_min_absent
        if return_min_absent is not None:
            if self.chunk < 1:
                raise ValueError("StoryOdeSource(return_min_absent=...) needs the generator's chunk (>= 1)")
            _require_returns(self.records, path, "regenerate the ODE pairs from stories exported")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.records[int(i)]
        with np.load(self.files[int(i)], allow_pickle=False) as z:
            ode = np.asarray(z["ode_latent"], np.float32)
        if tuple(ode.shape) != self.shape:
            raise ValueError(f"{self.files[int(i)]}: ode_latent {tuple(ode.shape)}, the others {self.shape}")
        item = story_prompt_fields(r["prompts"], r["latent_switch_frames"], self.num_prompts, self.embedder)
        if self.return_min_absent is not None:
            item["return_mask"] = return_mask(r["latent_returns"], self.num_latent, self.chunk, self.return_min_absent)
        return {"ode_latent": ode, **item, "idx": np.int64(i)}


# --------------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------------


def load_dit_host(path: str, mcfg: ModelConfig, what: str) -> Params:
    """Host (numpy) DiT params from a Wan2.1 folder, a converted checkpoint folder, a ``.pt`` / ``.pth``
    (Self-Forcing / MemFlow ``base.pt``) or a ``.safetensors`` file; checked against ``mcfg``."""
    from memflow_jax.convert import common as conv
    from memflow_jax.convert import dit as conv_dit

    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: {path} does not exist (set the path in the config, or run.synthetic_data"
                                "=true for random-init frozen models)")
    abstract = dit.abstract_params(mcfg)
    if os.path.isdir(path):
        meta_path = os.path.join(path, conv.CONFIG_FILE)
        if os.path.isfile(meta_path):
            with open(meta_path) as f:
                meta = json.load(f)
            if "components" in meta:  # converted (Orbax) checkpoint
                names = meta["components"]
                name = next((n for n in ("generator", "dit", "model", "transformer") if n in names), names[0])
                return jax.tree_util.tree_map(np.asarray, conv.load_component(path, name, abstract))
        return conv_dit.load_wan_folder(path, mcfg)[1]
    if path.endswith((".pt", ".pth")):
        return conv_dit.load_generator_pt(path, mcfg)
    if path.endswith(".safetensors"):
        return conv_dit.convert_tensors(conv.iter_safetensors(path), mcfg, path)
    raise ValueError(f"{what}: {path}: unsupported checkpoint (Wan folder, converted folder, .pt/.pth, .safetensors)")


def synthetic_init(mcfg: ModelConfig, key: jax.Array) -> Params:
    """Random init for synthetic runs: Wan init, but a small random head (Wan zero-inits it, which would make
    every random score net predict exactly zero flow)."""
    k_init, k_head = jax.random.split(key)
    p = dit.init_params(mcfg, k_init)
    kernel = p["head"]["head"]["kernel"]
    head = dict(p["head"], head=dict(p["head"]["head"], kernel=0.02 * jax.random.normal(k_head, kernel.shape,
                                                                                      kernel.dtype)))
    return dict(p, head=head)


def vae_run_item(path: str) -> str:
    """The item folder of the params to read from a vae-recipe run folder (or its
    ``checkpoints/``): the newest complete step, its ``ema`` item when saved, else ``vae``."""
    from etils import epath

    from memflow_jax.training.checkpoint import _step_complete

    ckpt_dir = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    steps = sorted((int(n) for n in os.listdir(ckpt_dir) if n.isdigit() and os.path.isdir(os.path.join(ckpt_dir, n))
                    and _step_complete(epath.Path(ckpt_dir) / n)), reverse=True)
    if not steps:
        raise FileNotFoundError(f"{path}: neither a converted checkpoint (config.json listing 'components') nor a "
                                "training run with a complete checkpoint (checkpoints/<step>/); train one with "
                                "`python train.py --config configs/tiny_vae.yaml` or pass Wan2.1_VAE.pth")
    step_dir = os.path.join(ckpt_dir, str(steps[0]))
    for name in ("ema", "vae"):
        if os.path.isdir(os.path.join(step_dir, name)):
            return os.path.join(step_dir, name)
    have = sorted(n for n in os.listdir(step_dir) if not n.startswith("_"))
    raise ValueError(f"{step_dir}: no 'vae' params (items {have}): not a train.recipe=vae run")


def checkpoint_latent_stats(path: str, vae_cfg: Any) -> Any:
    """``vae_cfg`` with the latent statistics a converted VAE checkpoint was written with (``encode_latents``
    stores them in its ``config.json``): the normalisation of the latents made by it, which decoding them must
    invert. ``vae_cfg`` unchanged for other sources (a ``.pth``, a run folder) or a checkpoint without them."""
    from memflow_jax.convert import common as conv

    meta_path = os.path.join(path, conv.CONFIG_FILE) if path and os.path.isdir(path) else ""
    if not os.path.isfile(meta_path):
        return vae_cfg
    with open(meta_path) as f:
        stats = json.load(f).get("latent_stats")
    if not stats:
        return vae_cfg
    mean, std = tuple(float(v) for v in stats["latent_mean"]), tuple(float(v) for v in stats["latent_std"])
    out = dataclasses.replace(vae_cfg, latent_mean=mean, latent_std=std)
    try:
        out.validate()  # the one rule for their length: one global pair, or one per channel
    except ConfigError as e:
        raise ConfigError(f"{path}: its latent statistics have {len(mean)} channels, vae.z_dim is {vae_cfg.z_dim}: "
                          f"the checkpoint was written for another VAE config ({e})") from e
    return out


def load_vae_host(path: str, vae_cfg: Any, what: str = "VAE checkpoint") -> Params:
    """Host (numpy float32) VAE params, checked against ``vae_cfg``, from any of

    * a ``.pth`` / ``.pt`` Wan VAE state dict (``Wan2.1_VAE.pth``; needs torch),
    * a converted checkpoint folder (``config.json`` + component ``vae``; :func:`convert.common.save_converted`,
      e.g. ``OUT/vae`` of ``python -m memflow_jax.data.encode_latents``),
    * a ``train.recipe=vae`` run folder or its ``checkpoints/``: the newest complete step's EMA params when
      saved, else its trained params.

    The one reader of VAE weights for the trainer (``run.vae_ckpt``) and the latent encoder CLI. The pixel codec
    (``vae.codec=pixel``) has no weights: ``{}``, and ``path`` is not read.
    """
    from memflow_jax.convert import common as conv
    from memflow_jax.nn import vae as vae_lib

    if vae_cfg.codec == "pixel":
        return {}
    if not path:
        raise ValueError(f"{what}: no path given")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what}: {path} does not exist")
    path = os.path.abspath(path)  # Orbax restores from absolute paths only
    abstract = vae_lib.abstract_params(vae_cfg)
    if os.path.isfile(path):
        if path.endswith((".pth", ".pt")):
            if vae_cfg.codec != "wan":
                raise ValueError(f"{what}: {path} is a Wan VAE state dict, but vae.codec={vae_cfg.codec}; pass the "
                                 "codec's converted checkpoint (storyworld.pca_codec) or set vae.codec=wan")
            from memflow_jax.convert.vae import convert_vae_state_dict

            return jax.tree_util.tree_map(np.asarray, convert_vae_state_dict(path, vae_cfg))
        raise ValueError(f"{what}: {path}: unsupported file (a Wan VAE .pth, a converted checkpoint folder or a "
                         "vae-recipe run folder)")
    meta_path = os.path.join(path, conv.CONFIG_FILE)
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            meta = json.load(f)
        if "components" in meta:  # converted (Orbax) checkpoint; a run folder's config.json has no components
            return jax.tree_util.tree_map(np.asarray, conv.load_component(path, "vae", abstract))
    import orbax.checkpoint as ocp
    from etils import epath

    item = vae_run_item(path)
    handler = ocp.StandardCheckpointHandler()
    stored = handler.metadata(epath.Path(item))
    stored = getattr(stored, "tree", stored)
    shapes = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.float32), dict(stored),
                                    is_leaf=lambda m: hasattr(m, "shape"))
    conv.validate_against(conv.flatten(shapes), abstract, f"{what}: {item}")
    params = handler.restore(epath.Path(item), args=ocp.args.StandardRestore(abstract))
    return jax.tree_util.tree_map(np.asarray, params)


# --------------------------------------------------------------------------------------------------
# Model call helpers
# --------------------------------------------------------------------------------------------------


def score_fn(params: Params, mcfg: ModelConfig) -> losses.ScoreFn:
    """Bidirectional score net as ``(xt [B,F,C,H,W], t [B,F], ctx [B,T,D]) -> flow [B,F,C,H,W]``."""
    def f(xt, t, ctx):
        flow = dit.forward(params, mcfg, xt.transpose(0, 2, 1, 3, 4), t, ctx)
        return flow.transpose(0, 2, 1, 3, 4)
    return f


def block_causal_forward(params: Params, mcfg: ModelConfig, x: jnp.ndarray, t: jnp.ndarray, ctx: jnp.ndarray,
                         chunk_frames: int) -> jnp.ndarray:
    """Causal generator over a whole clip with block-causal attention (chunk ``i`` attends to chunks ``<= i``;
    reference ``_prepare_blockwise_causal_attn_mask`` with global attention). x: [B, F, C, H, W] -> flow."""
    b, f, _, h, w = x.shape
    n_tok = dit.tokens_per_frame(mcfg, h, w) * chunk_frames
    nchunk = f // chunk_frames
    tk, tv = dit.text_kv(params, mcfg, ctx)
    precision = jax.lax.Precision.HIGHEST if mcfg.dtype == "float32" else None

    def attend(q, k, v, _):
        bq, length, nh, d = q.shape
        qc = q.reshape(bq, nchunk, n_tok, nh, d)

        def one(i):
            mask = jnp.broadcast_to(jnp.arange(length) < (i + 1) * n_tok, (bq, length))
            return attn_lib.attention(qc[:, i], k, v, kv_mask=mask, impl="xla", precision=precision)

        out = jax.lax.map(one, jnp.arange(nchunk))  # [nchunk, B, n_tok, H, D]
        return jnp.moveaxis(out, 0, 1).reshape(bq, length, nh, d), None

    flow, _ = dit.chunk_forward(params, mcfg, x.transpose(0, 2, 1, 3, 4), t, jnp.array(0, jnp.int32), tk, tv,
                                attend, None)
    return flow.transpose(0, 2, 1, 3, 4)


def make_reencode_fn(vae_params: Params, vae_cfg: Any) -> ro.ReencodeFn:
    """Reference ``_process_first_frame_encoding``: decode latents ``0..j``, re-encode the last pixel frame as an
    image latent. ``fn(latents [B, n, C, h, w], j) -> [B, 1, C, h, w]``; ``j`` may be traced: the causal decoder
    runs over all ``n`` latents (later latents do not change earlier pixels) and pixel frame ``stride·j`` (the
    last of latent ``j``) is picked."""
    from memflow_jax.nn import vae as vae_lib

    stride = vae_lib.time_stride(vae_cfg)

    def fn(latents, j):
        b, _, _, h, w = latents.shape
        pix, _ = vae_lib.decode_chunk(vae_params, vae_cfg, latents.astype(jnp.float32),
                                      vae_lib.init_decode_cache(vae_cfg, b, h, w), clamp=True)  # [B, F, 3, H, W]
        frame = jax.lax.dynamic_index_in_dim(pix, stride * jnp.asarray(j, jnp.int32), axis=1, keepdims=True)
        return vae_lib.encode(vae_params, vae_cfg, jnp.transpose(frame, (0, 2, 1, 3, 4)))  # [B, 1, z, h, w]
    return fn


# --------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------


def _like_cond(uncond: jnp.ndarray, cond: jnp.ndarray) -> jnp.ndarray:
    """The negative prompt ``[B, T, D]`` shaped like the conditioning: a story's ``[B, F', T, D]`` (a prompt per
    frame) repeats it on every frame."""
    return uncond if uncond.ndim == cond.ndim else jnp.broadcast_to(uncond[:, None], cond.shape)


def _global_norm(tree: Any) -> jnp.ndarray:
    tree_mod = getattr(optax, "tree", None)
    return tree_mod.norm(tree) if tree_mod is not None and hasattr(tree_mod, "norm") else optax.global_norm(tree)


def _to_py(x: Any) -> Any:
    a = np.asarray(x)
    return a.item() if a.size == 1 else a.tolist()


class Trainer:
    """Builds the mesh, states, data and jitted steps of ``cfg.train.recipe``; :meth:`train` runs the loop.

    ``run_dir`` receives everything: ``checkpoints/``, ``metrics.jsonl``, ``tb/``, ``config.json``,
    ``lora_final/`` (LoRA runs). Resumes from the newest complete checkpoint in ``run_dir/checkpoints``.
    """

    def __init__(self, cfg: Config, run_dir: str, log: Callable[[str], None] | None = None):
        self.log = log or (lambda m: print(m, flush=True))
        self.train_cfg = t = cfg.train
        self.run_cfg: RunConfig = cfg.run
        t.check_against(cfg.sampler)
        if t.gradient_accumulation_steps != 1:
            raise ConfigError("train.gradient_accumulation_steps > 1 is not implemented; raise train.batch_size "
                              "(per device) or use more devices instead")
        if t.lora_enabled and t.lora_dropout > 0:
            raise ConfigError("train.lora_dropout > 0 is not supported (adapters are merged into the kernels); "
                              "set it to 0 (the reference configs use 0)")
        self.recipe = t.recipe
        self.run_dir = os.path.abspath(run_dir)
        self.is_main = jax.process_index() == 0
        self.mesh = sh.make_mesh(t.mesh_data, t.mesh_fsdp, t.mesh_tensor)
        n_dp = int(np.prod([self.mesh.shape[a] for a in sh.DEFAULT_RULES.mesh_axes("batch")
                            if a in self.mesh.axis_names]))
        self.global_batch = t.global_batch_size(n_dp)
        sh.batch_sharding(self.mesh, self.global_batch)  # divisibility check
        self.gen_cfg = with_numerics(cfg.model, t)
        self.teacher_cfg = with_numerics(cfg.teacher_model, t)
        self.cfg = cfg.replace(model=self.gen_cfg, teacher_model=self.teacher_cfg)
        self.critic_cfg = self.teacher_cfg if self.run_cfg.critic_arch == "teacher" else self.gen_cfg
        self.rep = NamedSharding(self.mesh, P())
        self.bsh = sh.batch_sharding(self.mesh, self.global_batch)
        s = cfg.sampler
        self.chunk = s.chunk_frames
        self.latent_hw = s.latent_hw
        self.gen_schedule = sch.make_schedule(s.timestep_shift, num_train_timesteps=s.num_train_timesteps)
        self.score_schedule = sch.make_schedule(self.run_cfg.score_timestep_shift,
                                                num_train_timesteps=s.num_train_timesteps)
        self.step = 0
        self.base_key = jax.device_put(jax.random.key(t.seed), self.rep)  # replicated on every process
        self._jitted: dict[Any, Callable] = {}
        self.stream_host = ro.StreamHost()
        self.carry = None
        self._writer = None
        self._metrics_file = None

        if self.recipe == "dmd_long":
            if not t.streaming_training:
                raise ConfigError("train.recipe=dmd_long trains in streaming windows: set train.streaming_training="
                                  "true (or use train.recipe=dmd)")
            ro.new_frame_choices(ro.StreamHost(), t.streaming_chunk_size, t.streaming_min_new_frame, self.chunk)
        self.rc: ro.RolloutConfig | None = None
        if self.recipe in ("dmd", "dmd_long"):
            rule = "interactive" if self.recipe == "dmd_long" else "single"
            self.rc = ro.rollout_config(self.cfg, self.global_batch, model=self.gen_cfg, bank_record_rule=rule,
                                        ctx_noise_always=self.run_cfg.ctx_noise_always,
                                        ctx_qbank_quirk=self.run_cfg.ctx_qbank_quirk,
                                        reset_cache_at_switch=self.run_cfg.reset_cache_at_switch)
        # the story loss (the story recipe's, or beside DMD with train.story_weight): teacher forcing with the
        # sampler's memory semantics
        self.story_rc = ro.story_config(self.cfg, self.global_batch, model=self.gen_cfg) \
            if self.recipe in ("story", "ode_story") or t.story_weight > 0 else None
        self.stories = self.recipe in ("story", "teacher_story") or t.story_weight > 0  # stories to encode
        if self.recipe in ("story", "ode_story"):
            self.rc = self.story_rc
        if self.recipe == "dmd_story":  # whole stories rolled out with the sampler's memory semantics
            self.rc = ro.story_config(self.cfg, self.global_batch, model=self.gen_cfg)
        # vae recipe: check the videos against the config before anything compiles
        self.video_source = self._video_source() if self.recipe == "vae" else None
        self._build_models()
        self._build_data()
        from memflow_jax.training.checkpoint import TrainCheckpointer

        self.ckpt = TrainCheckpointer(os.path.join(self.run_dir, "checkpoints"), save_interval_steps=t.save_interval,
                                      max_to_keep=t.max_to_keep, async_save=t.async_checkpointing)
        self._restore()

    # ------------------------------------------------------------------ models
    def _shard_params(self, host: Params | None, mcfg: ModelConfig, key: jax.Array, scratch: bool = False) -> Params:
        abstract = dit.abstract_params(mcfg)
        shardings = sh.param_shardings(abstract, self.mesh)
        if host is None:
            init = (lambda k: dit.init_params(mcfg, k)) if scratch else (lambda k: synthetic_init(mcfg, k))
            return jax.jit(init, out_shardings=shardings)(key)
        host = jax.tree_util.tree_map(lambda x, a: np.asarray(x, a.dtype), host, abstract)
        return sh.shard_params(host, shardings)

    def _weights(self, path: str, mcfg: ModelConfig, what: str, key: jax.Array) -> Params:
        synthetic = self.run_cfg.synthetic_data
        if path == SCRATCH:  # train from the Wan initialisation (e.g. a small teacher on a new domain)
            return self._shard_params(None, mcfg, key, scratch=True)
        if path and (os.path.exists(path) or not synthetic):
            return self._shard_params(load_dit_host(path, mcfg, what), mcfg, key)
        if not synthetic:
            raise ConfigError(f"{what}: no checkpoint configured; set it (or '{SCRATCH}' for the Wan "
                              "initialisation, or run.synthetic_data=true for a random init)")
        return self._shard_params(None, mcfg, key)

    def _copy(self, tree: Params) -> Params:
        shardings = jax.tree_util.tree_map(lambda x: x.sharding, tree)
        return jax.jit(lambda x: jax.tree_util.tree_map(jnp.copy, x), out_shardings=shardings)(tree)

    def _make_state(self, params: Params, opt: optax.GradientTransformation) -> tuple[TrainState, TrainState]:
        abstract = jax.eval_shape(lambda p: p, params)
        p_sh = jax.tree_util.tree_map(lambda x: x.sharding, params)
        o_sh = sh.opt_state_shardings(opt, abstract, p_sh)
        opt_state = jax.jit(opt.init, out_shardings=o_sh)(params)
        return TrainState(params, opt_state), TrainState(p_sh, o_sh)

    def _lora_init(self, base: Params, key: jax.Array) -> Params:
        t = self.train_cfg
        base_abstract = jax.eval_shape(lambda x: x, base)
        shardings = sh.param_shardings(lora_lib.abstract_lora(base_abstract, t.lora_rank), self.mesh)
        return jax.jit(lambda k: lora_lib.init_lora(base_abstract, t.lora_rank, k), out_shardings=shardings)(key)

    def _build_models(self) -> None:
        t, r = self.train_cfg, self.run_cfg
        keys = jax.random.split(jax.random.fold_in(self.base_key, 12345), 6)
        gen_opt, critic_opt = optim.make_optimizers(t)
        self.gen_opt, self.critic_opt = gen_opt, critic_opt
        self.lora = t.lora_enabled
        self.lora_scale = t.lora_scale if self.lora else 1.0
        if self.recipe == "vae":
            self._build_vae(keys[0])
            return
        if self.recipe in ("teacher", "teacher_story"):
            base = self._weights(r.teacher_ckpt, self.gen_cfg, "run.teacher_ckpt (model to fine-tune)", keys[0])
        else:
            base = self._weights(t.generator_ckpt, self.gen_cfg, "train.generator_ckpt", keys[0])
        self.gen_base = base if self.lora else None
        gen_trainable = self._lora_init(base, keys[1]) if self.lora else base
        if self.lora and t.lora_ckpt:
            gen_trainable = self._load_lora(t.lora_ckpt, "generator_lora", gen_trainable)
        self.gen, self.gen_sh = self._make_state(gen_trainable, gen_opt)
        self.use_ema = optim.ema_enabled(t)
        self.ema = None
        if self.use_ema:
            self.ema = jax.jit(optim.ema_init, out_shardings=self.gen_sh.params)(self.gen.params)
        self.critic = self.critic_base = self.teacher = None
        self.critic_sh = None
        if self.recipe in ("dmd", "dmd_long", "dmd_story"):
            self.teacher = self._weights(r.teacher_ckpt, self.teacher_cfg, "run.teacher_ckpt (real score)", keys[2])
            if r.critic_ckpt:
                critic = self._weights(r.critic_ckpt, self.critic_cfg, "run.critic_ckpt", keys[3])
            else:
                critic = self._copy(self.teacher if r.critic_arch == "teacher" else base)
            lora_critic = self.lora and t.lora_apply_to_critic
            self.critic_base = critic if lora_critic else None
            critic_trainable = self._lora_init(critic, keys[4]) if lora_critic else critic
            if lora_critic and t.lora_ckpt:
                critic_trainable = self._load_lora(t.lora_ckpt, "critic_lora", critic_trainable)
            self.critic, self.critic_sh = self._make_state(critic_trainable, critic_opt)
        self.reencode_fn = self.story_vae = None
        if self.stories:  # the frozen encoder of the stories' latents
            self.story_vae = (self._vae_params(keys[5], "the stories' videos are encoded with it"),
                              self._reencode_vae_cfg())
        slicing = self.recipe == "dmd" and t.slice_last_frames != -1 and t.num_training_frames > t.slice_last_frames
        if r.reencode_first_frame and (self.recipe == "dmd_long" or slicing):
            self.reencode_fn = make_reencode_fn(self._vae_params(keys[5]), self._reencode_vae_cfg())

    def _reencode_vae_cfg(self) -> Any:
        """The VAE config the re-encoding decodes with: ``vae``, with the latent statistics of ``run.vae_ckpt``
        when it is a converted checkpoint that records them (the normalisation of the training latents)."""
        vcfg = self.cfg.vae
        stats_cfg = checkpoint_latent_stats(self.run_cfg.vae_ckpt, vcfg)
        if stats_cfg is not vcfg and (stats_cfg.latent_mean, stats_cfg.latent_std) != (vcfg.latent_mean,
                                                                                       vcfg.latent_std):
            self.log(f"re-encoding with the latent statistics of run.vae_ckpt={self.run_cfg.vae_ckpt} "
                     "(the config's vae.latent_mean / latent_std differ)")
        return stats_cfg

    def _vae_params(self, key: jax.Array, why: str = "run.reencode_first_frame=true needs it") -> Params:
        from memflow_jax.nn import vae as vae_lib

        vcfg = self.cfg.vae
        if vcfg.z_dim != self.gen_cfg.in_dim:
            raise ConfigError(f"vae.z_dim={vcfg.z_dim} != model.in_dim={self.gen_cfg.in_dim}")
        abstract = vae_lib.abstract_params(vcfg)
        shardings = jax.tree_util.tree_map(lambda _: self.rep, abstract)  # small: replicated
        if self.run_cfg.vae_ckpt:
            return sh.shard_params(load_vae_host(self.run_cfg.vae_ckpt, vcfg, "run.vae_ckpt"), shardings)
        if not self.run_cfg.synthetic_data:
            raise ConfigError(f"run.vae_ckpt is empty ({why}): set it to Wan2.1_VAE.pth, a converted checkpoint or "
                              "a vae run" + (", or disable the re-encoding with run.reencode_first_frame=false"
                                             if not self.stories else ""))
        return jax.jit(lambda k: vae_lib.init_params(vcfg, k), out_shardings=shardings)(key)

    def _build_vae(self, key: jax.Array) -> None:
        """vae recipe: the VAE tree is the trained model (``self.gen``), initialised from ``run.vae_ckpt`` or
        randomly; params FSDP-sharded by the same rules as the DiT's, compute in bf16 with mixed precision."""
        from memflow_jax.nn import vae as vae_lib

        t, r = self.train_cfg, self.run_cfg
        vcfg = self.cfg.vae
        if not vae_lib.learned_decoder(vcfg):
            raise ConfigError(f"train.recipe=vae: vae.codec={vcfg.codec} has no network to train (pixel: none; pca: "
                              "fitted in closed form by storyworld.pca_codec); set vae.codec=wan, or "
                              "vae.pca_decoder=true to train a decoder for the PCA latents")
        self.vae_cfg = dataclasses.replace(vcfg, dtype="bfloat16") if t.mixed_precision else vcfg
        abstract = vae_lib.abstract_params(vcfg)
        shardings = sh.param_shardings(abstract, self.mesh)
        if r.vae_ckpt:
            params = sh.shard_params(load_vae_host(r.vae_ckpt, vcfg, "run.vae_ckpt (vae recipe init)"), shardings)
        else:
            params = jax.jit(lambda k: vae_lib.init_params(vcfg, k), out_shardings=shardings)(key)
        self.gen_base = None
        self.gen, self.gen_sh = self._make_state(params, self.gen_opt)
        self.use_ema = optim.ema_enabled(t)
        self.ema = jax.jit(optim.ema_init, out_shardings=self.gen_sh.params)(self.gen.params) if self.use_ema \
            else None
        self.critic = self.critic_base = self.teacher = None
        self.critic_sh = None
        self.reencode_fn = None

    def _load_lora(self, path: str, name: str, like: Params) -> Params:
        abstract = jax.eval_shape(lambda x: x, like)
        tree, meta = lora_lib.load_lora(path, name, abstract)
        if meta["rank"] != self.train_cfg.lora_rank:
            raise ConfigError(f"{path}: LoRA rank {meta['rank']} != train.lora_rank={self.train_cfg.lora_rank}")
        return sh.shard_params(jax.tree_util.tree_map(np.asarray, tree),
                               jax.tree_util.tree_map(lambda x: x.sharding, like))

    def gen_params(self, trainable: Params | None = None) -> Params:
        """Effective generator params (LoRA merged)."""
        trainable = self.gen.params if trainable is None else trainable
        return lora_lib.merge_lora_params(self.gen_base, trainable, self.lora_scale) if self.lora else trainable

    # ------------------------------------------------------------------ data
    def _embedder(self) -> Any:
        t = self.train_cfg
        if self.run_cfg.synthetic_data and not t.text_cache_dir:
            return SyntheticEmbedder(self.gen_cfg.text_len, self.gen_cfg.text_dim, t.data_seed)
        if not t.text_cache_dir:
            raise ConfigError("train.text_cache_dir is empty: build a UMT5 embedding cache with `python -m "
                              "memflow_jax.data.text_cache build --prompts ... --out DIR ...` and set it")
        from memflow_jax.data import TextEmbeddingCache

        cache = TextEmbeddingCache(t.text_cache_dir, as_dtype=np.float32)
        if (cache.text_len, cache.dim) != (self.gen_cfg.text_len, self.gen_cfg.text_dim):
            raise ConfigError(f"text cache {t.text_cache_dir} holds [{cache.text_len}, {cache.dim}] embeddings, the "
                              f"model expects [{self.gen_cfg.text_len}, {self.gen_cfg.text_dim}]")
        return cache

    def _latent_source(self, ode: bool) -> Any:
        from memflow_jax import data

        t = self.train_cfg
        h, w = self.latent_hw
        shape = (t.num_training_frames, self.gen_cfg.in_dim, h, w)
        if self.run_cfg.synthetic_data and not t.latent_data_path:
            if ode:
                sig = np.asarray(sch.sigma_at(self.gen_schedule, jnp.asarray(self._timesteps())))
                return SyntheticOdeSource(self.run_cfg.synthetic_size, shape, sig, t.data_seed)
            return SyntheticLatentSource(self.run_cfg.synthetic_size, shape, t.data_seed)
        path = t.latent_data_path
        if not path:
            raise ConfigError("train.latent_data_path is empty (latent files / manifest / ArrayRecord), or set "
                              "run.synthetic_data=true")
        field = "ode_latent" if ode else "latents"
        if ".array_record" in path:
            return data.ArrayRecordSource(path, field=field)
        cls = data.OdeTrajectorySource if ode else data.LatentSource
        if path.endswith(".jsonl"):
            return cls.from_manifest(path)
        return cls(path)

    def _story_ode_source(self, embedder: Any) -> "StoryOdeSource":
        """The ode_story recipe's data (``train.latent_data_path``), checked against the generator's denoising
        steps, latent shape and chunk."""
        path = self.train_cfg.latent_data_path
        if not path:
            raise ConfigError("train.latent_data_path is empty: make story ODE pairs with `python -m "
                              "memflow_jax.training.ode_pairs --config CFG --stories STORIES --out DIR` and set it")
        src = StoryOdeSource(path, embedder, self.chunk, self._return_min_absent())
        want = self._timesteps()
        got = np.asarray(src.meta.get("denoising_timesteps", []), np.float32)
        if got.shape != want.shape or not np.allclose(got, want, atol=1e-3):
            raise ConfigError(f"{path}: trajectories recorded at timesteps {got.tolist()}, the generator denoises at "
                              f"{want.tolist()} (sampler.denoising_step_list, warp_denoising_step, timestep_shift): "
                              "regenerate the ODE pairs with this config")
        h, w = self.latent_hw
        shape = (len(want) + 1, src.num_latent, self.gen_cfg.in_dim, h, w)
        if tuple(src.shape) != shape:
            raise ConfigError(f"{path}: ode_latent {tuple(src.shape)}, the model needs {shape} ([S + 1, F, "
                              "in_dim, h, w]): regenerate the ODE pairs with this config")
        if src.num_latent % self.chunk:
            raise ConfigError(f"{path}: stories of {src.num_latent} latent frames are not whole chunks of "
                              f"sampler.chunk_frames={self.chunk}; export the stories with --chunk {self.chunk}")
        return src

    def _return_min_absent(self) -> int | None:
        """``train.story_return_min_absent`` where the story loss is return-weighted or its return frames are
        logged (``story_return_min_absent > 0``, weight 0: the plain loss), else None (no mask field)."""
        t = self.train_cfg
        return t.story_return_min_absent if t.story_return_weight > 0 or t.story_return_min_absent > 0 else None

    def _timesteps(self) -> np.ndarray:
        rc = ro.rollout_config(self.cfg, 1, model=self.gen_cfg)
        return np.asarray(rc.timesteps, np.float32)

    def _video_source(self) -> VideoClipSource:
        """vae recipe data, checked against the VAE strides and the sampler's resolution."""
        from memflow_jax.nn import vae as vae_lib

        t, s, vcfg = self.train_cfg, self.cfg.sampler, self.cfg.vae
        if not t.video_data_path:
            raise ConfigError("train.video_data_path is empty: export a storyworld dataset (`python -m "
                              "memflow_jax.storyworld.export --out DIR --kind clips --clip-frames 33 --height H "
                              "--width W`) and set train.video_data_path=DIR")
        ts, ss = vae_lib.time_stride(vcfg), vae_lib.space_stride(vcfg)
        n = t.vae_clip_frames
        if (n - 1) % ts:
            lo = 1 + (n - 1) // ts * ts
            raise ConfigError(f"train.vae_clip_frames={n} is not 1 + {ts}k (the VAE's time stride is {ts}): use "
                              f"{lo} or {lo + ts}")
        if tuple(s.vae_stride) != (ts, ss, ss):
            raise ConfigError(f"sampler.vae_stride={list(s.vae_stride)} does not match the VAE (time stride {ts}, "
                              f"space stride {ss}): set sampler.vae_stride=[{ts},{ss},{ss}]")
        src = VideoClipSource(t.video_data_path, n)
        if (src.height, src.width) != (s.height, s.width):
            raise ConfigError(f"{t.video_data_path}: videos are {src.height}x{src.width} px, the config's "
                              f"sampler.height x width is {s.height}x{s.width}; export the dataset at that size or "
                              "set sampler.height / sampler.width")
        if src.num_skipped:
            self.log(f"vae data: {src.num_skipped} video(s) shorter than {n} frames skipped")
        return src

    def _story_source(self, embedder: Any, path: str, key: str, videos: bool = True) -> StorySource:
        """Stories (the story recipes' data, or the story term's: config ``key`` = ``path``), checked against the
        sampler's chunk, the VAE's strides and the resolution."""
        from memflow_jax.nn import vae as vae_lib

        s = self.cfg.sampler
        if not path:
            raise ConfigError(f"{key} is empty: export a stories dataset (`python -m "
                              "memflow_jax.storyworld.export --out DIR --kind stories --num-latent F --chunk "
                              f"{self.chunk} --t-stride {s.vae_stride[0]}`) and set {key}=DIR")
        src = StorySource(path, embedder, videos=videos, return_min_absent=self._return_min_absent())
        ts = vae_lib.time_stride(self.cfg.vae)
        if (src.chunk, src.t_stride) != (self.chunk, ts):
            raise ConfigError(f"{path}: stories aligned to chunks of {src.chunk} latent frames at time "
                              f"stride {src.t_stride}; the model uses sampler.chunk_frames={self.chunk} and a VAE "
                              f"of time stride {ts}: re-export with --chunk {self.chunk} --t-stride {ts}")
        if (src.height, src.width) != (s.height, s.width):
            raise ConfigError(f"{path}: videos are {src.height}x{src.width} px, the config's "
                              f"sampler.height x width is {s.height}x{s.width}")
        return src

    def _build_data(self) -> None:
        from memflow_jax import data

        t = self.train_cfg
        if self.recipe == "vae":  # videos only: no prompts, no text embeddings
            self.embedder = self.uncond = None
            self.source = self.video_source
            self.data_iter = data.make_loader(self.source, self.global_batch // jax.process_count(),
                                              seed=t.data_seed, shuffle=True, worker_count=t.data_workers,
                                              num_threads=2, prefetch_buffer_size=2)
            return
        per_process = self.global_batch // jax.process_count()
        if self.recipe in ("story", "teacher_story", "dmd_story", "ode_story"):  # dmd_story: prompts only
            dmd_story = self.recipe == "dmd_story"
            self.embedder = self._embedder()
            if self.recipe == "ode_story":  # a story teacher's trajectories with the stories' prompts
                self.source = self._story_ode_source(self.embedder)
            else:
                self.source = self._story_source(self.embedder, t.video_data_path, "train.video_data_path",
                                                 videos=not dmd_story)
            self.story_frames = self.source.num_latent
            if dmd_story and self.story_frames % self.chunk:
                raise ConfigError(f"train.video_data_path: stories of {self.story_frames} latent frames are not whole "
                                  f"chunks of sampler.chunk_frames={self.chunk}; export them with --chunk "
                                  f"{self.chunk}")
            self.uncond = self._uncond(per_process) if dmd_story or t.text_dropout > 0 else None
            self.story_source = None
            self.data_iter = data.make_loader(self.source, per_process, seed=t.data_seed, shuffle=True,
                                              worker_count=t.data_workers, num_threads=2, prefetch_buffer_size=2)
            return
        if self.recipe in ("teacher", "ode_init"):
            source = self._latent_source(self.recipe == "ode_init")
        elif self.run_cfg.synthetic_data and not (t.text_cache_dir and os.path.exists(t.data_path)):
            source = SyntheticPromptSource(self.run_cfg.synthetic_size)
        elif self.recipe == "dmd_long":
            source = data.SwitchPromptSource(t.data_path, t.switch_prompt_path)
        else:
            source = data.PromptSource(t.data_path)
        self.embedder = self._embedder()
        self.source = EmbeddingSource(source, self.embedder)
        self.data_iter = data.make_loader(self.source, per_process, seed=t.data_seed, shuffle=True,
                                          worker_count=t.data_workers, num_threads=2, prefetch_buffer_size=2)
        self.uncond = self._uncond(per_process)
        self.story_source = self._story_source(self.embedder, t.story_data_path, "train.story_data_path") \
            if t.story_weight > 0 else None

    def _uncond(self, per_process: int) -> jax.Array:
        """``train.negative_prompt``'s embedding as a global batch ``[B, T, D]`` (text dropout, CFG)."""
        neg = np.asarray(self.embedder[self.train_cfg.negative_prompt], np.float32)
        local = np.ascontiguousarray(np.broadcast_to(neg, (per_process,) + neg.shape))
        return sh.make_global_batch({"uncond": local}, self.mesh)["uncond"]

    def _story_batch(self, step: int) -> dict[str, jax.Array] | None:
        """The story term's global batch of step ``step`` (None without the term): stories drawn by index from
        (data_seed, step), so a resumed run draws the same ones without a second checkpointed iterator; each
        process loads its rows."""
        src, n = self.story_source, self.global_batch
        if src is None:
            return None
        draw = np.random.default_rng([self.train_cfg.data_seed, STORY_SALT, step])
        idx = draw.choice(len(src), n, replace=len(src) < n)
        items = [src[int(i)] for i in idx[sh.process_batch_slice(n, self.mesh)]]
        local = {k: np.stack([it[k] for it in items]) for k in ("video", "contexts", "switch_frames")
                 + self._return_fields()}
        return sh.make_global_batch(local, self.mesh)

    def _next_batch(self, keys: tuple[str, ...], dtype: Any = np.float32) -> dict[str, jax.Array]:
        """The next global batch of ``keys``, cast to ``dtype`` on the host (None: as stored)."""
        batch = next(self.data_iter)
        local = {k: np.asarray(batch[k], dtype) for k in keys}
        return sh.make_global_batch(local, self.mesh)

    # ------------------------------------------------------------------ checkpoint
    def _gen_item_names(self) -> tuple[str, str]:
        """Checkpoint item names of the trained model's params and optimizer state."""
        if self.recipe == "vae":
            return "vae", "vae_opt"
        return ("generator_lora" if self.lora else "generator"), "generator_opt"

    def _state_items(self) -> dict[str, Any]:
        gen_name, opt_name = self._gen_item_names()
        items = {gen_name: self.gen.params, opt_name: self.gen.opt_state, "rng": self.base_key}
        if self.ema is not None:
            items["ema"] = self.ema
        if self.critic is not None:
            critic_name = "critic_lora" if self.critic_base is not None else "critic"
            items[critic_name] = self.critic.params
            items["critic_opt"] = self.critic.opt_state
        if self.recipe == "dmd_long" and self.carry is not None:
            items["stream"] = self.carry
        return items

    def _abstract_items(self) -> tuple[dict[str, Any], dict[str, Any]]:
        items = self._state_items()
        if self.recipe == "dmd_long" and "stream" not in items:
            items["stream"] = ro.abstract_stream(self.rc, self.train_cfg.streaming_chunk_size)
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), items)
        shardings = {k: (jax.tree_util.tree_map(lambda x: x.sharding, v) if k != "stream"
                         else stream_shardings(v, self.mesh)) for k, v in items.items()}
        shardings["rng"] = self.rep
        return abstract, shardings

    def _restore(self) -> None:
        abstract, shardings = self._abstract_items()
        restored = self.ckpt.restore_latest(abstract, shardings, data_iterator=self.data_iter,
                                            optional=("ema", "stream"))
        if restored is None:
            return
        st = restored.state
        gen_name, opt_name = self._gen_item_names()
        self.gen = TrainState(st[gen_name], st[opt_name])
        if self.ema is not None and st.get("ema") is not None:
            self.ema = st["ema"]
        if self.critic is not None:
            name = "critic_lora" if self.critic_base is not None else "critic"
            self.critic = TrainState(st[name], st["critic_opt"])
        self.base_key = st["rng"]
        meta = restored.metadata
        self.step = int(meta.get("step", restored.step))
        if self.recipe == "dmd_long":
            self.stream_host = ro.StreamHost(**meta.get("stream_host", {}))
            self.carry = st.get("stream")
            if self.carry is None:
                self.stream_host = ro.StreamHost()
        self.log(f"resumed from {self.ckpt.directory}/{restored.step} (step {self.step})")

    def save(self, force: bool = False) -> bool:
        meta = {"step": self.step, "recipe": self.recipe, "stream_host": self.stream_host.to_json()}
        return self.ckpt.save(self.step, self._state_items(), metadata=meta, data_iterator=self.data_iter,
                              force=force)

    # ------------------------------------------------------------------ step functions
    def _jit(self, key: Any, build: Callable[[], Callable]) -> Callable:
        if key not in self._jitted:
            self._jitted[key] = build()
        return self._jitted[key]

    def _dmd_draws(self, rng: jax.Array, x: jnp.ndarray, aux: dict) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Integer timestep draw [B, 1] and noise like x (reference ts_schedule bounds may be traced)."""
        t = self.train_cfg
        lo = aux["denoised_timestep_to"] if (t.ts_schedule and self.rc.same_step_across_blocks) \
            else t.min_score_timestep
        hi = aux["denoised_timestep_from"] if (t.ts_schedule_max and self.rc.same_step_across_blocks) \
            else t.num_train_timestep
        k_t, k_n = jax.random.split(rng)
        raw = jax.random.randint(k_t, (x.shape[0], 1), lo, hi, dtype=jnp.int32)
        return raw, jax.random.normal(k_n, x.shape, x.dtype)

    def _window(self, gen_params: Params, carry: Any, batch_or_none: Any, rng: jax.Array, variant: tuple
                ) -> tuple[jnp.ndarray, jnp.ndarray | None, Any, dict, jnp.ndarray]:
        """Generate the training clip of one step: (x, mask, new carry, aux, cond)."""
        if self.recipe == "dmd_long":
            (n_recache,) = variant
            n_new, has_prev = batch_or_none["n_new"], batch_or_none["has_prev"]
            win, mask, carry, aux = ro.streaming_window(
                gen_params, self.rc, carry, rng, window=self.train_cfg.streaming_chunk_size, n_new=n_new,
                has_prev=has_prev, n_recache=n_recache, reencode_fn=self.reencode_fn, constrain=self._pin)
            cond = jnp.where(aux["use_second"], carry.cond2, carry.cond)
            return win, mask, carry, aux, cond
        (num_frames,) = variant
        if self.recipe == "dmd_story":  # whole stories; the scores see a prompt per (patch) frame [B, F', T, D]
            ctx, sw = batch_or_none["contexts"], batch_or_none["switch_frames"]
            x, aux = ro.story_rollout(gen_params, self.rc, rng, ctx, sw, num_frames=num_frames, constrain=self._pin)
            cond = self._pin(ro.frame_contexts(ctx, sw, num_frames, self.gen_cfg.patch_size[0]))
            return x, None, carry, aux, cond
        cond = batch_or_none["prompt_embeds"]
        x, _, aux = ro.rollout(gen_params, self.rc, rng, cond, num_frames=num_frames, constrain=self._pin)
        x, mask = self._slice_last(x, num_frames)
        return x, mask, carry, aux, cond

    def _slice_last(self, x: jnp.ndarray, num_frames: int) -> tuple[jnp.ndarray, jnp.ndarray | None]:
        """Reference ``_run_generator``: keep the last ``slice_last_frames`` (first one VAE re-encoded) and mask the
        first chunk unless the clip has the minimum length (no-ops at the reference's 21/21/21 settings)."""
        t = self.train_cfg
        keep = t.slice_last_frames
        if keep != -1 and num_frames > keep:
            if self.reencode_fn is not None and keep > 1:
                head = sg(x[:, :-(keep - 1)])
                first = self.reencode_fn(head, head.shape[1] - 1)
                x = jnp.concatenate([first.astype(x.dtype), x[:, -(keep - 1):]], axis=1)
            else:
                x = x[:, -keep:]
        if num_frames == t.min_num_training_frames:
            return x, None
        mask = jnp.broadcast_to((jnp.arange(x.shape[1]) >= self.chunk)[None, :, None, None, None],
                                (x.shape[0], x.shape[1], 1, 1, 1))
        return x, mask

    def _prompt_batch_sh(self) -> dict[str, Any]:
        """Shardings of a (non-streaming) DMD step's prompt batch."""
        if self.recipe == "dmd_story":
            return {k: self.bsh for k in ("contexts", "switch_frames") + self._return_fields()}
        return {"prompt_embeds": self.bsh}

    def _gen_step_fn(self, variant: tuple) -> Callable:
        t, r = self.train_cfg, self.run_cfg
        teacher_cfg, critic_cfg = self.teacher_cfg, self.critic_cfg
        stream = self.recipe == "dmd_long"

        def step(gen: TrainState, ema, gen_base, critic_params, critic_base, teacher, carry, batch, uncond, rng,
                 loop_step, story):
            k_roll, k_loss = jax.random.split(rng)
            critic_eff = lora_lib.merge_lora_params(critic_base, critic_params, self.lora_scale) \
                if critic_base is not None else critic_params
            critic_eff, teacher_ng = sg(critic_eff), sg(teacher)
            story_latents = self._story_latents(story) if story is not None else None

            def loss_fn(trainable):
                params = lora_lib.merge_lora_params(sg(gen_base), trainable, self.lora_scale) \
                    if gen_base is not None else trainable
                x, mask, new_carry, aux, cond = self._window(params, carry, batch, k_roll, variant)
                raw, noise = self._dmd_draws(k_loss, x, aux)
                weight = self._return_frame_weight(batch)  # dmd_story with train.story_return_weight
                loss, laux = losses.dmd_generator_loss(
                    x, real_score_fn=self._score(teacher_ng, teacher_cfg),
                    fake_score_fn=self._score(critic_eff, critic_cfg),
                    cond=cond, uncond=_like_cond(uncond, cond), schedule=self.gen_schedule,
                    real_score_schedule=self.score_schedule,
                    raw_timestep=raw, noise=noise, guidance_scale=t.guidance_scale,
                    guidance_sigma_max=t.guidance_sigma_max,
                    fake_guidance_scale=t.fake_guidance_scale, timestep_shift=self.rc.timestep_shift,
                    min_step=t.min_step, max_step=t.max_step, mask=mask, frame_weight=weight)
                terms = {} if weight is None else {"return_frame_fraction": jnp.mean(batch["return_mask"])}
                if story is not None:  # generator loss = DMD + story_weight * story (train.story_weight)
                    terms["generator_dmd_loss"] = loss
                    terms["story_loss"], _ = self._story_loss(params, self.story_rc, story_latents, story,
                                                              jax.random.fold_in(rng, STORY_SALT))
                    loss = loss + t.story_weight * terms["story_loss"]
                return loss, (new_carry, laux["dmdtrain_gradient_norm"], aux, terms)

            (loss, (new_carry, dmd_norm, aux, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(gen.params)
            updates, opt_state = self.gen_opt.update(grads, gen.opt_state, gen.params)
            params = optax.apply_updates(gen.params, updates)
            if ema is not None:
                ema = optim.ema_update(ema, params, loop_step + 1, t.ema_weight, t.ema_start_step)
            metrics = {"generator_loss": loss, "generator_grad_norm": _global_norm(grads),
                       "dmdtrain_gradient_norm": dmd_norm, "exit_step": aux["exit_steps"][0].astype(jnp.float32),
                       **terms}
            return TrainState(params, opt_state), ema, new_carry, metrics

        ema_sh = self.gen_sh.params if self.ema is not None else None
        base_sh = self._sh(self.gen_base)
        carry_sh = self._carry_sh() if stream else None
        batch_sh = {"n_new": self.rep, "has_prev": self.rep} if stream else self._prompt_batch_sh()
        story_sh = {k: self.bsh for k in ("video", "contexts", "switch_frames") + self._return_fields()} \
            if self.story_source is not None else None
        in_sh = (self.gen_sh, ema_sh, base_sh, self.critic_sh.params, self._sh(self.critic_base),
                 self._sh(self.teacher), carry_sh, batch_sh, self.bsh, self.rep, self.rep, story_sh)
        out_sh = (self.gen_sh, ema_sh, carry_sh, self.rep)
        return jax.jit(step, in_shardings=in_sh, out_shardings=out_sh, donate_argnums=(0, 1, 6))

    def _critic_step_fn(self, variant: tuple, train_critic: bool = True) -> Callable:
        t, r = self.train_cfg, self.run_cfg
        critic_cfg = self.critic_cfg
        stream = self.recipe == "dmd_long"

        def step(critic: TrainState, critic_base, gen_params, gen_base, carry, batch, rng):
            k_roll, k_loss = jax.random.split(rng)
            gen_eff = lora_lib.merge_lora_params(gen_base, gen_params, self.lora_scale) \
                if gen_base is not None else gen_params
            x, mask, new_carry, aux, cond = self._window(sg(gen_eff), carry, batch, k_roll, variant)
            x = sg(x)
            if not train_critic:  # roll the stream on without a loss (reference train_first_chunk=false)
                return critic, new_carry, {}
            if not stream:
                mask = None  # reference DMD.critic_loss passes no mask
            raw, noise = self._dmd_draws(k_loss, x, aux)

            def loss_fn(trainable):
                cp = lora_lib.merge_lora_params(sg(critic_base), trainable, self.lora_scale) \
                    if critic_base is not None else trainable
                loss, _ = losses.critic_loss(
                    x, fake_score_fn=self._score(cp, critic_cfg), ctx=cond, schedule=self.gen_schedule,
                    fake_score_schedule=self.score_schedule, raw_timestep=raw, noise=noise,
                    timestep_shift=self.rc.timestep_shift, min_step=t.min_step, max_step=t.max_step, mask=mask,
                    critic_reconvert_quirk=r.critic_reconvert_quirk)
                return loss

            loss, grads = jax.value_and_grad(loss_fn)(critic.params)
            updates, opt_state = self.critic_opt.update(grads, critic.opt_state, critic.params)
            params = optax.apply_updates(critic.params, updates)
            metrics = {"critic_loss": loss, "critic_grad_norm": _global_norm(grads)}
            return TrainState(params, opt_state), new_carry, metrics

        carry_sh = self._carry_sh() if stream else None
        batch_sh = {"n_new": self.rep, "has_prev": self.rep} if stream else self._prompt_batch_sh()
        in_sh = (self.critic_sh, self._sh(self.critic_base), self.gen_sh.params, self._sh(self.gen_base), carry_sh,
                 batch_sh, self.rep)
        out_sh = (self.critic_sh, carry_sh, self.rep)
        return jax.jit(step, in_shardings=in_sh, out_shardings=out_sh, donate_argnums=(0, 4))

    def _teacher_step_fn(self) -> Callable:
        t, r = self.train_cfg, self.run_cfg
        mcfg = self.gen_cfg
        p_drop = t.text_dropout
        story = self.recipe == "teacher_story"

        def step(gen: TrainState, ema, gen_base, batch, rng, loop_step):
            if story:  # the story's latents and a prompt per (patch) frame [B, F', L, D]
                latents = self._story_latents(batch)
                ctx = self._pin(ro.frame_contexts(batch["contexts"], batch["switch_frames"], latents.shape[1],
                                                  mcfg.patch_size[0]))
            else:
                latents, ctx = batch["latents"], batch["prompt_embeds"]  # ctx [B, L, D]
            metrics = {}
            if p_drop > 0:  # own key: the flow-matching draws stay those of a run without dropout
                uncond = batch["uncond"][:, None] if story else batch["uncond"]  # a story: every frame's prompt
                ctx, dropped = losses.text_dropout(ctx, uncond, p_drop, jax.random.fold_in(rng, 0x7E47))
                metrics["text_dropped_frac"] = jnp.mean(dropped.astype(jnp.float32))

            def loss_fn(trainable):
                params = lora_lib.merge_lora_params(sg(gen_base), trainable, self.lora_scale) \
                    if gen_base is not None else trainable
                loss, _ = losses.flow_matching_loss(
                    latents, pred_fn=self._score(params, mcfg), schedule=self.score_schedule,
                    ctx=ctx, rng=rng, use_training_weight=r.teacher_training_weight)
                return loss

            loss, grads = jax.value_and_grad(loss_fn)(gen.params)
            return self._apply(gen, ema, grads, loop_step, dict(metrics, teacher_loss=loss))

        batch_sh = dict.fromkeys(("video", "contexts", "switch_frames") if story else ("latents", "prompt_embeds"),
                                 self.bsh)
        if p_drop > 0:
            batch_sh["uncond"] = self.bsh
        return self._simple_jit(step, batch_sh)

    def _vae_step_fn(self) -> Callable:
        from memflow_jax.nn import vae as vae_lib

        t = self.train_cfg
        vcfg, remat = self.vae_cfg, t.gradient_checkpointing
        fixed_encoder = vcfg.codec == "pca"  # (vae.pca_decoder) the fitted PCA encodes; only the decoder trains
        # frozen params: no gradient, and restored after the update (weight decay would move them otherwise)
        frozen = vae_lib.frozen_keys(vcfg, t.vae_freeze_encoder)

        def step(gen: TrainState, ema, gen_base, batch, rng, loop_step):
            video = self._pin(batch["video"])  # [B, T, H, W, 3] uint8
            x = vae_lib.video_to_input(video)  # [B, 3, T, H, W]
            target = jnp.transpose(x, (0, 2, 1, 3, 4))  # [B, T, 3, H, W]

            def loss_fn(params):
                params = dict(params, **{k: sg(params[k]) for k in frozen})
                if fixed_encoder:
                    mu = logvar = None
                    z = vae_lib.encode(params, vcfg, x, normalize=False)  # [B, T', z, h, w]
                else:
                    mu, logvar = vae_lib.encode_moments(params, vcfg, x, remat=remat)  # [B, T', z, h, w] each
                    z, logvar = losses.gaussian_sample(mu, logvar, rng)
                if t.vae_latent_noise > 0:
                    z = losses.latent_noise(z, t.vae_latent_noise, jax.random.fold_in(rng, 0x1A7E))
                recon = vae_lib.decode_clip(params, vcfg, z, normalized=False, remat=remat)  # [B, T, 3, H, W]
                return losses.vae_loss(target, self._pin(recon), mu, logvar, t.vae_kl_weight,
                                       t.vae_chroma_weight)

            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(gen.params)
            new, ema, metrics = self._apply(gen, ema, grads, loop_step, dict(aux, vae_loss=loss),
                                            grad_metric="vae_grad_norm")
            if frozen:
                new = TrainState(dict(new.params, **{k: gen.params[k] for k in frozen}), new.opt_state)
                ema = dict(ema, **{k: gen.params[k] for k in frozen}) if ema is not None else None
            return new, ema, metrics

        return self._simple_jit(step, {"video": self.bsh})

    def _ode_step_fn(self) -> Callable:
        mcfg = self.gen_cfg
        ts_np = self._timesteps()
        c = self.chunk

        def step(gen: TrainState, ema, gen_base, batch, rng, loop_step):
            ode = batch["ode_latent"]  # [B, S+1, F, C, h, w]
            b, s1, f = ode.shape[:3]
            if s1 - 1 != len(ts_np):
                raise ValueError(f"ode_latent holds {s1 - 1} noisy states, the generator has {len(ts_np)} denoising "
                                 "steps (sampler.denoising_step_list); regenerate the ODE pairs")
            target = ode[:, -1]
            idx = jax.random.randint(rng, (b, f // c), 0, s1 - 1)
            idx = jnp.repeat(idx, c, axis=1)  # one draw per chunk (reference _get_timestep, uniform per block)
            xt = jnp.take_along_axis(ode, idx[:, None, :, None, None, None], axis=1)[:, 0]
            tt = jnp.asarray(ts_np)[idx]  # [B, F]

            def loss_fn(trainable):
                params = lora_lib.merge_lora_params(sg(gen_base), trainable, self.lora_scale) \
                    if gen_base is not None else trainable
                flow = block_causal_forward(params, mcfg, xt, tt, batch["prompt_embeds"], c)
                x0 = sch.flow_to_x0(self.gen_schedule, flow, xt, tt)
                return losses.ode_regression_loss(x0, target)

            loss, grads = jax.value_and_grad(loss_fn)(gen.params)
            return self._apply(gen, ema, grads, loop_step, {"ode_loss": loss})

        return self._simple_jit(step, {"ode_latent": self.bsh, "prompt_embeds": self.bsh})

    def _story_latents(self, batch: dict) -> jnp.ndarray:
        """The stories' latents [B, F, C, h, w] float32, encoded by the frozen ``run.vae_ckpt`` inside the step."""
        from memflow_jax.nn import vae as vae_lib

        vae_params, vcfg = self.story_vae
        latents = vae_lib.encode(vae_params, vcfg, vae_lib.video_to_input(batch["video"]))
        return self._pin(sg(latents).astype(jnp.float32))

    def _story_loss(self, params: Params, rc: ro.RolloutConfig, latents: jnp.ndarray, batch: dict,
                    rng: jax.Array, states: jnp.ndarray | None = None) -> tuple[jnp.ndarray, dict]:
        """Teacher forcing on the stories (:func:`rollout.teacher_forced_story`; ``states``: a teacher's
        trajectory states as the noisy inputs): mean((x0 - x0_gt)^2), aux. With a ``return_mask`` in the batch
        (``train.story_return_weight``) the frame-weighted mean, and aux ``return_loss``: the mean over the
        masked frames alone (0 where a batch has none)."""
        pred, aux = ro.teacher_forced_story(params, rc, latents, batch["contexts"], batch["switch_frames"], rng,
                                            exit_choices=tuple(self.train_cfg.story_exit_steps), states=states,
                                            constrain=self._pin)
        if "return_mask" not in batch:
            return losses.ode_regression_loss(pred, latents), aux
        mask = batch["return_mask"].astype(jnp.float32)  # [B, F]
        per_frame = losses.frame_mse(pred, latents)  # [B, F]
        aux = dict(aux, return_loss=jnp.sum(mask * per_frame) / jnp.maximum(jnp.sum(mask), 1.0))
        return losses.weighted_frame_mean(per_frame, self._return_frame_weight(batch)), aux

    def _return_frame_weight(self, batch: Mapping[str, Any]) -> jnp.ndarray | None:
        """``1 + train.story_return_weight * return_mask`` [B, F] (the returns that only a memory can show weigh
        more), or None when the batch has no return mask."""
        if batch is None or "return_mask" not in batch:
            return None
        return 1.0 + self.train_cfg.story_return_weight * batch["return_mask"].astype(jnp.float32)

    def _story_input(self) -> str:
        """The batch field the story / ode_story step reads its clean story from (videos / trajectories)."""
        return "ode_latent" if self.recipe == "ode_story" else "video"

    def _story_step_fn(self) -> Callable:
        ode = self.recipe == "ode_story"

        def step(gen: TrainState, ema, gen_base, batch, rng, loop_step):
            if ode:  # a story teacher's trajectory [B, S + 1, F, C, h, w]: states at the steps, then its end
                traj = batch["ode_latent"]
                latents, states = self._pin(traj[:, -1].astype(jnp.float32)), self._pin(traj[:, :-1])
            else:
                latents, states = self._story_latents(batch), None

            def loss_fn(trainable):
                params = lora_lib.merge_lora_params(sg(gen_base), trainable, self.lora_scale) \
                    if gen_base is not None else trainable
                return self._story_loss(params, self.rc, latents, batch, rng, states=states)

            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(gen.params)
            steps = aux["exit_steps"].astype(jnp.float32)
            metrics = {"story_loss": loss, "exit_step": jnp.mean(steps)}
            if "return_loss" in aux:
                metrics["story_return_loss"] = aux["return_loss"]
            return self._apply(gen, ema, grads, loop_step, metrics)

        return self._simple_jit(step, {self._story_input(): self.bsh, "contexts": self.bsh, "switch_frames": self.bsh,
                                       **{k: self.bsh for k in self._return_fields()}})

    def _return_fields(self) -> tuple[str, ...]:
        """The batch field of the return-weighted story loss (:meth:`_return_min_absent` not None), else none."""
        return ("return_mask",) if self._return_min_absent() is not None else ()

    def _apply(self, gen: TrainState, ema, grads, loop_step, metrics: dict,
               grad_metric: str = "generator_grad_norm"):
        t = self.train_cfg
        updates, opt_state = self.gen_opt.update(grads, gen.opt_state, gen.params)
        params = optax.apply_updates(gen.params, updates)
        if ema is not None:
            ema = optim.ema_update(ema, params, loop_step + 1, t.ema_weight, t.ema_start_step)
        metrics = dict(metrics, **{grad_metric: _global_norm(grads)})
        return TrainState(params, opt_state), ema, metrics

    def _simple_jit(self, step: Callable, batch_sh: dict) -> Callable:
        ema_sh = self.gen_sh.params if self.ema is not None else None
        in_sh = (self.gen_sh, ema_sh, self._sh(self.gen_base), batch_sh, self.rep, self.rep)
        out_sh = (self.gen_sh, ema_sh, self.rep)
        return jax.jit(step, in_shardings=in_sh, out_shardings=out_sh, donate_argnums=(0, 1))

    def _pin(self, x: jnp.ndarray, batch_axis: int = 0) -> jnp.ndarray:
        """Constrain an activation to the batch sharding (batch dim ``batch_axis``) inside a jitted step."""
        spec = [None] * x.ndim
        spec[batch_axis] = self.bsh.spec[0]
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, P(*spec)))

    def _score(self, params: Params, mcfg: ModelConfig) -> losses.ScoreFn:
        f = score_fn(params, mcfg)
        return lambda xt, t, ctx: self._pin(f(self._pin(xt), t, ctx))

    def _sh(self, tree: Any) -> Any:
        return None if tree is None else jax.tree_util.tree_map(lambda x: x.sharding, tree)

    def _carry_sh(self) -> Any:
        return stream_shardings(ro.abstract_stream(self.rc, self.train_cfg.streaming_chunk_size), self.mesh)

    # ------------------------------------------------------------------ streaming bookkeeping
    def _start_sequence(self, hrng: np.random.Generator) -> None:
        t = self.train_cfg
        batch = self._next_batch(("prompt_embeds", "switch_prompt_embeds"))
        lengths = t.streaming_possible_max_length or (t.streaming_max_length,)
        max_len = int(lengths[int(hrng.integers(len(lengths)))]) if len(lengths) > 1 else int(lengths[0])
        sw = ro.choose_switch_frame(t, max_len, self.chunk, hrng)
        window = t.streaming_chunk_size
        make = self._jit("start", lambda: jax.jit(
            lambda c1, c2, s: ro.start_stream(self.rc, window, c1, c2, s), out_shardings=self._carry_sh()))
        self.carry = make(batch["prompt_embeds"], batch["switch_prompt_embeds"], np.int32(sw))
        self.stream_host = ro.StreamHost(active=True, length=0, max_length=max_len, switch_frame=sw)

    def _stream_variant(self, hrng: np.random.Generator) -> tuple:
        t = self.train_cfg
        if not self.stream_host.can_generate_more(t.streaming_min_new_frame):
            self._start_sequence(hrng)
        h = self.stream_host
        choices = ro.new_frame_choices(h, t.streaming_chunk_size, t.streaming_min_new_frame, self.chunk)
        n_new = choices[int(hrng.integers(len(choices)))] if len(choices) > 1 else choices[0]
        n_re = 0 if h.switch_frame == ro.NO_SWITCH else min(self.rc.spec.window, h.switch_frame)
        dyn = {"n_new": np.int32(n_new), "has_prev": np.bool_(h.length > 0)}  # host values: multi-host safe
        return (n_re,), dyn, n_new

    def _stream_window(self, hrng: np.random.Generator, rng: jax.Array, train_gen: bool, loop: jax.Array):
        """One generator or critic streaming step (reference fwdbwd_one_step_streaming)."""
        if not self.train_cfg.train_first_chunk:
            variant, dyn, n_new = self._stream_variant(hrng)
            if self.stream_host.length == 0:  # roll the first window without training on it
                fn = self._jit(("advance",) + variant, lambda: self._critic_step_fn(variant, train_critic=False))
                self.critic, self.carry, _ = fn(self.critic, self.critic_base, self.gen.params, self.gen_base,
                                                self.carry, dyn, jax.random.fold_in(rng, 7))
                self.stream_host.length += n_new
        variant, dyn, n_new = self._stream_variant(hrng)
        if train_gen:
            fn = self._jit(("gen",) + variant, lambda: self._gen_step_fn(variant))
            self.gen, self.ema, self.carry, m = fn(self.gen, self.ema, self.gen_base, self.critic.params,
                                                   self.critic_base, self.teacher, self.carry, dyn, self.uncond, rng,
                                                   loop, self._story_batch(int(loop)))
        else:
            fn = self._jit(("critic",) + variant, lambda: self._critic_step_fn(variant))
            self.critic, self.carry, m = fn(self.critic, self.critic_base, self.gen.params, self.gen_base,
                                            self.carry, dyn, rng)
        self.stream_host.length += n_new
        return m

    # ------------------------------------------------------------------ one step
    def train_step(self) -> dict[str, Any]:
        """Run loop step ``self.step`` (generator and/or critic, or the teacher / ODE update)."""
        t = self.train_cfg
        step = self.step
        rng = jax.random.fold_in(self.base_key, step)
        loop = np.int32(step)
        metrics: dict[str, Any] = {}
        if self.recipe in ("teacher", "teacher_story"):
            fn = self._jit("teacher", self._teacher_step_fn)
            batch = self._next_batch(("video", "contexts", "switch_frames") if self.recipe == "teacher_story"
                                     else ("latents", "prompt_embeds"), None if self.recipe == "teacher_story"
                                     else np.float32)
            if t.text_dropout > 0:
                batch["uncond"] = self.uncond
            self.gen, self.ema, metrics = fn(self.gen, self.ema, self.gen_base, batch, rng, loop)
        elif self.recipe == "vae":
            fn = self._jit("vae", self._vae_step_fn)
            self.gen, self.ema, metrics = fn(self.gen, self.ema, self.gen_base, self._next_batch(("video",), None),
                                             rng, loop)
        elif self.recipe in ("story", "ode_story"):
            fn = self._jit("story", self._story_step_fn)
            batch = self._next_batch((self._story_input(), "contexts", "switch_frames") + self._return_fields(), None)
            self.gen, self.ema, metrics = fn(self.gen, self.ema, self.gen_base, batch, rng, loop)
        elif self.recipe == "ode_init":
            fn = self._jit("ode", self._ode_step_fn)
            self.gen, self.ema, metrics = fn(self.gen, self.ema, self.gen_base,
                                             self._next_batch(("ode_latent", "prompt_embeds")), rng, loop)
        else:
            train_gen = step % t.dfake_gen_update_ratio == 0
            k_gen, k_critic = jax.random.split(rng)
            if self.recipe == "dmd_long":
                hrng = np.random.default_rng([t.seed, 7919, step])
                if train_gen:
                    metrics.update(self._stream_window(hrng, k_gen, True, loop))
                metrics.update(self._stream_window(hrng, k_critic, False, loop))
            elif self.recipe == "dmd_story":  # whole stories: one variant, the dataset's length
                variant = (self.story_frames,)
                batch = self._next_batch(("contexts", "switch_frames") + self._return_fields(), None)
            else:
                hrng = np.random.default_rng([t.seed, 7919, step])
                lo, hi = t.min_num_training_frames // self.chunk, t.num_training_frames // self.chunk
                nb = int(hrng.integers(lo, hi + 1))
                variant = (nb * self.chunk,)
                batch = self._next_batch(("prompt_embeds",))
            if self.recipe != "dmd_long":
                if train_gen:
                    fn = self._jit(("gen",) + variant, lambda: self._gen_step_fn(variant))
                    self.gen, self.ema, _, m = fn(self.gen, self.ema, self.gen_base, self.critic.params,
                                                  self.critic_base, self.teacher, None, batch, self.uncond, k_gen,
                                                  loop, self._story_batch(step))
                    metrics.update(m)
                fn = self._jit(("critic",) + variant, lambda: self._critic_step_fn(variant))
                self.critic, _, m = fn(self.critic, self.critic_base, self.gen.params, self.gen_base, None, batch,
                                       k_critic)
                metrics.update(m)
        self.step += 1
        return metrics

    # ------------------------------------------------------------------ loop
    def _open_logs(self) -> None:
        if not self.is_main:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        with open(os.path.join(self.run_dir, "config.json"), "w") as f:
            f.write(self.cfg.to_json())
        self._metrics_file = open(os.path.join(self.run_dir, "metrics.jsonl"), "a")
        if self.run_cfg.tensorboard:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(os.path.join(self.run_dir, "tb"))

    def _log_metrics(self, step: int, metrics: dict[str, Any], dt: float) -> dict[str, Any]:
        host = {k: _to_py(v) for k, v in metrics.items()}
        host["step_time_s"] = dt
        if self.is_main:
            rec = {"step": step, **host}
            self._metrics_file.write(json.dumps(rec) + "\n")
            if self._writer is not None:
                for k, v in host.items():
                    if isinstance(v, (int, float)):
                        self._writer.add_scalar(k, v, step)
        return host

    def _flush_metrics(self, pending: list[tuple[int, Any]], t_start: float, history: list, bar: Any) -> float:
        """Fetch the metrics of the steps run since the last flush (one host sync for all of them), log them
        per step, stop on a non-finite value; returns the new interval start time."""
        if not pending:
            return t_start
        now = time.perf_counter()
        dt = (now - t_start) / len(pending)
        fetched = jax.device_get([m for _, m in pending])
        host = {}
        for (step, _), metrics in zip(pending, fetched):
            host = self._log_metrics(step, metrics, dt)
            history.append({"step": step, **host})
            bad = [k for k, v in host.items() if isinstance(v, float) and not math.isfinite(v)]
            if bad:
                raise FloatingPointError(f"step {step}: non-finite {bad}: {host}")
        pending.clear()
        if self.is_main:
            self._metrics_file.flush()
        if bar is not None:
            bar.set_postfix({k: f"{v:.4g}" for k, v in host.items() if k.endswith("loss")})
        return now

    def _past(self, deadline: float | None) -> bool:
        """Whether the wall-clock deadline has passed. With several processes, process 0 decides for all (so all
        stop at the same step), and only on ``train.log_interval`` boundaries: no collective every step."""
        if deadline is None:
            return False
        if jax.process_count() == 1:
            return time.time() >= deadline
        if self.step % self.train_cfg.log_interval:
            return False
        from jax.experimental import multihost_utils

        return bool(multihost_utils.broadcast_one_to_all(np.asarray(time.time() >= deadline)))

    def train(self, max_iters: int | None = None, deadline: float | None = None) -> list[dict[str, Any]]:
        """Run until ``train.max_iters`` (or ``max_iters``) loop steps are done, or until the wall-clock
        ``deadline`` (``time.time()`` seconds) passes; returns the per-step metrics.

        Metrics stay on the device between ``train.log_interval`` boundaries and checkpoint saves, so steps are
        dispatched back to back without a host sync each; they are still logged per step."""
        t = self.train_cfg
        end = t.max_iters if max_iters is None else max_iters
        self._open_logs()
        history: list[dict[str, Any]] = []
        pending: list[tuple[int, Any]] = []
        bar = None
        if self.is_main and self.run_cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=end, initial=min(self.step, end), desc=self.recipe, dynamic_ncols=True)
        try:
            t_start = time.perf_counter()
            while self.step < end and not self._past(deadline):
                metrics = self.train_step()
                if self.recipe == "dmd_long":
                    metrics["stream_length"] = self.stream_host.length  # host state after this step
                pending.append((self.step, metrics))  # logged as steps done, 1-based
                if self.step % t.log_interval == 0 or self.step % t.save_interval == 0 or self.step >= end:
                    t_start = self._flush_metrics(pending, t_start, history, bar)
                self.save()
                if bar is not None:
                    bar.update(1)
            self._flush_metrics(pending, t_start, history, bar)
            if self.ckpt.latest_step() != self.step:
                self.ckpt.wait_until_finished()
                if self.ckpt.latest_step() != self.step:
                    self.save(force=True)
            self.ckpt.wait_until_finished()
            if self.lora:
                self.export_lora(os.path.join(self.run_dir, "lora_final"))
        finally:
            if bar is not None:
                bar.close()
            self.close_logs()
        return history

    def export_lora(self, out_dir: str) -> str:
        adapters = {"generator_lora": self.gen.params}
        if self.critic is not None and self.critic_base is not None:
            adapters["critic_lora"] = self.critic.params
        return lora_lib.save_lora(out_dir, adapters, rank=self.train_cfg.lora_rank, alpha=self.train_cfg.lora_alpha,
                                  extra_meta={"step": self.step})

    def close_logs(self) -> None:
        if self._metrics_file is not None:
            self._metrics_file.close()
            self._metrics_file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self) -> None:
        self.close_logs()
        self.ckpt.close()
        # stop grain's worker processes now: left to interpreter exit, a restored (set_state) multiprocess
        # iterator's finalizer meets its already-closed queues and prints "OSError: handle is closed"
        close_iter = getattr(getattr(self, "data_iter", None), "close", None)
        if close_iter is not None:
            close_iter()


def init_distributed() -> bool:
    """Multi-host init (``jax.distributed.initialize`` from the launcher's environment); call first."""
    return sh.maybe_initialize_distributed()


__all__ = ["EmbeddingSource", "RunConfig", "SyntheticEmbedder", "SyntheticLatentSource", "SyntheticOdeSource",
           "SyntheticPromptSource", "TrainState", "Trainer", "VideoClipSource", "block_causal_forward",
           "init_distributed", "load_dit_host", "load_vae_host", "make_reencode_fn", "score_fn", "stream_shardings",
           "with_numerics"]
