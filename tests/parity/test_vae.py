"""Wan VAE parity against the reference fixtures ($MEMFLOW_FIXTURES/vae), fully data-driven.

Every ``*.safetensors`` case file listed in the manifest is tested; what a file is tested for follows from the
tensors it holds (``video_bcthw`` -> encode, ``pixel_unclamped_bcthw`` / ``pixel_bfchw`` -> decode,
``pixel_chunk_<i>_bfchw`` -> streaming decode with the chunking read off the chunk shapes).

Tolerance (float32): ``atol = 10 * e64 + 16 * eps32 * ref_max_abs`` where ``e64`` is the reference's own
float32-vs-float64 error for that quantity recorded in ``vae_cases.json`` (a float32 port differs from the
reference by about that rounding error on each side; 10x headroom) and the second term is a floor of 16 float32
ulps of the largest value (for fixture sets whose recorded error happens to be ~0).
"""
from __future__ import annotations

import os
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from memflow_jax.config import VAEConfig
from memflow_jax.convert.vae import convert_vae_state_dict
from memflow_jax.nn import vae
from tests.conftest import fixture_dir, load_json, load_manifest

pytestmark = pytest.mark.parity

COMPONENT = "vae"
CASES_JSON = "vae_cases.json"
EPS32 = float(np.finfo(np.float32).eps)
BF16_U = 2.0 ** -8  # unit roundoff of bfloat16 (8-bit significand)

_CHUNK_RE = re.compile(r"^pixel_chunk_(\d+)_bfchw$")


def _case_files() -> list[tuple[str, str]]:
    """(file, kind) for every case file in the manifest; kind from the tensor names it holds."""
    out = []
    for entry in load_manifest(COMPONENT)["files"]:
        path = entry["path"]
        if not path.endswith(".safetensors"):
            continue
        names = set(entry.get("tensors", {}))
        if not names:
            names = set(load_file(os.path.join(fixture_dir(COMPONENT), path)))
        kinds = []
        if "video_bcthw" in names:
            kinds.append("encode")
        if "pixel_unclamped_bcthw" in names or ("pixel_bfchw" in names and "latent_bfchw" in names):
            kinds.append("decode")
        if any(_CHUNK_RE.match(n) for n in names):
            kinds.append("stream")
        if not kinds:
            kinds.append("unknown")  # fails below: every case file must be exercised
        out += [(path, k) for k in kinds]
    return out


CASES = _case_files()


def _meta() -> dict:
    return load_json(COMPONENT, CASES_JSON)


def _cfg(meta: dict, **kw) -> VAEConfig:
    c = meta["tiny_config"]
    return VAEConfig(dim=c["dim"], z_dim=c["z_dim"], dim_mult=tuple(c["dim_mult"]),
                     num_res_blocks=c["num_res_blocks"], attn_scales=tuple(float(s) for s in c["attn_scales"]),
                     temporal_downsample=tuple(bool(t) for t in c["temperal_downsample"]),
                     latent_mean=tuple(meta["latent_mean"]), latent_std=tuple(meta["latent_std"]), **kw)


_PARAMS: dict = {}


def _params(meta: dict, cfg: VAEConfig):
    key = meta["checkpoint"]
    if key not in _PARAMS:
        _PARAMS[key] = convert_vae_state_dict(os.path.join(fixture_dir(COMPONENT), meta["checkpoint"]), cfg)
    return _PARAMS[key]


def _atol(meta: dict, quantity: str, fallback: str = "pixel") -> float:
    m = meta.get("tolerance_measurements", {}).get("f32_vs_f64", {})
    q = m.get(quantity, m.get(fallback))
    if q is None:  # no measurement recorded: the fixture README's suggested float32 tolerance
        return 5e-5
    return 10.0 * q["max_abs"] + 16.0 * EPS32 * q["ref_max_abs"]


def _close(name: str, got, want, atol: float) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != reference {want.shape}"
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    print(f"{name}: max|diff| = {err:.3g} (atol {atol:.3g})")
    np.testing.assert_allclose(got, want, rtol=0, atol=atol, err_msg=name)


def _load(path: str) -> dict:
    return load_file(os.path.join(fixture_dir(COMPONENT), path))


@pytest.mark.parametrize("case,kind", CASES, ids=[f"{os.path.splitext(c)[0]}-{k}" for c, k in CASES])
def test_vae_case(case: str, kind: str) -> None:
    meta = _meta()
    cfg = _cfg(meta)
    params = _params(meta, cfg)
    a = _load(case)
    if kind == "encode":
        video = a["video_bcthw"]
        lat = vae.encode(params, cfg, jnp.asarray(video))
        _close(f"{case} latent", lat, a["latent_bfchw"], _atol(meta, "latent"))
        if "mu_unnormalized_bcthw" in a:
            mu = vae.encode(params, cfg, jnp.asarray(video), normalize=False)
            _close(f"{case} mu", np.asarray(mu).transpose(0, 2, 1, 3, 4), a["mu_unnormalized_bcthw"],
                   _atol(meta, "mu_raw"))
    elif kind == "decode":
        lat = jnp.asarray(a["latent_bfchw"])
        t = lat.shape[1]
        stride = 2 ** sum(cfg.temporal_downsample)
        checked = 0
        if "pixel_bfchw" in a:
            pix = vae.decode(params, cfg, lat)
            assert pix.shape[1] == 1 + stride * (t - 1)
            _close(f"{case} pixel", pix, a["pixel_bfchw"], _atol(meta, "pixel"))
            checked += 1
        if "pixel_unclamped_bcthw" in a:
            raw = vae.decode(params, cfg, lat, clamp=False)
            _close(f"{case} pixel_unclamped", np.asarray(raw).transpose(0, 2, 1, 3, 4), a["pixel_unclamped_bcthw"],
                   _atol(meta, "pixel_unclamped"))
            checked += 1
        assert checked
    elif kind == "stream":
        _stream_case(meta, cfg, params, case, a)
    else:
        pytest.fail(f"{case}: case file with no tensors this test knows how to check: {sorted(a)}")


def _stream_case(meta: dict, cfg: VAEConfig, params, case: str, a: dict) -> None:
    lat = a["latent_bfchw"]
    idx = sorted(int(_CHUNK_RE.match(n).group(1)) for n in a if _CHUNK_RE.match(n))
    assert idx == list(range(len(idx))), f"{case}: chunk indices {idx} are not 0..n-1"
    stride = 2 ** sum(cfg.temporal_downsample)
    # latent frames per chunk from the pixel frame counts: first chunk 1 + s(k-1), later s*k
    chunks = []
    for i in idx:
        f = a[f"pixel_chunk_{i}_bfchw"].shape[1]
        assert (f - 1 if i == 0 else f) % stride == 0, f"{case}: chunk {i} has {f} frames"
        chunks.append((f - 1) // stride + 1 if i == 0 else f // stride)
    recorded = meta.get("stream_decode", {}).get("chunk_latent_frames")
    if recorded is not None and os.path.basename(case).startswith("stream_decode_case"):
        assert chunks == list(recorded), f"{case}: chunking {chunks} != recorded {recorded}"
    assert sum(chunks) == lat.shape[1], f"{case}: chunks {chunks} do not cover {lat.shape[1]} latent frames"
    b, _, _, h, w = lat.shape
    cache = vae.init_decode_cache(cfg, b, h, w)
    shapes0 = [x.shape for x in jax.tree_util.tree_leaves(cache)]
    start = 0
    for i, k in zip(idx, chunks):
        pix, cache = vae.decode_chunk_jit(params, cfg, jnp.asarray(lat[:, start:start + k]), cache)
        start += k
        _close(f"{case} chunk {i} ({k} latents)", pix, a[f"pixel_chunk_{i}_bfchw"], _atol(meta, "stream_full"))
        assert [x.shape for x in jax.tree_util.tree_leaves(cache)] == shapes0
    assert int(cache.num_latents) == lat.shape[1]


def test_latent_stats_defaults_match_fixture() -> None:
    """VAEConfig's default latent_mean/std equal the wrapper constants recorded in vae_cases.json (float32)."""
    meta = _meta()
    d = VAEConfig()
    chex.assert_trees_all_equal(np.asarray(d.latent_mean, np.float32), np.asarray(meta["latent_mean"], np.float32))
    chex.assert_trees_all_equal(np.asarray(d.latent_std, np.float32), np.asarray(meta["latent_std"], np.float32))
    real = meta["real_config"]
    assert (d.dim, d.z_dim, list(d.dim_mult), d.num_res_blocks) == (
        real["dim"], real["z_dim"], list(real["dim_mult"]), real["num_res_blocks"])
    assert list(d.temporal_downsample) == list(real["temperal_downsample"])
    assert list(d.attn_scales) == list(real["attn_scales"])


def test_decode_bf16_tolerance() -> None:
    """bfloat16 compute decode of every decode case stays near the float32 reference.

    Bound (stated, not measured): bf16 rounds every activation with unit roundoff u = 2^-8; through the ~40
    layers the errors add up to a few u relative, so we require RMS(err) <= 8u * RMS(ref) and
    max|err| <= 32u * max|ref| (measured on the public case: ~4.5u and ~7.5u). Gross bugs give O(1) errors.
    """
    meta = _meta()
    cfg16 = _cfg(meta, dtype="bfloat16")
    params = _params(meta, _cfg(meta))
    n = 0
    for case, kind in CASES:
        if kind != "decode":
            continue
        a = _load(case)
        ref = a["pixel_unclamped_bcthw"].transpose(0, 2, 1, 3, 4) if "pixel_unclamped_bcthw" in a \
            else a["pixel_bfchw"]
        out = np.asarray(vae.decode(params, cfg16, jnp.asarray(a["latent_bfchw"]),
                                    clamp="pixel_unclamped_bcthw" not in a), np.float64)
        assert out.shape == ref.shape and np.all(np.isfinite(out))
        err = np.abs(out - ref)
        rms_rel = float(np.sqrt((err ** 2).mean()) / np.sqrt((ref.astype(np.float64) ** 2).mean()))
        print(f"{case} bf16: rms rel {rms_rel / BF16_U:.2f}u, max {err.max():.3g}")
        assert rms_rel <= 8 * BF16_U, f"{case}: bf16 relative RMS error {rms_rel:.3g} > 8u"
        assert err.max() <= 32 * BF16_U * np.abs(ref).max(), f"{case}: bf16 max error {err.max():.3g}"
        n += 1
    assert n, "no decode case in the fixture folder"


def test_manifest_lists_every_case_file() -> None:
    """Every safetensors file on disk is in the manifest (so none escapes parametrization)."""
    listed = {e["path"] for e in load_manifest(COMPONENT)["files"]}
    on_disk = {f for f in os.listdir(fixture_dir(COMPONENT)) if f.endswith(".safetensors")}
    assert on_disk <= listed, f"case files not in manifest.json: {sorted(on_disk - listed)}"
    assert CASES

