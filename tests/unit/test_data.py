"""Data sources (prompts, switch prompts, JSONL, text-embedding cache, latents, ODE pairs, ArrayRecord),
their file:line errors, and make_loader (determinism, per-process sharding, exact resume from state)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from memflow_jax import data as D
from memflow_jax.data import text_cache
from memflow_jax.training.config import NEGATIVE_PROMPT

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
L, DIM = 6, 4  # fake encoder: text_len, dim


def _write(path, text: str) -> str:
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return str(path)


# --------------------------------------------------------------------------------------------------
# prompt files
# --------------------------------------------------------------------------------------------------


def test_prompt_file_reference_semantics(tmp_path):
    # CRLF endings and trailing spaces are stripped (reference: line.rstrip()); a blank line is kept as ""
    p = _write(tmp_path / "p.txt", "a cat  \r\nthe dog\r\n\r\nlast line without newline")
    src = D.PromptSource(p)
    assert len(src) == 4
    assert [src[i]["prompts"] for i in range(4)] == ["a cat", "the dog", "", "last line without newline"]
    assert int(src[3]["idx"]) == 3
    assert [r for _, r in D.read_prompt_file(p, on_blank="skip")] == ["a cat", "the dog", "last line without newline"]
    with pytest.raises(D.DataError, match=r"p\.txt:3: blank line"):
        D.PromptSource(p, on_blank="error")
    ext = _write(tmp_path / "ext.txt", "A\nB\nC\nD\n")
    assert D.PromptSource(p, extended_path=ext)[1]["extended_prompts"] == "B"
    with pytest.raises(D.DataError, match="one line per prompt"):
        D.PromptSource(p, extended_path=_write(tmp_path / "short.txt", "A\n"))


def test_prompt_file_errors(tmp_path):
    with pytest.raises(D.DataError, match="no such prompt file"):
        D.PromptSource(tmp_path / "missing.txt")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\nfine\n\xff\xfe broken\n")
    with pytest.raises(D.DataError, match=r"bad\.txt:3: not valid UTF-8"):
        D.PromptSource(bad)
    with pytest.raises(D.DataError, match="no prompts"):
        D.PromptSource(_write(tmp_path / "empty.txt", "\n\n"), on_blank="skip")


def test_switch_prompt_pairs(tmp_path):
    base = _write(tmp_path / "v.txt", "p0\np1\n\np3\n")
    sw = _write(tmp_path / "v_switch.txt", "s0\ns1\ns2\ns3\n")
    src = D.SwitchPromptSource(base, sw)  # line i pairs with line i
    assert [(src[i]["prompts"], src[i]["switch_prompts"]) for i in range(4)] == \
        [("p0", "s0"), ("p1", "s1"), ("", "s2"), ("p3", "s3")]
    skip = D.SwitchPromptSource(base, sw, on_blank="skip")
    assert [skip[i]["switch_prompts"] for i in range(len(skip))] == ["s0", "s1", "s3"] and skip.lines == [1, 2, 4]
    with pytest.raises(D.DataError, match=r"v\.txt:3: blank line"):
        D.SwitchPromptSource(base, sw, on_blank="error")
    with pytest.raises(D.DataError, match=r"v_switch\.txt has 3 lines but .*v\.txt has 4"):
        D.SwitchPromptSource(base, _write(tmp_path / "v_switch.txt", "s0\ns1\ns2\n"))


GOOD_JSONL = [
    {"prompts": ["a", "b", "c"], "switch_frames": [21, 39]},
    {"prompts": ["d", "e", "f"], "switch_frames": [3, 6], "extra": 1},
]


def test_multi_prompt_jsonl(tmp_path):
    p = _write(tmp_path / "m.jsonl", "\n".join(json.dumps(r) for r in GOOD_JSONL[:1]) + "\n\n"
               + json.dumps(GOOD_JSONL[1]) + "\n")
    src = D.MultiPromptSource(p, num_frames=240, chunk_frames=3)
    assert len(src) == 2 and src.lines == [1, 3]
    rec = src[1]
    assert rec["prompts_list"].tolist() == ["d", "e", "f"]
    assert rec["switch_frames"].dtype == np.int32 and rec["switch_frames"].tolist() == [3, 6]
    # the reference's JSONL has prompts only; switch frames then come from the config
    q = _write(tmp_path / "ref.jsonl", json.dumps({"prompts": ["x", "y"]}) + "\n")
    assert D.MultiPromptSource(q, default_switch_frames=[40])[0]["switch_frames"].tolist() == [40]


@pytest.mark.parametrize("line, kw, match", [
    ('{"prompts": ["a", "b"], "switch_frames": [21]', {}, "not valid JSON"),
    ('["a", "b"]', {}, "expected a JSON object"),
    ('{"switch_frames": [21]}', {}, "missing key 'prompts'"),
    ('{"prompts": ["a", "b"]}', {}, "missing key 'switch_frames'"),
    ('{"prompts": ["a", 3], "switch_frames": [21]}', {}, "list of strings"),
    ('{"prompts": ["a", "b", "c"], "switch_frames": [39, 21]}', {}, "strictly increasing"),
    ('{"prompts": ["a", "b", "c"], "switch_frames": [21, 21]}', {}, "strictly increasing"),
    ('{"prompts": ["a", "b"], "switch_frames": [0]}', {}, "must be > 0"),
    ('{"prompts": ["a", "b"], "switch_frames": [21.5]}', {}, "list of integers"),
    ('{"prompts": ["a", "b", "c"], "switch_frames": [21]}', {}, "need 2 switch frames"),
    ('{"prompts": ["a", "b"], "switch_frames": [240]}', {"num_frames": 240}, "past the last frame"),
    ('{"prompts": ["a", "b"], "switch_frames": [40]}', {"chunk_frames": 3}, "not multiples of the chunk size 3"),
    ('{"prompts": ["a", "b", "c", "d"], "switch_frames": [3, 6, 9]}', {}, "every line needs the same number"),
])
def test_multi_prompt_jsonl_errors_name_file_and_line(tmp_path, line, kw, match):
    good = json.dumps({"prompts": ["a", "b", "c"], "switch_frames": [21, 39]})
    p = _write(tmp_path / "bad.jsonl", f"{good}\n\n{line}\n")
    with pytest.raises(D.DataError, match=match) as e:
        D.MultiPromptSource(p, **kw)
    assert f"bad.jsonl:3:" in str(e.value)


# --------------------------------------------------------------------------------------------------
# text-embedding cache
# --------------------------------------------------------------------------------------------------

CALLS: list[list[str]] = []


def fake_encode(prompts: list[str]) -> np.ndarray:
    """Deterministic per prompt; rows past a prompt-dependent length are 0 (like the UMT5 front end)."""
    CALLS.append(list(prompts))
    out = np.zeros((len(prompts), L, DIM), np.float32)
    for i, p in enumerate(prompts):
        seed = int.from_bytes(hashlib.sha256(p.encode()).digest()[:4], "little")
        n = len(p) % L + 1 if p else 0
        out[i, :n] = np.random.default_rng(seed).standard_normal((n, DIM))
    return out


def fake_factory():
    return fake_encode


def test_build_and_read_cache(tmp_path):
    CALLS.clear()
    prompts = ["a cat", "the dog runs", "a cat", "", "zebra"]
    out = D.build_cache(prompts, tmp_path / "c32", fake_encode, batch_size=2, dtype="float32", shard_rows=5)
    assert sorted(sum(CALLS, [])) == sorted(set(prompts))  # each distinct prompt encoded once
    cache = D.TextEmbeddingCache(out)
    assert len(cache) == 4 and (cache.text_len, cache.dim) == (L, DIM) and "zebra" in cache
    np.testing.assert_array_equal(cache.lookup(prompts), fake_encode(prompts))  # exact, padding rows included
    assert len([f for f in os.listdir(out) if f.startswith("rows-")]) > 1  # several shards
    c16 = D.TextEmbeddingCache(D.build_cache(prompts, tmp_path / "c16", fake_encode, dtype="bfloat16"),
                               as_dtype=np.float32)
    import ml_dtypes

    want = fake_encode(prompts).astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(c16.lookup(prompts), want)
    with pytest.raises(D.DataError, match="not in the text-embedding cache"):
        cache["never encoded"]
    with pytest.raises(FileExistsError):
        D.build_cache(prompts, out, fake_encode)
    with pytest.raises(D.DataError, match="not a text-embedding cache"):
        D.TextEmbeddingCache(tmp_path)


def test_text_cache_cli_and_cached_source(tmp_path, capsys):
    base = _write(tmp_path / "v.txt", "p0\np1\n")
    sw = _write(tmp_path / "v_switch.txt", "s0\ns1\n")
    jl = _write(tmp_path / "m.jsonl", json.dumps({"prompts": ["p0", "m1"], "switch_frames": [21]}) + "\n")
    out = str(tmp_path / "cache")
    rc = text_cache.main(["build", "--prompts", base, sw, jl, "--out", out, "--encoder-factory",
                          f"{__name__}:fake_factory", "--dtype", "float32", "--batch-size", "3"])
    assert rc == 0
    cache = D.TextEmbeddingCache(out)
    assert set(cache.prompts) == {"p0", "p1", "s0", "s1", "m1", NEGATIVE_PROMPT}
    assert text_cache.main(["info", out]) == 0 and '"prompts": 6' in capsys.readouterr().out
    src = D.CachedEmbeddingSource(D.SwitchPromptSource(base, sw), cache)
    rec = src[1]
    np.testing.assert_array_equal(rec["prompt_embeds"], fake_encode(["p1"])[0])
    np.testing.assert_array_equal(rec["switch_prompt_embeds"], fake_encode(["s1"])[0])
    multi = D.CachedEmbeddingSource(D.MultiPromptSource(jl), cache)[0]
    assert multi["prompts_list_embeds"].shape == (2, L, DIM)
    with pytest.raises(D.DataError, match="not in the cache"):
        D.CachedEmbeddingSource(D.PromptSource(_write(tmp_path / "new.txt", "unseen\n")), cache)
    batch = next(D.make_loader(src, 2, seed=0, shard_index=0, shard_count=1, num_threads=1))
    assert batch["prompt_embeds"].shape == (2, L, DIM) and batch["switch_prompts"].shape == (2,)


def test_text_cache_cli_default_encoder_wiring(tmp_path, monkeypatch):
    from memflow_jax.text import encoder as enc_mod

    seen = {}

    class FakeEncoder:
        def encode_numpy(self, prompts):
            return fake_encode(prompts)

        def clear_cache(self):
            seen["cleared"] = True

    def from_checkpoint(tokenizer_dir, checkpoint_path, cfg, **kw):
        seen.update(tok=tokenizer_dir, ckpt=checkpoint_path, text_len=cfg.text_len, kw=kw)
        return FakeEncoder()

    monkeypatch.setattr(enc_mod.TextEncoder, "from_checkpoint", staticmethod(from_checkpoint))
    p = _write(tmp_path / "p.txt", "x\ny\n")
    out = str(tmp_path / "c")
    assert text_cache.main(["build", "--prompts", p, "--out", out, "--encoder-ckpt", "enc.pth", "--tokenizer-dir",
                            "tok", "--set", "text.text_len=6", "--no-negative-prompt", "--batch-size", "2"]) == 0
    assert seen == {"tok": "tok", "ckpt": "enc.pth", "text_len": 6, "kw": {"batch_size": 2}, "cleared": True}
    assert D.TextEmbeddingCache(out).prompts == ["x", "y"]


# --------------------------------------------------------------------------------------------------
# latents
# --------------------------------------------------------------------------------------------------

LAT = (3, 2, 4, 4)  # [F, C, H, W]


def _lat(i, shape=LAT):
    return np.full(shape, float(i), np.float32)


def test_latent_files_and_manifest(tmp_path):
    from safetensors.numpy import save_file

    d = tmp_path / "lat"
    d.mkdir()
    np.savez(d / "a.npz", latents=_lat(0), prompt=np.asarray("prompt a"))
    save_file({"latents": _lat(1)}, str(d / "b.safetensors"), metadata={"prompt": "prompt b"})
    np.save(d / "c.npy", _lat(2))
    src = D.LatentSource(d, require_prompt=False, shape=LAT)
    assert len(src) == 3
    assert [src[i]["prompts"] for i in range(3)] == ["prompt a", "prompt b", ""]
    np.testing.assert_array_equal(src[1]["latents"], _lat(1))
    with pytest.raises(D.DataError, match=r"c\.npy: no prompt"):
        D.LatentSource(d)[2]
    man = _write(tmp_path / "m.jsonl", "\n".join(json.dumps({"path": f"lat/{n}", "prompt": f"P{n}"})
                                                 for n in ("c.npy", "a.npz")) + "\n")
    msrc = D.LatentSource.from_manifest(man)
    assert msrc[0]["prompts"] == "Pc.npy" and float(msrc[1]["latents"][0, 0, 0, 0]) == 0.0
    _write(tmp_path / "m2.jsonl", json.dumps({"path": "lat/c.npy"}) + "\n")
    with pytest.raises(D.DataError, match=r"m2\.jsonl:1: missing string key 'prompt'"):
        D.LatentSource.from_manifest(tmp_path / "m2.jsonl")
    np.save(d / "c.npy", _lat(2, (3, 2, 4)))
    with pytest.raises(D.DataError, match=r"c\.npy: 'latents' has shape \(3, 2, 4\), expected 4 dims"):
        D.LatentSource(d, require_prompt=False)[2]
    with pytest.raises(D.DataError, match="no latent files"):
        D.LatentSource(str(tmp_path / "nothing*.npy"))


def test_ode_pairs_and_array_record(tmp_path):
    traj = np.stack([_lat(t) for t in (3, 2, 1, 0)])  # [S=4, F, C, H, W]; [-1] is the clean latent
    np.savez(tmp_path / "o.npz", ode_latent=traj, prompt=np.asarray("ode prompt"))
    np.savez(tmp_path / "short.npz", ode_latent=traj[:1], prompt=np.asarray("x"))
    src = D.OdeTrajectorySource([tmp_path / "o.npz", tmp_path / "short.npz"])
    rec = src[0]
    assert rec["ode_latent"].shape == (4,) + LAT and rec["prompts"] == "ode prompt"
    assert float(rec["ode_latent"][-1].max()) == 0.0
    with pytest.raises(D.DataError, match=r"short\.npz: ode_latent has 1 trajectory states"):
        src[1]
    path = str(tmp_path / "lat.array_record")
    n = D.write_array_record(path, ({"latents": _lat(i), "prompts": f"p{i}"} for i in range(5)))
    ar = D.ArrayRecordSource(path, field="latents", shape=LAT)
    assert n == 5 and len(ar) == 5
    assert ar[3]["prompts"] == "p3" and int(ar[3]["idx"]) == 3
    np.testing.assert_array_equal(ar[3]["latents"], _lat(3))
    batch = next(D.make_loader(ar, 2, shuffle=False, shard_index=1, shard_count=2, num_threads=1))
    assert batch["latents"].shape == (2,) + LAT and batch["idx"].tolist() == [1, 3]


# --------------------------------------------------------------------------------------------------
# loader
# --------------------------------------------------------------------------------------------------


def _ids(it, n):
    return [next(it)["idx"].tolist() for _ in range(n)]


def test_loader_determinism_and_reshuffle(tmp_path):
    src = D.PromptSource(_write(tmp_path / "p.txt", "".join(f"prompt {i}\n" for i in range(12))))
    mk = lambda seed: D.make_loader(src, 4, seed=seed, shard_index=0, shard_count=1, num_threads=2)  # noqa: E731
    a, b = _ids(mk(7), 6), _ids(mk(7), 6)
    assert a == b  # same seed, same order
    assert a != _ids(mk(8), 6)
    epochs = [sorted(sum(a[i:i + 3], [])) for i in (0, 3)]
    assert epochs == [list(range(12))] * 2  # each epoch is a permutation ...
    assert sum(a[:3], []) != sum(a[3:], [])  # ... reshuffled per epoch
    plain = D.make_loader(src, 5, shuffle=False, num_epochs=2, shard_index=0, shard_count=1, num_threads=1)
    got = [b["idx"].tolist() for b in plain]  # finite: 24 records -> 4 full batches, remainder dropped
    assert got == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9], [10, 11, 0, 1, 2], [3, 4, 5, 6, 7]]


def test_loader_process_sharding(tmp_path):
    src = D.PromptSource(_write(tmp_path / "p.txt", "".join(f"prompt {i}\n" for i in range(11))))
    shards = [_ids(D.make_loader(src, 3, seed=1, shard_index=k, shard_count=3, num_threads=1), 2) for k in range(3)]
    epoch0 = [sum(s, [])[:3] for s in shards]  # 11 // 3 = 3 records per shard per epoch (reference drop_last)
    flat = sum(epoch0, [])
    assert len(set(flat)) == 9  # disjoint shards of one shared permutation
    for s in shards:
        assert len(set(sum(s, [])[3:6])) == 3
    with pytest.raises(ValueError, match="fewer than the 12 shards"):
        D.make_loader(src, 1, shard_index=0, shard_count=12)
    with pytest.raises(ValueError, match="shard_index"):
        D.make_loader(src, 1, shard_index=3, shard_count=3)


def test_loader_state_round_trip_resumes_exactly(tmp_path):
    p = _write(tmp_path / "m.jsonl", "".join(
        json.dumps({"prompts": [f"a{i}", f"b{i}"], "switch_frames": [21]}) + "\n" for i in range(9)))
    src = D.MultiPromptSource(p)
    mk = lambda: D.make_loader(src, 2, seed=5, shard_index=1, shard_count=2, num_threads=2)  # noqa: E731
    it = mk()
    _ids(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # JSON round trip
    rest = [next(it) for _ in range(5)]  # crosses epochs (4 records per shard)
    resumed = mk()
    resumed.set_state(state)
    for want in rest:
        got = next(resumed)
        np.testing.assert_array_equal(got["idx"], want["idx"])
        np.testing.assert_array_equal(got["prompts_list"], want["prompts_list"])
        assert got["prompts_list"].shape == (2, 2) and got["switch_frames"].shape == (2, 1)


def test_sources_do_not_import_grain():
    code = ("import sys, memflow_jax.data as d; import memflow_jax.data.text_cache; "
            "assert 'grain' not in sys.modules, 'grain imported'")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
