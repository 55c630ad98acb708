#!/usr/bin/env bash
# Train the storyworld demo model end to end with our own recipes (issue #7). Every stage is one command below;
# storyworld/TRAINING.md records the exact runs (GPU, wall time, steps, metrics) that made the shipped weights.
#
#   bash memflow_jax/storyworld/train_demo.sh STAGE [STAGE ...]       (run from the repository root)
#
# Stages, in order (each reads what the previous ones wrote; datasets are deterministic, so a stage that needs
# them on a fresh machine just re-runs `data`):
#   data      storyworld datasets: single-prompt clips (VAE / teacher / ODE prompts) and narrative scripts
#   text      sentencepiece tokenizer on the world's captions + the small UMT5 encoder  -> $ART/text
#   vae       Wan-architecture VAE on whole clips (recipe vae)                           -> $RUNS/vae
#   vaedec    its decoder fine-tuned on 141-frame script windows (encoder frozen)        -> $RUNS/vae_decoder
#   pca       (ARCH=pca, instead of vae / vaedec) the PCA pixel codec, closed form         -> $RUNS/pca
#   pcadec    (ARCH=pcadec, after pca) a Wan decoder for the PCA latents (recipe vae)       -> $RUNS/pca_decoder
#   pcadeclong (ARCH=pcadec) that decoder fine-tuned on 141-frame script windows          -> $RUNS/pca_decoder_long
#   latents   encode the clips with the VAE, measure latent statistics                  -> $DATA/latents (+ vae/)
#   stories   (before textcache) 36-latent-frame stories on the chunk grid                -> $DATA/stories
#   textcache UMT5 embeddings of every prompt (and of the empty negative prompt)         -> $DATA/text_cache
#             (with WINDOWS=1 after latents: the script segments' prompts come from its prompts.txt; with
#             the stories stage run: every story segment's prompt too)
#   (the clip chain, teacher to dmdlong, made the shipped DiT until round 17; TRAINING.md rounds 1-12)
#   teacher   bidirectional teacher (recipe teacher)                                     -> $ART/teacher
#   teachercheck (optional gate) the teacher on 16 held-out clips + 16 continuation prompts -> $RUNS/teacher_check.json
#   odepairs  teacher ODE trajectories (48 Euler steps, guidance)                        -> $DATA/ode_pairs
#   odeinit   causal 4-step generator regressed on the trajectories (recipe ode_init)    -> $ART/ode_init
#   dmd       DMD with memory (recipe dmd)                                               -> $ART/dmd
#   dmdlong   streaming long tuning with prompt switches (recipe dmd_long)               -> $ART/dmd_long
#   story     (optional, after stories) teacher forcing on ground-truth stories with memory (recipe story),
#             from $STORY_INIT (default $ART/dmd_long)                                    -> $ART/story
#   teacherstory (after stories + textcache) a teacher on whole stories, a prompt per latent frame
#             (recipe teacher_story), from $TEACHER_STORY_INIT (default scratch)          -> $ART/teacher_story
#   storycheck (optional) that teacher on 8 held-out stories whole, re-appearance scored  -> $RUNS/teacher_story_check.json
#   storyodepairs (after teacherstory) that teacher's ODE trajectories on the stories (48 Euler
#             steps, guidance 3, a prompt per latent frame; $STORY_ODE_SAMPLES of them, default every story;
#             $STORY_GUIDANCE_SIGMA_MAX: guidance only at sigma <= it, so hidden attributes stay diverse)
#                                                                                         -> $DATA/story_ode_pairs
#   odestory  (after storyodepairs) the causal generator regressed on them through its memory (recipe
#             ode_story), from $STORY_ODE_INIT (default the story teacher) -> $ART/ode_story (round 17's DiT)
#   dmdstory  (after odestory + package) DMD on whole stories against that teacher (recipe dmd_story), the
#             generator from $STORY_DMD_INIT (default $PACKAGE)  -> $ART/dmd_story: the shipped DiT (round 18),
#             packaged by PACKAGE_DIT=$ART/dmd_story train_demo.sh package
#   package   assemble tokenizer + UMT5 + DiT ($PACKAGE_DIT, default $ART/ode_story) + VAE into the shipped
#             checkpoint, the DiT stored in $DIT_DTYPE (default bfloat16; --decoder-run $DECODER_RUN if set) -> $PACKAGE
# Environment: DATA (data/storyworld), RUNS (runs/storyworld), ART ($RUNS/art), PACKAGE
# (memflow_jax/assets/storyworld), VAE_SRC (the VAE the latents stage encodes with: $RUNS/vae_decoder),
# N_CLIPS, N_SCRIPTS, N_STORIES, WORKERS, MINUTES (wall-clock cap of each train.py run: it stops checkpointed and resumable),
# ODE_SAMPLES (ODE pairs; default every clip prompt), ODE_BATCH (prompts per ODE solve), EXTRA (overrides appended to every train.py call, e.g.
# EXTRA="train.max_iters=2 train.batch_size=2" for a smoke run), ARCH (architecture overrides appended to every
# stage that reads a config, from latents on; ARCH=pixel trains on the parameter-free pixel codec ($PIXEL below),
# with no vae / vaedec stage and VAE_SRC unused; ARCH=pca on its 32-component PCA ($PCA below: the pca stage
# replaces vae / vaedec and VAE_SRC defaults to its output) and STORE_DTYPE (float32 / float16: how latents and
# ODE pairs are stored; float16 by default with ARCH=pixel, whose 192-channel latents are 24x the VAE's) and
# LATENT_STATS (channel / global: the latents stage's normalisation, data.encode_latents --stats; global by default
# with ARCH=pca, channel otherwise); ARCH=pcadec is ARCH=pca decoded by a trained decoder (vae.pca_decoder: the
# pcadec then pcadeclong stages train it; VAE_SRC defaults to the latter's run, the PCA encodes as before); and WINDOWS=1 (the latents
# stage also encodes the first 33 frames of every script segment that long with its own prompt, so the teacher
# learns the continuation prompts that long tuning and sampling use; data.encode_latents --segment-windows; the
# odepairs and dmd stages then draw their prompts from the same mix). P_LATE_MEMORY (stories stage: the probability
# that a story's returning object first enters after its first segment, export --p-late-memory; default 0) and
# LATE_MEMORY=1 (storycheck on the held-out stories of storyworld_eval.py --late-memory --min-absent $MIN_ABSENT, default
# 9: configs/storyworld.yaml's memory.local_attn_size, so no memory mode's window shows the returning object).
# STORY_MIN_ABSENT (stories stage: every story's returning objects off screen >= this many latent frames, export
# --min-absent; default 0 = any return; the return-weighted loss, train.story_return_weight, trains on such returns).
set -euo pipefail

DATA=${DATA:-data/storyworld}
RUNS=${RUNS:-runs/storyworld}
ART=${ART:-$RUNS/art}
PACKAGE=${PACKAGE:-memflow_jax/assets/storyworld}
N_CLIPS=${N_CLIPS:-6000}
N_SCRIPTS=${N_SCRIPTS:-2000}
N_STORIES=${N_STORIES:-3000}
WORKERS=${WORKERS:-$(python -c 'import os; print(max(1, min(16, os.cpu_count() or 1)))')}
EXTRA=${EXTRA:-}
ARCH=${ARCH:-}
# the pixel codec (nn/pixel_codec.py): 4 frames x 4x4 px x RGB = 192 channels a latent cell, the same 16x16 grid
PIXEL="vae.codec=pixel vae.z_dim=192 vae.latent_mean=[0] vae.latent_std=[1] model.in_dim=192 model.out_dim=192"
PIXEL="$PIXEL teacher_model.in_dim=192 teacher_model.out_dim=192"
# its 32 leading principal components: 4 x 32 = 128 values a 1x2x2 token, the DiT's width (nn/pixel_codec.py)
PCA="vae.codec=pca vae.z_dim=32 vae.latent_mean=[0] vae.latent_std=[1] model.in_dim=32 model.out_dim=32"
PCA="$PCA teacher_model.in_dim=32 teacher_model.out_dim=32"
if [ "$ARCH" = pixel ]; then ARCH=$PIXEL; STORE_DTYPE=${STORE_DTYPE:-float16}; fi
if [ "$ARCH" = pca ]; then ARCH=$PCA; VAE_SRC=${VAE_SRC:-$RUNS/pca}; LATENT_STATS=${LATENT_STATS:-global}; fi
if [ "$ARCH" = pcadec ]; then
  ARCH="$PCA vae.pca_decoder=true"; VAE_SRC=${VAE_SRC:-$RUNS/pca_decoder_long}; LATENT_STATS=${LATENT_STATS:-global}
fi
STORE_DTYPE=${STORE_DTYPE:-float32}
LATENT_STATS=${LATENT_STATS:-channel}
LATENT_DATA="--data $DATA/clips"
CLIP_PROMPTS=$DATA/clips/prompts.txt  # the prompts of the odepairs and dmd stages
if [ -n "${WINDOWS:-}" ]; then
  LATENT_DATA="$LATENT_DATA --data $DATA/scripts --frames 33 --segment-windows"
  CLIP_PROMPTS=$DATA/latents/prompts.txt  # clips + script segments, shuffled
fi
PY=${PYTHON:-python}
# every path the configs name, redirected when DATA / RUNS / ART differ from the defaults
PATHS="train.text_cache_dir=$DATA/text_cache"

stage() {
  local name=$1
  echo "=== storyworld stage: $name ($(date -u +%H:%M:%S))"
  local t0=$SECONDS
  case $name in
    data)
      # clips: 33 video frames = 9 latent frames (1 + 4 * 8); scripts: chunk-aligned segments (12 video frames)
      $PY -m memflow_jax.storyworld.export --out "$DATA/clips" --kind clips --num "$N_CLIPS" --seed 0 \
        --clip-frames 33 --workers "$WORKERS"
      $PY -m memflow_jax.storyworld.export --out "$DATA/scripts" --kind scripts --num "$N_SCRIPTS" --seed 1 \
        --segment-frames 24 48 --frame-multiple 12 --workers "$WORKERS" ;;
    text)
      $PY -m memflow_jax.storyworld.text_model --config configs/storyworld.yaml --out "$ART/text" ;;
    vae)
      $PY train.py ${MINUTES:+--max-minutes $MINUTES} --config configs/storyworld_vae.yaml --run-dir "$RUNS/vae" \
        train.video_data_path="$DATA/clips" $EXTRA ;;
    vaedec)
      $PY train.py ${MINUTES:+--max-minutes $MINUTES} --config configs/storyworld_vae_decoder.yaml \
        --run-dir "$RUNS/vae_decoder" train.video_data_path="$DATA/scripts" run.vae_ckpt="$RUNS/vae" $EXTRA ;;
    pca)
      $PY -m memflow_jax.storyworld.pca_codec --config configs/storyworld.yaml --data "$DATA/clips" "$DATA/scripts" \
        --out "$RUNS/pca" $ARCH ;;
    pcadec)
      $PY train.py ${MINUTES:+--max-minutes $MINUTES} --config configs/storyworld_pca_decoder.yaml \
        --run-dir "$RUNS/pca_decoder" train.video_data_path="$DATA/clips" run.vae_ckpt="$RUNS/pca" $ARCH $EXTRA ;;
    pcadeclong)
      $PY train.py ${MINUTES:+--max-minutes $MINUTES} --config configs/storyworld_pca_decoder_long.yaml \
        --run-dir "$RUNS/pca_decoder_long" train.video_data_path="$DATA/scripts" run.vae_ckpt="$RUNS/pca_decoder" \
        $ARCH $EXTRA ;;
    latents)
      $PY -m memflow_jax.data.encode_latents --config configs/storyworld.yaml --vae "${VAE_SRC:-$RUNS/vae_decoder}" \
        $LATENT_DATA --out "$DATA/latents" --dtype "$STORE_DTYPE" --stats "$LATENT_STATS" $ARCH ;;
    stories)
      # 36 latent frames = 141 video frames, prompt switches on chunk boundaries (3 latent = 12 video frames)
      $PY -m memflow_jax.storyworld.export --out "$DATA/stories" --kind stories --num "$N_STORIES" --seed 2 \
        --num-latent 36 --chunk 3 --t-stride 4 --p-late-memory "${P_LATE_MEMORY:-0}" \
        --min-absent "${STORY_MIN_ABSENT:-0}" --workers "$WORKERS" ;;
    textcache)
      $PY -m memflow_jax.data.text_cache build --converted-ckpt "$ART/text" --out "$DATA/text_cache" --negative-prompt "" \
        --prompts "$DATA/clips/prompts.txt" "$DATA/scripts/prompts.txt" "$DATA/scripts/switch_prompts.txt" \
        ${WINDOWS:+"$DATA/latents/prompts.txt"} \
        $( [ -f "$DATA/stories/segment_prompts.txt" ] && echo "$DATA/stories/segment_prompts.txt" ) ;;
    teacher)
      $PY train.py ${MINUTES:+--max-minutes $MINUTES} --config configs/storyworld_teacher.yaml --run-dir "$RUNS/teacher" --export "$ART/teacher" \
        "$PATHS" train.latent_data_path="$DATA/latents" $ARCH $EXTRA ;;
    teachercheck)
      head -n 16 "$DATA/scripts/switch_prompts.txt" > "$RUNS/continuation_prompts.txt"
      $PY benchmarks/storyworld_teacher_check.py --teacher "$ART/teacher" --text "$ART/text" --vae "$DATA/latents/vae" \
        --num-clips 16 --prompts "$RUNS/continuation_prompts.txt" --json "$RUNS/teacher_check.json" ;;
    odepairs)
      $PY -m memflow_jax.training.ode_pairs --config configs/storyworld_ode_init.yaml --out "$DATA/ode_pairs" \
        --steps 48 --guidance-scale 3.0 ${ODE_SAMPLES:+--num-samples $ODE_SAMPLES} ${ODE_BATCH:+--batch-size $ODE_BATCH} \
        --dtype "$STORE_DTYPE" \
        "$PATHS" train.data_path="$CLIP_PROMPTS" run.teacher_ckpt="$ART/teacher" $ARCH ;;
    odeinit)
      $PY train.py ${MINUTES:+--max-minutes $MINUTES} --config configs/storyworld_ode_init.yaml --run-dir "$RUNS/ode_init" --export "$ART/ode_init" \
        "$PATHS" train.latent_data_path="$DATA/ode_pairs" train.generator_ckpt="$ART/teacher" \
        run.teacher_ckpt="$ART/teacher" $ARCH $EXTRA ;;
    dmd)
      $PY train.py ${MINUTES:+--max-minutes $MINUTES} --config configs/storyworld_dmd.yaml --run-dir "$RUNS/dmd" --export "$ART/dmd" \
        "$PATHS" train.data_path="$CLIP_PROMPTS" train.generator_ckpt="$ART/ode_init" \
        run.teacher_ckpt="$ART/teacher" run.critic_ckpt="$ART/teacher" $ARCH $EXTRA ;;
    dmdlong)
      $PY train.py ${MINUTES:+--max-minutes $MINUTES} --config configs/storyworld_dmd_long.yaml --run-dir "$RUNS/dmd_long" --export "$ART/dmd_long" \
        "$PATHS" train.data_path="$DATA/scripts/prompts.txt" train.switch_prompt_path="$DATA/scripts/switch_prompts.txt" \
        train.generator_ckpt="$ART/dmd" run.teacher_ckpt="$ART/teacher" run.critic_ckpt="$ART/teacher" \
        run.vae_ckpt="$DATA/latents/vae" $ARCH $EXTRA ;;
    story)
      $PY train.py ${MINUTES:+--max-minutes $MINUTES} --config configs/storyworld_story.yaml --run-dir "$RUNS/story" --export "$ART/story" \
        "$PATHS" train.video_data_path="$DATA/stories" train.generator_ckpt="${STORY_INIT:-$ART/dmd_long}" \
        run.vae_ckpt="$DATA/latents/vae" $ARCH $EXTRA ;;
    teacherstory)
      $PY train.py ${MINUTES:+--max-minutes $MINUTES} --config configs/storyworld_teacher_story.yaml \
        --run-dir "$RUNS/teacher_story" --export "$ART/teacher_story" "$PATHS" train.video_data_path="$DATA/stories" \
        run.vae_ckpt="$DATA/latents/vae" run.teacher_ckpt="${TEACHER_STORY_INIT:-scratch}" $ARCH $EXTRA ;;
    storycheck)
      $PY benchmarks/storyworld_teacher_check.py --teacher "$ART/teacher_story" --text "$ART/text" \
        --vae "$DATA/latents/vae" --num-clips 0 --stories 8 ${LATE_MEMORY:+--late-memory --min-absent "${MIN_ABSENT:-9}"} \
        --json "$RUNS/teacher_story_check.json" ;;
    storyodepairs)
      $PY -m memflow_jax.training.ode_pairs --config configs/storyworld_ode_story.yaml --stories "$DATA/stories" \
        --out "$DATA/story_ode_pairs" --steps 48 --guidance-scale 3.0 ${STORY_ODE_SAMPLES:+--num-samples $STORY_ODE_SAMPLES} \
        ${STORY_GUIDANCE_SIGMA_MAX:+--guidance-sigma-max $STORY_GUIDANCE_SIGMA_MAX} \
        ${ODE_BATCH:+--batch-size $ODE_BATCH} --dtype "$STORE_DTYPE" "$PATHS" run.teacher_ckpt="$ART/teacher_story" $ARCH ;;
    odestory)
      $PY train.py ${MINUTES:+--max-minutes $MINUTES} --config configs/storyworld_ode_story.yaml \
        --run-dir "$RUNS/ode_story" --export "$ART/ode_story" "$PATHS" train.latent_data_path="$DATA/story_ode_pairs" \
        train.generator_ckpt="${STORY_ODE_INIT:-$ART/teacher_story}" $ARCH $EXTRA ;;
    dmdstory)
      $PY train.py ${MINUTES:+--max-minutes $MINUTES} --config configs/storyworld_dmd_story.yaml \
        --run-dir "$RUNS/dmd_story" --export "$ART/dmd_story" "$PATHS" train.video_data_path="$DATA/stories" \
        train.generator_ckpt="${STORY_DMD_INIT:-$PACKAGE}" run.teacher_ckpt="$ART/teacher_story" $ARCH $EXTRA ;;
    package)
      $PY -m memflow_jax.storyworld.package --dit "${PACKAGE_DIT:-$ART/ode_story}" --text "$ART/text" \
        --vae "$DATA/latents/vae" ${DECODER_RUN:+--decoder-run "$DECODER_RUN"} --dit-dtype "${DIT_DTYPE:-bfloat16}" \
        --out "$PACKAGE" ;;
    *)
      echo "unknown stage '$name' (data text vae vaedec pca pcadec pcadeclong latents stories textcache teacher teachercheck odepairs odeinit dmd dmdlong story teacherstory storycheck storyodepairs odestory dmdstory package)" >&2
      exit 2 ;;
  esac
  echo "=== stage $name done in $((SECONDS - t0)) s"
}

if [ $# -eq 0 ]; then
  sed -n '2,/^set -euo pipefail/{/^set/d;p}' "$0"
  exit 2
fi
for s in "$@"; do stage "$s"; done
