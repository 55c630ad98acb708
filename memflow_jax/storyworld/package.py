"""Assemble the shipped storyworld demo checkpoint from the training stages' outputs.

    python -m memflow_jax.storyworld.package --dit runs/storyworld/art/dmd_long --text runs/storyworld/art/text \
        --vae data/storyworld/latents/vae --out memflow_jax/assets/storyworld

    # with a decoder trained after the DiT (storyworld/TRAINING.md round 10):
    python -m memflow_jax.storyworld.package --dit ... --text ... --vae <the latents' VAE> \
        --decoder-run runs/storyworld/pca_decoder_long --out ...

Inputs are converted checkpoints (``config.json`` + Orbax components): the generator (``train.py --export``),
the tokenizer + UMT5 (``memflow_jax.storyworld.text_model``) and the VAE with its measured latent statistics
(``memflow_jax.data.encode_latents``). The output is one converted checkpoint with components ``dit``, ``t5``,
``vae``, the ``tokenizer/`` folder and ``story.jsonl``: the default story of ``python sample.py`` (a held-out
narrative of the world, one prompt per segment, switches on chunk boundaries). Written atomically.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Sequence

import ml_dtypes
import numpy as np

from memflow_jax import config as config_lib
from memflow_jax.convert.common import cast_tree, load_component, read_converted_meta, save_converted
from memflow_jax.io.atomic import write_text

DEMO_STORY_TAG = 0x5709  # SeedSequence tag of the default story (training datasets use plain integer seeds)
STORY_FILE = "story.jsonl"
STORE_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}  # the DiT's storage (--dit-dtype)


def demo_story(num_frames: int, chunk: int, seed: int = 0, num_segments: int = 4,
               min_chunks: int = 2) -> list[dict[str, Any]]:
    """A narrative of ``num_segments`` prompts over ``num_frames`` latent frames: ``[{"prompt", "start_frame"}]``.

    Segments are whole chunks (``chunk`` latent frames each, at least ``min_chunks``); an object leaves and
    later comes back (the storyworld script sampler guarantees it), so the story exercises the memory.
    """
    from memflow_jax.storyworld import captions, scripts

    n_chunks = num_frames // chunk
    if n_chunks < num_segments * min_chunks:
        raise ValueError(f"{num_frames} latent frames = {n_chunks} chunks cannot hold {num_segments} segments of "
                         f">= {min_chunks} chunks; raise sampler.num_output_frames")
    rng = np.random.default_rng(np.random.SeedSequence([DEMO_STORY_TAG, int(seed)]))
    # sample in chunk units: a "frame" of the script is one chunk here (only prompts and durations are used)
    script = scripts.sample_script(rng, num_segments=num_segments, num_frames=n_chunks,
                                   segment_frames=(min_chunks, n_chunks))
    prompts = captions.script_prompts(script)
    return [{"prompt": p, "start_frame": int(s) * chunk} for p, s in zip(prompts, script.start_frames)]


def _sections(ckpt: str, names: Sequence[str], what: str) -> dict[str, Any]:
    cfg = read_converted_meta(ckpt)["config"]
    missing = [n for n in names if n not in cfg]
    if missing:
        raise ValueError(f"{what} checkpoint {ckpt}: its config.json lacks section(s) {missing}; was it written by "
                         f"the matching storyworld stage?")
    return {n: cfg[n] for n in names}


def swapped_decoder(vae_dir: str, run_dir: str) -> tuple[dict[str, Any], Any, dict[str, Any]]:
    """(vae config section, params, provenance): the ``vae``-recipe run's newest params (EMA when saved) with
    ``vae_dir``'s measured latent statistics.

    Valid only when the run kept the encoding path frozen (``vae.pca_decoder``: the PCA;
    ``train.vae_freeze_encoder``: the encoder; :func:`nn.vae.frozen_keys`), so that its latents, and the statistics
    a DiT was trained with, are ``vae_dir``'s; checked by comparing those frozen params bit for bit.
    """
    import jax

    from memflow_jax.nn import vae
    from memflow_jax.training.trainer import load_vae_host, vae_run_item

    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"--decoder-run {run_dir}: no config.json; pass a `train.py` run folder of the vae recipe")
    with open(path) as f:
        run_cfg = json.load(f)
    train = run_cfg.get("train", {})
    if train.get("recipe", "vae") != "vae" or "vae" not in run_cfg:
        raise ValueError(f"--decoder-run {run_dir} is not a vae-recipe run (train.recipe={train.get('recipe')!r})")
    ref_section = _sections(vae_dir, ("vae",), "VAE")["vae"]
    measured = read_converted_meta(vae_dir).get("latent_stats")
    if not measured:
        raise ValueError(f"--vae {vae_dir} has no measured latent statistics (no latent_stats in its config.json); "
                         "pass the VAE folder that data.encode_latents wrote (OUT/vae) with the latents the DiT "
                         "was trained on")
    section = dict(run_cfg["vae"], latent_mean=measured["latent_mean"], latent_std=measured["latent_std"])
    vcfg = config_lib.from_dict({"vae": section}).vae
    frozen = vae.frozen_keys(vcfg, bool(train.get("vae_freeze_encoder")))
    if not frozen:
        raise ValueError(f"--decoder-run {run_dir} trained its encoder too (neither vae.pca_decoder nor "
                         "train.vae_freeze_encoder), so its latents are not those of --vae: re-encode the data with "
                         "it (python -m memflow_jax.data.encode_latents) and pass that --vae instead")
    params = load_vae_host(run_dir, vcfg, "--decoder-run")
    ref = load_vae_host(vae_dir, config_lib.from_dict({"vae": ref_section}).vae, "--vae")
    for key in frozen:
        a, b = jax.tree_util.tree_flatten(ref.get(key)), jax.tree_util.tree_flatten(params[key])
        if a[1] != b[1] or not all(x.shape == y.shape and np.array_equal(x, y) for x, y in zip(a[0], b[0])):
            raise ValueError(f"--decoder-run {run_dir}: its frozen '{key}' params differ from --vae {vae_dir}'s, so "
                             "--vae's latent statistics do not describe its latents; pass the --vae the run was "
                             "initialised from (run.vae_ckpt)")
    item = vae_run_item(os.path.abspath(run_dir))  # .../checkpoints/<step>/<ema | vae>: what load_vae_host read
    source = {"path": os.path.relpath(run_dir), "step": int(os.path.basename(os.path.dirname(item))),
              "ema": os.path.basename(item) == "ema"}
    return section, params, source


def package(dit_dir: str, text_dir: str, vae_dir: str, out_dir: str, story_seed: int = 0,
            decoder_run: str | None = None, dit_dtype: str = "float32") -> str:
    """Merge the three converted checkpoints into ``out_dir`` (validated against the merged config).

    ``decoder_run``: a ``vae``-recipe run with a frozen encoding path (``pcadec`` / ``vaedec``) whose weights replace
    ``vae_dir``'s, which then only supplies the latent statistics (:func:`swapped_decoder`).
    ``dit_dtype``: how the DiT's weights are stored ("bfloat16" halves them; every loader restores them in its own
    param dtype, Orbax casting on restore).
    """
    if dit_dtype not in STORE_DTYPES:
        raise ValueError(f"dit_dtype {dit_dtype!r}: use one of {sorted(STORE_DTYPES)}")
    from memflow_jax.nn import dit, t5, vae
    from memflow_jax.pipeline import check_compatible

    data = _sections(dit_dir, ("model", "memory", "sampler"), "DiT")
    data.update(_sections(text_dir, ("text",), "text"))
    vae_params = decoder_source = None
    if decoder_run:
        data["vae"], vae_params, decoder_source = swapped_decoder(vae_dir, decoder_run)
    else:
        data.update(_sections(vae_dir, ("vae",), "VAE"))
    cfg = config_lib.from_dict(data)
    check_compatible(cfg)
    tok = os.path.join(text_dir, "tokenizer")
    if not os.path.isdir(tok):
        raise ValueError(f"text checkpoint {text_dir} has no tokenizer/ folder (run memflow_jax.storyworld.text_model)")
    comps = {
        "dit": load_component(dit_dir, "dit", dit.abstract_params(dataclasses.replace(
            cfg.model, dtype="float32", param_dtype="float32"))),
        "t5": load_component(text_dir, "t5", t5.abstract_params(cfg.text)),
        "vae": vae_params if decoder_run else load_component(vae_dir, "vae", vae.abstract_params(cfg.vae)),
    }
    sources = {}
    for name, d in (("dit", dit_dir), ("text", text_dir), ("vae", vae_dir)):
        meta = read_converted_meta(d)
        earlier = meta.get("sources", {}).get(name)
        if isinstance(earlier, dict):  # ``d`` is itself a package: keep its record of this part, not its whole history
            sources[name] = earlier
        else:
            sources[name] = {"path": os.path.relpath(d), **{k: v for k, v in meta.items()
                                                            if k not in ("config", "components")}}
    if decoder_run:
        sources["vae"]["decoder_run"] = decoder_source
    counts = {k: int(sum(np.prod(x.shape) for x in _leaves(v))) for k, v in comps.items()}
    comps["dit"] = cast_tree(comps["dit"], STORE_DTYPES[dit_dtype])
    story = demo_story(cfg.sampler.num_output_frames, cfg.sampler.chunk_frames, story_seed)  # fails before writing
    save_converted(out_dir, comps, cfg.checkpoint_dict(),
                   extra_meta={"sources": sources, "param_counts": counts, "stored_dtypes": {"dit": dit_dtype}},
                   copy_dirs={"tokenizer": tok})
    write_text(os.path.join(out_dir, STORY_FILE), "".join(json.dumps(seg) + "\n" for seg in story))
    return out_dir


def _leaves(tree: Any) -> list[Any]:
    import jax

    return jax.tree_util.tree_leaves(tree)


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m memflow_jax.storyworld.package", description=__doc__.split("\n")[0])
    ap.add_argument("--dit", required=True, help="generator checkpoint (train.py --export)")
    ap.add_argument("--text", required=True, help="tokenizer + UMT5 checkpoint (storyworld.text_model)")
    ap.add_argument("--vae", required=True, help="VAE checkpoint with latent statistics (data.encode_latents)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--story-seed", type=int, default=0, help="which held-out story sample.py shows by default")
    ap.add_argument("--decoder-run", default=None,
                    help="a vae-recipe run folder with a frozen encoding path (pcadec / pcadeclong / vaedec): its EMA "
                         "weights, with --vae's latent statistics (the frozen params are checked equal)")
    ap.add_argument("--dit-dtype", choices=sorted(STORE_DTYPES), default="float32",
                    help="storage dtype of the DiT's weights (bfloat16 halves the package; loaders cast back)")
    args = ap.parse_args(argv)
    try:
        out = package(args.dit, args.text, args.vae, args.out, args.story_seed, args.decoder_run, args.dit_dtype)
    except (ValueError, config_lib.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({dir_size(out) / 2**20:.1f} MiB)")
    with open(os.path.join(out, STORY_FILE)) as f:
        print(f.read(), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
