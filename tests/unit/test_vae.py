"""Unit tests of the Wan VAE: streaming cache, jit/donation, input checks, converter mapping, real-size shapes.

Most tests use a reduced architecture (3 levels, 1 res block, attention at scale 0.5) so the two compiled decoder
steps stay cheap; the key-mapping / parameter-count tests also use the shapes recorded in vae_cases.json.
"""
from __future__ import annotations

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memflow_jax.config import VAEConfig
from memflow_jax.convert.common import ConversionError, flatten
from memflow_jax.convert.vae import convert_tensor, convert_vae_state_dict, map_key
from memflow_jax.nn import vae
from tests import rand
from tests.conftest import fixture_dir, load_json

Z = 4
CFG = VAEConfig(dim=4, z_dim=Z, dim_mult=(1, 2, 2), num_res_blocks=1, attn_scales=(0.5,),
                temporal_downsample=(True, True), latent_mean=tuple(np.linspace(-0.5, 0.5, Z)),
                latent_std=tuple(np.linspace(1.0, 2.0, Z)))
T_STRIDE = 2 ** sum(CFG.temporal_downsample)  # 4
S_STRIDE = 2 ** (len(CFG.dim_mult) - 1)  # 4
B, T_LAT, H_LAT, W_LAT = 1, 5, 2, 3


@pytest.fixture(scope="module")
def params():
    return vae.init_params(CFG, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def latents():
    return rand.normal(jax.random.PRNGKey(1), (B, T_LAT, Z, H_LAT, W_LAT), jnp.float32)


@pytest.fixture(scope="module")
def full(params, latents):
    return vae.decode(params, CFG, latents, clamp=False)


def _random_chunkings(n: int, total: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        parts, left = [], total
        while left:
            parts.append(int(rng.integers(1, min(3, left) + 1)))
            left -= parts[-1]
        if parts not in out:
            out.append(parts)
    return out


def _shapes(cache):
    return [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(cache)]


def test_full_decode_shape(full) -> None:
    chex.assert_shape(full, (B, 1 + T_STRIDE * (T_LAT - 1), 3, S_STRIDE * H_LAT, S_STRIDE * W_LAT))
    assert np.all(np.isfinite(np.asarray(full)))


_CHUNKINGS = _random_chunkings(3, T_LAT)


@pytest.mark.parametrize("chunks,whole", [(c, True) for c in _CHUNKINGS] + [(_CHUNKINGS[0], False)], ids=str)
def test_stream_equals_full_decode(params, latents, full, chunks, whole) -> None:
    """decode_chunk_jit over a random chunking == full decode (per-frame steps: bit for bit; later chunks in one
    decoder call: up to f32 rounding, a different program); frame counts; constant cache shapes."""
    print("chunking", chunks, "whole_chunk", whole)
    cache = vae.init_decode_cache(CFG, B, H_LAT, W_LAT)
    shapes0 = _shapes(cache)
    outs, start = [], 0
    for i, k in enumerate(chunks):
        pix, cache = vae.decode_chunk_jit(params, CFG, latents[:, start:start + k], cache, clamp=False,
                                          whole_chunk=whole)
        start += k
        assert pix.shape[1] == (1 + T_STRIDE * (k - 1) if i == 0 else T_STRIDE * k)
        assert _shapes(cache) == shapes0, f"cache shapes changed after chunk {i}"
        assert cache.started and int(cache.num_latents) == start
        outs.append(np.asarray(pix))
    if whole:
        np.testing.assert_allclose(np.concatenate(outs, axis=1), np.asarray(full), rtol=0, atol=1e-5)
    else:
        chex.assert_trees_all_equal(np.concatenate(outs, axis=1), np.asarray(full))


def test_scan_decode_chunk_jit_donated(params, latents, full) -> None:
    """The traceable decode_chunk (lax.scan inside) under a user jit with the cache donated."""
    f = jax.jit(vae.decode_chunk, static_argnums=1, static_argnames="clamp", donate_argnums=3)
    cache = vae.init_decode_cache(CFG, B, H_LAT, W_LAT)
    shapes0 = _shapes(cache)
    outs, start = [], 0
    for k in (2, T_LAT - 2):
        old = cache
        pix, cache = f(params, CFG, latents[:, start:start + k], cache, clamp=False)
        start += k
        assert all(x.is_deleted() for x in jax.tree_util.tree_leaves(old)), "cache was not donated"
        assert _shapes(cache) == shapes0
        outs.append(np.asarray(pix))
    # same step function as decode_chunk_jit, run under lax.scan instead of from Python: equal up to f32 rounding
    np.testing.assert_allclose(np.concatenate(outs, axis=1), np.asarray(full), rtol=0, atol=1e-5)


@pytest.mark.parametrize("cin,cout", [(8, 6), (12, 3)], ids=["taps_on_inputs", "taps_on_outputs"])
def test_causal_conv_layouts_equal_3d_conv(cin, cout) -> None:
    """Both 2-D forms of the causal 3-D conv (time taps stacked on the input channels, or on the output channels
    when kt * cout <= cin, the decoder head), with the cached frames in front passed apart or not, equal lax's
    direct 3-D conv."""
    kx, kk, kb = jax.random.split(jax.random.PRNGKey(0), 3)
    x = rand.normal(kx, (2, 6, 5, 7, cin))  # [B, T, H, W, C]
    k = rand.normal(kk, (3, 3, 3, cin, cout))
    b = rand.normal(kb, (cout,))
    ref = jax.lax.conv_general_dilated(x, k, (1, 1, 1), ((0, 0), (1, 1), (1, 1)), precision="highest",
                                       dimension_numbers=("NDHWC", "DHWIO", "NDHWC")) + b
    for prev_frames in (0, 2, 4):  # the first frames passed separately as the cached ``prev``
        prev = x[:, :prev_frames] if prev_frames else None
        got = vae._conv(x[:, prev_frames:], k, b, (1, 1, 1), ((0, 0), (1, 1), (1, 1)), prev=prev)
        chex.assert_shape(got, (2, 4, 5, 7, cout))
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


def test_upsample_conv_equals_repeat_then_conv() -> None:
    """The sub-pixel form of nearest-x2 + 3x3 conv (the decoder's upsample) equals upsampling first."""
    kx, kk, kb = jax.random.split(jax.random.PRNGKey(1), 3)
    x = rand.normal(kx, (2, 5, 7, 6))  # [N, H, W, C]
    k = rand.normal(kk, (3, 3, 6, 4))
    b = rand.normal(kb, (4,))
    up = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    ref = jax.lax.conv_general_dilated(up, k, (1, 1), ((1, 1), (1, 1)), precision="highest",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC")) + b
    got = vae._upsample2x_conv3x3(x, k, b)
    chex.assert_shape(got, (2, 10, 14, 4))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-4)


def test_cache_dtype_and_shapes() -> None:
    c32 = vae.init_decode_cache(CFG, 2, H_LAT, W_LAT)
    c16 = vae.init_decode_cache(CFG, 2, H_LAT, W_LAT, jnp.bfloat16)
    leaves = jax.tree_util.tree_leaves(c16.feats)
    assert leaves and all(x.dtype == jnp.bfloat16 for x in leaves)
    assert all(x.shape[-5:-3] == (2, 2) for x in leaves)  # [(n,) batch, CACHE_T, h, w, C]
    assert [x.shape for x in leaves] == [x.shape for x in jax.tree_util.tree_leaves(c32.feats)]
    assert not c32.started and int(c32.num_latents) == 0


def test_video_to_input_layout_and_range() -> None:
    video = np.random.default_rng(0).integers(0, 256, (2, 5, 4, 6, 3), dtype=np.uint8)  # [B, T, H, W, 3]
    video[0, 0, 0, 0] = (0, 128, 255)
    x = vae.video_to_input(video)
    chex.assert_shape(x, (2, 3, 5, 4, 6))
    chex.assert_type(x, jnp.float32)
    np.testing.assert_allclose(np.asarray(x[0, :, 0, 0, 0]), [-1.0, 128 / 127.5 - 1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(np.asarray(x), np.transpose(video, (0, 4, 1, 2, 3)) / 127.5 - 1.0, atol=1e-6)


def test_encode_shapes_and_causal_first_frame(params) -> None:
    """Latent shape; normalised == (mu - mean) / std; frame 0 is encoded alone (chunk [0])."""
    video = rand.uniform(jax.random.PRNGKey(2), (B, 3, 1 + T_STRIDE, 8, 12), jnp.float32, -1, 1)
    lat = vae.encode(params, CFG, video)
    chex.assert_shape(lat, (B, 2, Z, 8 // S_STRIDE, 12 // S_STRIDE))
    mu = vae.encode(params, CFG, video, normalize=False)
    mean = np.asarray(CFG.latent_mean, np.float32)[:, None, None]
    inv_std = (np.float32(1) / np.asarray(CFG.latent_std, np.float32))[:, None, None]
    np.testing.assert_allclose(np.asarray(lat), (np.asarray(mu) - mean) * inv_std, rtol=0, atol=1e-6)
    lat0 = vae.encode(params, CFG, video[:, :, :1])
    np.testing.assert_allclose(np.asarray(lat0[:, 0]), np.asarray(lat[:, 0]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("t", [0, 2, 4, 6])
def test_encode_rejects_bad_frame_count(params, t) -> None:
    with pytest.raises(ValueError, match=r"T = 1 \+ 4k"):
        vae.encode(params, CFG, jnp.zeros((1, 3, t, 8, 8)))


def test_bad_inputs_raise(params) -> None:
    with pytest.raises(ValueError, match="multiples of 4"):
        vae.encode(params, CFG, jnp.zeros((1, 3, 1, 6, 8)))
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        vae.encode(params, CFG, jnp.zeros((1, 1, 8, 8, 3)))
    with pytest.raises(ValueError, match=f"z_dim={Z}"):
        vae.decode(params, CFG, jnp.zeros((1, 2, Z + 1, 2, 3)))
    cache = vae.init_decode_cache(CFG, 1, 2, 3)
    with pytest.raises(ValueError, match="init_decode_cache"):
        vae.decode_chunk_jit(params, CFG, jnp.zeros((1, 1, Z, 4, 3)), cache)


# ------------------------------------------------------------------------------------------- converter


def _fixture_meta() -> dict:
    return load_json("vae", "vae_cases.json")


def _cfg_from(c: dict, meta: dict, **kw) -> VAEConfig:
    fields = dict(dim=c["dim"], z_dim=c["z_dim"], dim_mult=tuple(c["dim_mult"]), num_res_blocks=c["num_res_blocks"],
                  attn_scales=tuple(c["attn_scales"]), temporal_downsample=tuple(c["temperal_downsample"]),
                  latent_mean=tuple(meta["latent_mean"]), latent_std=tuple(meta["latent_std"]))
    fields.update(kw)
    return VAEConfig(**fields)


@pytest.mark.parametrize("override,named", [({"z_dim": 4, "latent_mean": (0.0,) * 4, "latent_std": (1.0,) * 4},
                                              "z_dim"), ({"dim": 16}, "dim")])
def test_converter_names_dim_mismatch(override, named) -> None:
    meta = _fixture_meta()
    cfg = _cfg_from(meta["tiny_config"], meta, **override)
    path = os.path.join(fixture_dir("vae"), meta["checkpoint"])
    with pytest.raises(ConversionError) as e:
        convert_vae_state_dict(path, cfg)
    msg = str(e.value)
    print(msg)
    assert f"vae.{named}={meta['tiny_config'][named]}" in msg and f"vae.{named}={override[named]}" in msg


def test_converter_reports_structure_mismatch() -> None:
    meta = _fixture_meta()
    cfg = _cfg_from(meta["tiny_config"], meta, num_res_blocks=meta["tiny_config"]["num_res_blocks"] + 1)
    with pytest.raises(ConversionError, match="missing"):
        convert_vae_state_dict(os.path.join(fixture_dir("vae"), meta["checkpoint"]), cfg)


def test_key_mapping_covers_recorded_state_dict() -> None:
    """Every recorded torch key maps to exactly one of our params, with the transposed shape."""
    meta = _fixture_meta()
    cfg = _cfg_from(meta["tiny_config"], meta)
    ours = flatten(vae.abstract_params(cfg))
    _check_mapping(meta["shapes"], ours, cfg)
    assert set(meta["shapes"]) == set(meta["state_dict_keys"])


def _check_mapping(torch_shapes: dict, ours: dict, cfg: VAEConfig, convert: bool = True) -> None:
    """torch key -> (our key, stack index): shapes agree (channels-last, layer axis in front for stacks) and
    every one of our params (and every layer of a stack) is hit exactly once."""
    hits: dict = {}
    for key, shape in torch_shapes.items():
        mapped = map_key(key, cfg)
        assert mapped is not None and mapped[0] in ours, f"{key} -> {mapped} not in our params"
        k, pos = mapped
        o, i, *kernel = list(shape) + [None] * (2 - len(shape))
        want = (o,) if len(shape) == 1 or key.endswith(".gamma") else (*kernel, i, o)
        got = tuple(ours[k].shape) if pos is None else tuple(ours[k].shape[1:])
        assert got == want, f"{key} {tuple(shape)} -> {k}[{pos}] has shape {got}, want {want}"
        if convert:  # the converter's transposition agrees with the stated layout
            assert convert_tensor(key, np.zeros(shape, np.float32)).shape == want
        hits.setdefault(k, []).append(pos)
    assert set(hits) == set(ours), f"params never loaded: {sorted(set(ours) - set(hits))}"
    for k, pos in hits.items():
        n = ours[k].shape[0]
        assert pos == [None] or sorted(pos) == list(range(n)), f"{k}: layers {pos} of {n}"


# ------------------------------------------------------------------------------------ real-size config


def torch_state_dict_shapes(dim, z_dim, dim_mult, num_res_blocks, attn_scales, temperal_downsample) -> dict:
    """Oracle: key -> shape of ``WanVAE_(...).state_dict()`` enumerated from the torch module structure
    (Encoder3d / Decoder3d nn.Sequential indices); independent of our Flax code, checked against the fixture."""
    sd: dict = {}

    def conv(name, o, i, k):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = (o, i, *k), (o,)

    def res(p, i, o):
        sd[f"{p}.residual.0.gamma"] = (i, 1, 1, 1)
        conv(f"{p}.residual.2", o, i, (3, 3, 3))
        sd[f"{p}.residual.3.gamma"] = (o, 1, 1, 1)
        conv(f"{p}.residual.6", o, o, (3, 3, 3))
        if i != o:
            conv(f"{p}.shortcut", o, i, (1, 1, 1))

    def attn(p, c):
        sd[f"{p}.norm.gamma"] = (c, 1, 1)
        conv(f"{p}.to_qkv", 3 * c, c, (1, 1))
        conv(f"{p}.proj", c, c, (1, 1))

    def resample(p, c, mode):
        conv(f"{p}.resample.1", c // 2 if mode.startswith("up") else c, c, (3, 3))
        if mode == "upsample3d":
            conv(f"{p}.time_conv", 2 * c, c, (3, 1, 1))
        if mode == "downsample3d":
            conv(f"{p}.time_conv", c, c, (3, 1, 1))

    # encoder (z_dim * 2 outputs)
    dims = [dim * u for u in [1] + list(dim_mult)]
    conv("encoder.conv1", dims[0], 3, (3, 3, 3))
    idx, scale = 0, 1.0
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(num_res_blocks):
            res(f"encoder.downsamples.{idx}", a, b)
            idx += 1
            if scale in attn_scales:
                attn(f"encoder.downsamples.{idx}", b)
                idx += 1
            a = b
        if i != len(dim_mult) - 1:
            resample(f"encoder.downsamples.{idx}", b, "downsample3d" if temperal_downsample[i] else "downsample2d")
            idx += 1
            scale /= 2
    c = dims[-1]
    res("encoder.middle.0", c, c), attn("encoder.middle.1", c), res("encoder.middle.2", c, c)
    sd["encoder.head.0.gamma"] = (c, 1, 1, 1)
    conv("encoder.head.2", 2 * z_dim, c, (3, 3, 3))
    conv("conv1", 2 * z_dim, 2 * z_dim, (1, 1, 1))
    conv("conv2", z_dim, z_dim, (1, 1, 1))
    # decoder
    dims = [dim * u for u in [dim_mult[-1]] + list(dim_mult)[::-1]]
    up = list(temperal_downsample)[::-1]
    conv("decoder.conv1", dims[0], z_dim, (3, 3, 3))
    c = dims[0]
    res("decoder.middle.0", c, c), attn("decoder.middle.1", c), res("decoder.middle.2", c, c)
    idx, scale = 0, 1.0 / 2 ** (len(dim_mult) - 2)
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        if i in (1, 2, 3):
            a //= 2
        for _ in range(num_res_blocks + 1):
            res(f"decoder.upsamples.{idx}", a, b)
            idx += 1
            if scale in attn_scales:
                attn(f"decoder.upsamples.{idx}", b)
                idx += 1
            a = b
        if i != len(dim_mult) - 1:
            resample(f"decoder.upsamples.{idx}", b, "upsample3d" if up[i] else "upsample2d")
            idx += 1
            scale *= 2
    sd["decoder.head.0.gamma"] = (dims[-1], 1, 1, 1)
    conv("decoder.head.2", 3, dims[-1], (3, 3, 3))
    return sd


def test_real_config_param_count() -> None:
    """Full-size Wan2.1_VAE config via jax.eval_shape: key set and parameter count equal the torch state dict's."""
    meta = _fixture_meta()
    oracle_args = lambda c: (c["dim"], c["z_dim"], c["dim_mult"], c["num_res_blocks"], c["attn_scales"],
                             c["temperal_downsample"])  # noqa: E731
    tiny = torch_state_dict_shapes(*oracle_args(meta["tiny_config"]))
    assert {k: list(v) for k, v in tiny.items()} == {k: list(v) for k, v in meta["shapes"].items()}, \
        "oracle disagrees with the recorded tiny state dict"
    real = torch_state_dict_shapes(*oracle_args(meta["real_config"]))
    assert set(real) == set(meta["state_dict_keys"]), "real key list differs from the recorded one"
    cfg = _cfg_from(meta["real_config"], meta)
    assert cfg == VAEConfig(latent_mean=cfg.latent_mean, latent_std=cfg.latent_std)  # defaults = real config
    abstract = vae.abstract_params(cfg)
    _check_mapping(real, flatten(abstract), cfg, convert=False)
    n_torch = sum(int(np.prod(s)) for s in real.values())
    n_ours = vae.param_count(abstract)
    print(f"Wan2.1 VAE (real config): {len(real)} tensors, {n_ours:,} parameters (torch oracle {n_torch:,})")
    assert n_ours == n_torch
    # the decoder cache of the real config at 480x832 (latents 60x104) is fixed-size and abstract-evaluable
    cache = jax.eval_shape(lambda: vae.init_decode_cache(cfg, 1, 60, 104))
    n_cache = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(cache.feats))
    print(f"real decode cache at 60x104 latents: {len(jax.tree_util.tree_leaves(cache.feats))} arrays, "
          f"{n_cache * 4 / 2**20:.0f} MiB float32")
    assert n_cache > 0
