"""The ``train`` config section: optimisation, DMD, streaming long-tuning, LoRA, mesh, data and checkpoint knobs.

Defaults are the MemFlow long-tuning recipe (``configs/train_long.yaml`` merged over
``configs/default_config.yaml``); comments give the reference key where ours differs. The init recipe
(``train_init.yaml``) differs in: ``lr=2e-6, lr_critic=4e-7, max_iters=700, log_iters=100,
max_checkpoints=5, distribution_loss=dmd, no streaming, no LoRA, generator_ckpt=ode_init.pt``.
Architecture-shared knobs live in their own sections: ``sampler.chunk_frames`` (``num_frame_per_block``),
``sampler.denoising_step_list`` / ``warp_denoising_step`` / ``timestep_shift`` / ``context_noise``,
``memory.*`` (``model_kwargs`` local_attn_size / sink_size / bank_size / record_interval / SMA, ``global_sink``).
"""
from __future__ import annotations

import dataclasses

from memflow_jax import config as cfg_lib
from memflow_jax.config import ConfigError

# reference default_config / train_*.yaml ``negative_prompt`` (the unconditional prompt of DMD's real score)
NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，"
    "整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指"
    "，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融"
    "合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

RECIPES = ("teacher", "teacher_story", "ode_init", "ode_story", "dmd", "dmd_long", "dmd_story", "story", "vae")
DIT_RECIPES = tuple(r for r in RECIPES if r != "vae")  # the recipes that train a DiT (exportable by --export)
SWITCH_MODES = ("random_choice", "fixed", "random")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Training recipe (``teacher`` fine-tune | ``ode_init`` regression | ``dmd`` | ``dmd_long`` streaming |
    ``teacher_story`` / ``dmd_story``: the teacher / DMD on whole storyworld stories | ``story``: teacher forcing
    on ground-truth stories with memory | ``ode_story``: the same on a story teacher's ODE trajectories | ``vae``:
    the Wan VAE's encoder + decoder on storyworld videos)."""

    recipe: str = "dmd_long"  # reference distribution_loss: dmd (-> dmd) | dmd_switch + streaming (-> dmd_long)
    # --- optimisers (torch AdamW, decoupled weight decay) ---
    lr: float = 1e-5  # generator
    lr_critic: float = 2e-6  # fake score
    beta1: float = 0.0
    beta2: float = 0.999
    beta1_critic: float = 0.0
    beta2_critic: float = 0.999
    weight_decay: float = 0.01
    max_grad_norm_generator: float = 10.0  # reference getattr default (clip_grad_norm_)
    max_grad_norm_critic: float = 10.0
    gradient_accumulation_steps: int = 1
    # --- DMD ---
    dfake_gen_update_ratio: int = 5  # generator steps only when step % ratio == 0; critic every step
    ema_weight: float = 0.99  # 0 disables EMA
    ema_start_step: int = 200
    guidance_scale: float = 3.0  # real_guidance_scale of the teacher
    # guide the real score only where the DMD noise level sigma <= this (scheduler.guidance_at; not in the
    # reference); 1.0 = every level (sigmas are <= 1). Lower keeps the teacher's looks diverse (storyworld round 20)
    guidance_sigma_max: float = 1.0
    fake_guidance_scale: float = 0.0
    denoising_loss_type: str = "flow"
    num_train_timestep: int = 1000
    min_step_frac: float = 0.02  # reference min_step = int(0.02 * num_train_timestep)
    max_step_frac: float = 0.98  # reference max_step = int(0.98 * num_train_timestep)
    ts_schedule: bool = False
    ts_schedule_max: bool = False
    min_score_timestep: int = 0
    same_step_across_blocks: bool = True
    last_step_only: bool = False
    independent_first_frame: bool = False
    num_training_frames: int = 21  # latent frames per (non-streaming) rollout
    min_num_training_frames: int = 21
    slice_last_frames: int = 21
    real_name: str = "Wan2.1-T2V-14B"  # teacher (real score)
    fake_name: str = "Wan2.1-T2V-1.3B"  # critic (fake score)
    negative_prompt: str = NEGATIVE_PROMPT
    # --- numerics ---
    mixed_precision: bool = True  # bf16 compute, f32 master params / grads (reference FSDP MixedPrecision)
    gradient_checkpointing: bool = True  # -> model.remat (per-block jax.checkpoint)
    # --- streaming long tuning (dmd_long) ---
    streaming_training: bool = True
    streaming_chunk_size: int = 21  # frames per trained window
    streaming_max_length: int = 240  # frames per long rollout
    streaming_min_new_frame: int = 18
    streaming_possible_max_length: tuple[int, ...] = ()  # reference None: always streaming_max_length
    train_first_chunk: bool = True
    switch_mode: str = "random_choice"
    switch_choices: tuple[int, ...] = (21, 39, 57, 75, 93, 111, 129, 147, 165, 183, 201)
    fixed_switch_index: int = 21  # switch_mode=fixed
    min_switch_frame_index: int = 21  # switch_mode=random: range(min, max, chunk_frames)
    max_switch_frame_index: int = 201
    # --- LoRA (reference ``adapter:``) ---
    lora_enabled: bool = True
    lora_rank: int = 256
    lora_alpha: float = 256.0
    lora_dropout: float = 0.0
    lora_dtype: str = "bfloat16"
    lora_apply_to_critic: bool = True
    # --- mesh / batch ---
    mesh_data: int = 1  # replicas (reference hybrid_full: one per node)
    mesh_fsdp: int = -1  # params sharded over this many devices; -1: all remaining devices
    mesh_tensor: int = 1
    batch_size: int = 1  # per device (reference: per rank); global = batch_size x data x fsdp
    # --- loop / logging / checkpoints ---
    max_iters: int = 3000
    log_interval: int = 50  # reference log_iters (also its save interval)
    save_interval: int = 50  # reference: log_iters
    max_to_keep: int = 3  # reference max_checkpoints
    vis_interval: int = 500
    vis_video_lengths: tuple[int, ...] = (240,)
    ckpt_dir: str = ""  # reference --logdir
    async_checkpointing: bool = True
    seed: int = 0  # reference: seed 0 draws a random seed per run; here 0 is an ordinary (reproducible) seed
    # --- data / init ---
    data_path: str = "prompts/vidprom_filtered_extended.txt"
    switch_prompt_path: str = "prompts/vidprom_filtered_extended_switch.txt"
    val_data_path: str = "prompts/vidprom_filtered_extended.txt"
    val_switch_prompt_path: str = "prompts/vidprom_filtered_extended_switch.txt"
    text_cache_dir: str = ""  # cached UMT5 embeddings (empty: encode on the fly)
    latent_data_path: str = ""  # teacher / ode_init: latent files, manifest or ArrayRecord
    generator_ckpt: str = "checkpoints/base.pt"
    lora_ckpt: str = ""
    data_seed: int = 0
    data_workers: int = 0
    # --- teacher: classifier-free guidance ---
    text_dropout: float = 0.0  # per sample: prompt embedding -> negative_prompt's embedding with this probability
    # --- story recipe (teacher forcing on a storyworld ``stories`` dataset, encoded by run.vae_ckpt) ---
    story_exit_steps: tuple[int, ...] = ()  # steps the story loss draws from (empty: every step)
    # return-weighted story loss (story / ode_story, the story term beside DMD, and dmd_story's DMD loss): each
    # latent frame of the first chunk of a segment where an object comes back after >= story_return_min_absent
    # latent frames off screen weighs 1 + story_return_weight in the loss (frame-weighted mean; needs stories
    # exported with latent_returns and, for ode_story, ODE pairs made from them); 0 = every frame weighs 1. Either
    # > 0 also logs story_return_loss, the loss on those frames alone (not for dmd_story: its loss value is not a
    # distance)
    story_return_weight: float = 0.0
    story_return_min_absent: int = 0
    # --- the story loss beside DMD (recipes dmd / dmd_long): generator loss = DMD + story_weight * the story
    # recipe's loss on one global batch (train.batch_size per data device) of story_data_path's stories (a
    # ``stories`` dataset), drawn by index from (data_seed, step) so that a resumed run draws the same ones; 0 = off
    story_weight: float = 0.0
    story_data_path: str = ""
    # --- vae recipe (memflow_jax.nn.vae on storyworld videos; LoRA off) ---
    video_data_path: str = ""  # vae / story: a storyworld dataset folder (python -m memflow_jax.storyworld.export)
    vae_clip_frames: int = 17  # video frames per training window: 1 + k * (the VAE's time stride)
    vae_kl_weight: float = 1e-6  # loss = L1 + MSE (pixel means) + vae_kl_weight * KL (nats per latent element)
    vae_freeze_encoder: bool = False  # train the decoder only (keeps latents a trained DiT already models valid)
    vae_chroma_weight: float = 0.0  # reconstruction weight 1 + this * chroma(target) per pixel (losses.vae_loss)
    # decoder input noise: latents + U(0, this) * std(latents) * N(0, 1) per sample (losses.latent_noise), so the
    # decoder learns to map imperfect latents (a DiT's) onto clean frames; 0 = off
    vae_latent_noise: float = 0.0

    @property
    def min_step(self) -> int:
        return int(self.min_step_frac * self.num_train_timestep)

    @property
    def max_step(self) -> int:
        return int(self.max_step_frac * self.num_train_timestep)

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank

    def global_batch_size(self, num_data_devices: int) -> int:
        return self.batch_size * num_data_devices

    def validate(self) -> None:
        cfg_lib._check_choice("train.recipe", self.recipe, RECIPES)
        cfg_lib._check_choice("train.denoising_loss_type", self.denoising_loss_type, ("flow",))
        cfg_lib._check_choice("train.switch_mode", self.switch_mode, SWITCH_MODES)
        cfg_lib._check_choice("train.lora_dtype", self.lora_dtype, ("bfloat16", "float16", "float32"))
        for name in ("lr", "lr_critic"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be > 0")
        for name in ("beta1", "beta2", "beta1_critic", "beta2_critic"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be in [0, 1)")
        if self.weight_decay < 0:
            raise ConfigError("train.weight_decay must be >= 0")
        if self.max_grad_norm_generator <= 0 or self.max_grad_norm_critic <= 0:
            raise ConfigError("train.max_grad_norm_generator / max_grad_norm_critic must be > 0")
        for name in ("gradient_accumulation_steps", "dfake_gen_update_ratio", "num_train_timestep", "batch_size",
                     "max_iters", "log_interval", "save_interval", "max_to_keep", "num_training_frames",
                     "min_num_training_frames", "mesh_data", "mesh_tensor"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}={getattr(self, name)} must be >= 1")
        if self.mesh_fsdp < 1 and self.mesh_fsdp != -1:
            raise ConfigError(f"train.mesh_fsdp={self.mesh_fsdp} must be >= 1 or -1 (all remaining devices)")
        if not 0.0 <= self.ema_weight < 1.0:
            raise ConfigError(f"train.ema_weight={self.ema_weight} must be in [0, 1) (0 disables EMA)")
        if self.ema_start_step < 0:
            raise ConfigError("train.ema_start_step must be >= 0")
        if not 0.0 <= self.min_step_frac < self.max_step_frac <= 1.0:
            raise ConfigError(f"train.min_step_frac={self.min_step_frac} / max_step_frac={self.max_step_frac} "
                              "need 0 <= min < max <= 1")
        if self.min_num_training_frames > self.num_training_frames:
            raise ConfigError("train.min_num_training_frames must be <= train.num_training_frames")
        if self.lora_enabled:
            if self.lora_rank < 1 or self.lora_alpha <= 0:
                raise ConfigError("train.lora_rank must be >= 1 and train.lora_alpha > 0")
            if not 0.0 <= self.lora_dropout < 1.0:
                raise ConfigError("train.lora_dropout must be in [0, 1)")
        if not 0.0 <= self.text_dropout < 1.0:
            raise ConfigError(f"train.text_dropout={self.text_dropout} must be in [0, 1)")
        if self.text_dropout > 0 and self.recipe not in ("teacher", "teacher_story"):
            raise ConfigError(f"train.text_dropout={self.text_dropout} applies to train.recipe=teacher / "
                              f"teacher_story only (it is {self.recipe!r}); set it to 0")
        if self.guidance_sigma_max < 0:
            raise ConfigError(f"train.guidance_sigma_max={self.guidance_sigma_max} must be >= 0 (1.0 guides every "
                              "noise level, 0 none)")
        if self.story_weight < 0:
            raise ConfigError(f"train.story_weight={self.story_weight} must be >= 0 (0 turns the story term off)")
        if self.story_weight > 0 and self.recipe not in ("dmd", "dmd_long"):
            raise ConfigError(f"train.story_weight adds the story loss to DMD's generator loss (recipes dmd / "
                              f"dmd_long), not to train.recipe={self.recipe}; for the story loss alone use "
                              f"train.recipe=story")
        if self.story_weight > 0 and not self.story_data_path:
            raise ConfigError("train.story_weight > 0 needs train.story_data_path: a stories dataset (`python -m "
                              "memflow_jax.storyworld.export --out DIR --kind stories ...`)")
        if self.story_return_weight < 0 or self.story_return_min_absent < 0:
            raise ConfigError(f"train.story_return_weight={self.story_return_weight} and train.story_return_min_absent="
                              f"{self.story_return_min_absent} must be >= 0")
        if (self.story_return_weight > 0 or self.story_return_min_absent > 0) \
                and self.recipe not in ("story", "ode_story", "dmd_story") and self.story_weight == 0:
            raise ConfigError(f"train.story_return_weight / story_return_min_absent weigh the story loss (recipes "
                              f"story / ode_story, or train.story_weight > 0 beside DMD) or dmd_story's DMD loss; "
                              f"train.recipe={self.recipe} has none: set them to 0")
        if self.recipe == "dmd_story" and self.streaming_training:
            raise ConfigError("train.recipe=dmd_story rolls out whole stories in one step: set "
                              "train.streaming_training=false")
        if self.vae_kl_weight < 0:
            raise ConfigError(f"train.vae_kl_weight={self.vae_kl_weight} must be >= 0")
        if self.vae_chroma_weight < 0:
            raise ConfigError(f"train.vae_chroma_weight={self.vae_chroma_weight} must be >= 0")
        if self.vae_latent_noise < 0:
            raise ConfigError(f"train.vae_latent_noise={self.vae_latent_noise} must be >= 0")
        if self.vae_clip_frames < 1:
            raise ConfigError(f"train.vae_clip_frames={self.vae_clip_frames} must be >= 1")
        if self.recipe == "vae" and self.lora_enabled:
            raise ConfigError("train.recipe=vae trains every VAE weight: set train.lora_enabled=false")
        if self.recipe == "dmd_long" and self.streaming_training:
            if self.streaming_chunk_size < 1 or self.streaming_max_length < self.streaming_chunk_size:
                raise ConfigError(f"train.streaming_max_length={self.streaming_max_length} must be >= "
                                  f"train.streaming_chunk_size={self.streaming_chunk_size} >= 1")
            if not 0 < self.streaming_min_new_frame <= self.streaming_chunk_size:
                raise ConfigError("train.streaming_min_new_frame must be in [1, streaming_chunk_size]")
            lengths = self.streaming_possible_max_length or (self.streaming_max_length,)
            if any(n < self.streaming_chunk_size for n in lengths):
                raise ConfigError("train.streaming_possible_max_length entries must be >= streaming_chunk_size")
            self._validate_switch(min(lengths))

    def _validate_switch(self, shortest: int) -> None:
        # the reference drops choices >= the rollout length and errors when none is left
        if self.switch_mode == "random_choice":
            if not self.switch_choices:
                raise ConfigError("train.switch_choices is empty (switch_mode=random_choice)")
            if any(c < 1 for c in self.switch_choices):
                raise ConfigError(f"train.switch_choices={list(self.switch_choices)} must be >= 1")
            if not any(c < shortest for c in self.switch_choices):
                raise ConfigError(f"train.switch_choices={list(self.switch_choices)}: none is < the rollout "
                                  f"length {shortest}")
        elif self.switch_mode == "fixed":
            if not 0 < self.fixed_switch_index < shortest:
                raise ConfigError(f"train.fixed_switch_index={self.fixed_switch_index} must be in [1, {shortest})")
        elif not 0 < self.min_switch_frame_index <= self.max_switch_frame_index:
            raise ConfigError("train.min_switch_frame_index must be in [1, max_switch_frame_index]")

    def check_against(self, sampler: cfg_lib.SamplerConfig) -> None:
        """Cross-section checks: frame counts are whole chunks (``num_frame_per_block``)."""
        block = sampler.chunk_frames
        names = ["num_training_frames", "min_num_training_frames"]
        if self.recipe == "dmd_long" and self.streaming_training:
            names += ["streaming_chunk_size", "streaming_max_length"]
        for name in names:
            if getattr(self, name) % block:
                raise ConfigError(f"train.{name}={getattr(self, name)} is not a multiple of "
                                  f"sampler.chunk_frames={block}")


cfg_lib.register_section("train", TrainConfig)
