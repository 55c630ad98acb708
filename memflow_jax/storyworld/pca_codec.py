"""Fit the PCA pixel codec (``vae.codec: pca``, :mod:`memflow_jax.nn.pixel_codec`) on storyworld datasets and save
it as a converted VAE checkpoint (component ``vae`` + ``config.json``), the ``--vae`` of ``data.encode_latents``::

    python -m memflow_jax.storyworld.pca_codec --config configs/storyworld.yaml --data DATA/clips DATA/scripts \\
        --out RUNS/pca vae.codec=pca vae.z_dim=32 [--num-videos 300] [--cell-stride 3]

Closed form: the per-cell mean and the ``z_dim`` leading eigenvectors of the lossless codec's cell covariance over
the first ``--num-videos`` examples of each dataset (every ``--cell-stride``-th cell). Deterministic. Prints the
variance kept on the fitting videos. With ``vae.pca_decoder=true`` the checkpoint also holds a freshly initialised
Wan-architecture decoder (``--seed``): the ``run.vae_ckpt`` that ``configs/storyworld_pca_decoder.yaml`` trains.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from typing import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m memflow_jax.storyworld.pca_codec", description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="YAML whose vae / sampler sections describe the codec")
    ap.add_argument("--data", nargs="+", required=True, help="storyworld dataset folder(s) (storyworld.export)")
    ap.add_argument("--out", required=True, help="converted checkpoint folder (replaced atomically)")
    ap.add_argument("--num-videos", type=int, default=300, help="videos read from each dataset")
    ap.add_argument("--cell-stride", type=int, default=3, help="use every n-th latent cell")
    ap.add_argument("--seed", type=int, default=0, help="init of the decoder (vae.pca_decoder=true)")
    ap.add_argument("overrides", nargs="*", help="section.key=value (at least vae.codec=pca vae.z_dim=N)")
    args = ap.parse_args(argv)

    from memflow_jax import config as config_lib
    from memflow_jax.convert.common import save_converted
    from memflow_jax.nn import pixel_codec
    from memflow_jax.storyworld.dataset import StoryworldSource
    from memflow_jax.training import trainer  # noqa: F401  (registers train / run / teacher_model: shared overrides)

    t0 = time.time()
    try:
        cfg = config_lib.load(args.config, args.overrides)
        if cfg.vae.codec != "pca":
            raise config_lib.ConfigError(f"vae.codec={cfg.vae.codec!r}: this tool fits vae.codec=pca (pass "
                                         "vae.codec=pca vae.z_dim=N)")
        if args.num_videos < 1 or args.cell_stride < 1:
            raise ValueError("--num-videos and --cell-stride must be >= 1")
        sources = [StoryworldSource(d) for d in args.data]
    except (config_lib.ConfigError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def videos():
        for src in sources:
            for i in range(min(args.num_videos, len(src))):
                yield src[i]["video"]

    params = pixel_codec.fit_pca(cfg.vae, videos(), stride=args.cell_stride)
    kept = pixel_codec.explained_variance(cfg.vae, params, itertools.islice(videos(), 64))
    if cfg.vae.pca_decoder:  # a fresh decoder beside the fitted PCA (the fit above is the encoder)
        import jax
        import numpy as np

        from memflow_jax.nn import vae as vae_lib

        fresh = vae_lib.init_params(cfg.vae, jax.random.PRNGKey(args.seed))
        params = {**jax.tree_util.tree_map(np.asarray, fresh), **params}
    config_dict = cfg.checkpoint_dict()
    save_converted(args.out, {"vae": params}, config_dict,
                   extra_meta={"pca_codec": {"data": [os.path.abspath(d) for d in args.data],
                                             "num_videos": args.num_videos, "cell_stride": args.cell_stride,
                                             "variance_kept": kept}})
    decoder = " + an untrained decoder (vae.pca_decoder)" if cfg.vae.pca_decoder else ""
    print(f"wrote {args.out}: {cfg.vae.z_dim} of {pixel_codec.cell_dim(cfg.vae)} components, {kept:.4f} of the "
          f"variance kept (first 64 fitting videos){decoder}, in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
