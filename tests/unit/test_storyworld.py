"""Storyworld: determinism, shapes, captions vs hidden attributes, narratives, export round trip, metrics."""
from __future__ import annotations

import dataclasses
import json
import os
import pickle

import chex
import numpy as np
import pytest

from memflow_jax.storyworld import captions as C
from memflow_jax.storyworld import dataset as D
from memflow_jax.storyworld import metrics as M
from memflow_jax.storyworld import render as R
from memflow_jax.storyworld import scene as S
from memflow_jax.storyworld import scripts as SC


def _script(seed: int = 0, **kw) -> S.Script:
    return SC.sample_script(np.random.default_rng(seed), **kw)


def _story(seed: int = 0, **kw):
    """A script with at least 2 objects, its render and annotations."""
    script = _script(seed, num_segments=4, num_objects=2, **kw)
    video, ann = R.render_video(script, seed)
    return script, video, ann


# --------------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------------


def test_render_deterministic_and_shapes():
    script = _script(1)
    assert script == _script(1)
    v1, a1 = R.render_video(script, seed=7)
    v2, a2 = R.render_video(_script(1), seed=7)
    T, N = script.num_frames, len(script.objects)
    chex.assert_shape(v1, (T, 64, 64, 3))
    assert v1.dtype == np.uint8
    np.testing.assert_array_equal(v1, v2)
    for k in a1:
        np.testing.assert_array_equal(a1[k], a2[k])
    chex.assert_shape([a1["visible"], a1["visible_fraction"], a1["in_scene"]], (T, N))
    chex.assert_shape(a1["bbox"], (T, N, 4))
    chex.assert_shape(a1["centre"], (T, N, 2))
    chex.assert_shape(a1["id_map"], (T, 64, 64))
    chex.assert_shape([a1["segment_id"], a1["background_id"]], (T,))
    np.testing.assert_array_equal(a1["start_frames"], script.start_frames)
    assert int(a1["fps"]) == 16
    # another resolution / length; a different seed changes only the hidden attributes
    v3, a3 = R.render_video(script, seed=7, num_frames=20, height=48, width=80)
    chex.assert_shape(v3, (20, 48, 80, 3))
    other = next(sd for sd in range(8, 40) if S.sample_hidden(script, sd) != S.sample_hidden(script, 7))
    v4, a4 = R.render_video(script, seed=other)
    np.testing.assert_array_equal(a4["id_map"], a1["id_map"])  # hidden attributes change colours only ...
    assert np.any(v4 != v1) and np.all(v4[a1["id_map"] == 0] == v1[a1["id_map"] == 0])  # ... of objects
    # single-frame API agrees with the video
    state = S.compile_script(script, S.sample_hidden(script, 7))
    np.testing.assert_array_equal(R.render(state, 5, 64, 64), v1[5])


@pytest.mark.parametrize("hw", [(60, 64), (64, 12), (0, 64)])
def test_render_rejects_bad_resolution(hw):
    with pytest.raises(ValueError, match="multiple of 8"):
        R.render_video(_script(0), 0, height=hw[0], width=hw[1])


def test_render_rejects_too_many_frames():
    script = _script(0)
    with pytest.raises(S.SceneError, match="num_frames"):
        R.render_video(script, 0, num_frames=script.num_frames + 1)


def test_annotations_match_pixels():
    script, video, ann = _story(3)
    hidden = S.sample_hidden(script, 3)
    for k, (obj, h) in enumerate(zip(script.objects, hidden)):
        pix = video[ann["id_map"] == k + 1]  # [P, 3]
        base = S.object_rgb(obj.colour, h.hue_offset)
        dark = S.object_rgb(obj.colour, h.hue_offset, S.PATTERN_VALUE)
        assert pix.shape[0] > 0
        is_dark = np.all(pix == dark, -1)
        assert np.all(np.all(pix == base, -1) | is_dark)
        assert is_dark.any() == (h.pattern != "solid")
        ts = np.nonzero(ann["visible"][:, k])[0]
        for t in ts[:: max(1, len(ts) // 5)]:
            ys, xs = np.nonzero(ann["id_map"][t] == k + 1)
            x0, y0, x1, y1 = ann["bbox"][t, k]
            assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
        np.testing.assert_allclose(ann["hue"][k], (S.OBJECT_HUES[obj.colour_id] + h.hue_offset) % 360)
    # background pixels are the segment's palette colour or its texture colour
    for t in (0, len(video) - 1):
        bg_name = S.BACKGROUND_COLOURS[ann["background_id"][t]]
        pix = video[t][ann["id_map"][t] == 0]
        ok = np.all(pix == S.BACKGROUND_RGB[ann["background_id"][t]], -1) | np.all(pix == S.texture_rgb(bg_name), -1)
        assert ok.all()
    # objects that are in frame are never occluded by the sampler's layout
    b = ann["bbox"]
    inside = (b[..., 0] > 0) & (b[..., 1] > 0) & (b[..., 2] < 64) & (b[..., 3] < 64)
    np.testing.assert_array_equal(ann["visible_fraction"][inside], 1.0)


# --------------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------------


def test_captions_never_state_the_hidden_attribute():
    hidden_words = {"hue", "offset", "pattern", "spots", "spotted", "stripes", "hstripes", "vstripes", "solid",
                    "shade", "tint"}
    assert not hidden_words & set(C.VOCABULARY)
    assert not any(ch.isdigit() for w in C.VOCABULARY for ch in w)
    for seed in range(20):
        script = SC.sample_script(np.random.default_rng(seed)) if seed % 2 else SC.sample_clip(
            np.random.default_rng(seed))
        prompts = C.script_prompts(script)
        # captions are a function of the script alone: render seeds (= hidden attributes) cannot change them
        hid_a, hid_b = S.sample_hidden(script, 0), S.sample_hidden(script, 12345)
        assert len(hid_a) == len(script.objects) == len(hid_b)
        assert prompts == C.script_prompts(dataclasses.replace(script))
        for p in prompts:
            toks = C.tokenize(p)
            assert toks and set(toks) <= set(C.VOCABULARY), p
            assert "\n" not in p


def test_caption_templates():
    obj = S.ObjectSpec("circle", "red", "small")
    seg0 = S.Segment(10, S.Background("sand"), (S.ObjectAction("right", (0.3, 0.5), (0.6, 0.5)),))
    seg1 = S.Segment(10, S.Background("navy"), (S.ObjectAction("leave", (0.6, 0.5), (1.2, 0.5), "right"),), "change")
    seg2 = S.Segment(10, S.Background("sand", "stripes"),
                     (S.ObjectAction("return", (-0.2, 0.5), (0.5, 0.5), "left"),), "revert")
    seg3 = S.Segment(10, S.Background("sand", "dots"), (S.ObjectAction("absent"),))
    script = S.Script((obj,), (seg0, seg1, seg2, seg3))
    assert C.script_prompts(script) == [
        "a small red circle moves right on a sand background",
        "the small red circle leaves to the right. the background turns navy",
        "the small red circle comes back from the left. the background turns back to sand",
        "nothing moves on a dotted sand background",
    ]
    assert C.tokenize("the red circle leaves. a") == ["the", "red", "circle", "leaves", ".", "a"]


# --------------------------------------------------------------------------------------------------
# Narratives
# --------------------------------------------------------------------------------------------------


def test_scripts_contain_leave_and_return():
    for seed in range(40):
        script = _script(seed)
        assert 3 <= len(script.segments) <= 6
        events = SC.returning_objects(script)
        assert events, f"seed {seed}: no object leaves and comes back"
        k, leave, ret = events[0]
        assert script.segments[0].actions[k].kind != "absent"  # seen before it leaves
        assert leave < ret
        prompts = C.script_prompts(script)
        assert "leaves to the" in prompts[leave] and "comes back from the" in prompts[ret]
        kinds = [s.bg_event for s in script.segments]
        assert kinds.count("change") == kinds.count("revert") <= 1
        if "change" in kinds:
            c, r = kinds.index("change"), kinds.index("revert")
            assert c < r and script.segments[r].background == script.segments[0].background
            assert script.segments[c].background.colour != script.segments[0].background.colour
        assert all(S.INNER_LO - 1e-9 <= v <= S.INNER_HI + 1e-9
                   for seg in script.segments for a in seg.actions if a.kind in S.MOTIONS for v in a.end)
    # the ground truth shows the returning object whole before the gap and after it
    script, video, ann = _story(5)
    k = SC.returning_objects(script)[0][0]
    runs = M._runs(ann["visible"][:, k])
    assert len(runs) >= 2
    assert (ann["visible_fraction"][runs[0][0]:runs[0][1], k] == 1).any()
    assert (ann["visible_fraction"][runs[1][0]:runs[1][1], k] == 1).any()


def test_late_memory_scripts_hide_the_returning_object_from_the_sink():
    """p_late_memory=1 (4+ segments): the object that leaves and comes back is absent in the first segment,
    enters in a later one, is on screen for at least that segment, then leaves and returns; with 3 segments it
    cannot, and p_late_memory=0 draws nothing (the default streams are the ones before the option)."""
    for seed in range(30):
        script = _script(seed, num_segments=4 + seed % 3, p_late_memory=1.0)
        (k, leave, ret), = SC.returning_objects(script)
        kinds = [seg.actions[k].kind for seg in script.segments]
        first = kinds.index("enter")
        assert 1 <= first < leave < ret and kinds[:first] == ["absent"] * first
        assert SC.returns_after_the_start(script)
        prompts = C.script_prompts(script)
        assert "enters from the" in prompts[first] and "leaves to the" in prompts[leave]
        assert "comes back from the" in prompts[ret]
        three = _script(seed, num_segments=3, p_late_memory=1.0)
        assert not SC.returns_after_the_start(three)
        assert _script(seed, p_late_memory=0.0) == _script(seed)
    script, video, ann = _story(3, p_late_memory=1.0)  # the ground truth never shows it in the first segment
    k = SC.returning_objects(script)[0][0]
    assert not ann["visible"][:script.segments[0].duration, k].any()
    with pytest.raises(ValueError, match="p_late_memory"):
        _script(0, p_late_memory=1.5)


def test_script_length_options_and_clips():
    s = _script(2, num_segments=5, num_frames=120, frame_multiple=4)
    assert len(s.segments) == 5 and s.num_frames == 120
    assert all(seg.duration % 4 == 0 and seg.duration >= 16 for seg in s.segments)
    assert len(s.switch_frames) == 4 and s.start_frames[0] == 0
    with pytest.raises(ValueError, match="num_segments"):
        _script(0, num_segments=2)
    with pytest.raises(ValueError, match="num_frames"):
        _script(0, num_segments=6, num_frames=40)
    clip = SC.sample_clip(np.random.default_rng(0), num_frames=24)
    assert len(clip.segments) == 1 and clip.num_frames == 24
    assert S.script_from_dict(json.loads(json.dumps(S.script_to_dict(s)))) == s


# --------------------------------------------------------------------------------------------------
# Export / Grain source
# --------------------------------------------------------------------------------------------------


def _files(root):
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            with open(os.path.join(d, n), "rb") as f:
                out[os.path.relpath(os.path.join(d, n), root)] = f.read()
    return out


def test_encode_decode_roundtrip():
    ex = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.int64(3), "meta": [1, "x"],
          "annotations": {"b": np.ones((2,), bool)}}
    back = D.decode_example(D.encode_example(ex))
    np.testing.assert_array_equal(back["a"], ex["a"])
    assert back["a"].dtype == np.float32 and back["s"] == 3 and back["meta"] == [1, "x"]
    assert back["annotations"]["b"].dtype == bool
    with pytest.raises(ValueError, match="not a storyworld record"):
        D.decode_example(b"garbage-bytes")


@pytest.mark.parametrize("storage", ["arrayrecord", "files"])
def test_export_source_roundtrip(tmp_path, storage):
    kw = dict(kind="scripts", num_examples=3, seed=11, height=32, width=32, storage=storage, num_segments=3)
    a = D.write_dataset(tmp_path / "a", **kw)
    b = D.write_dataset(tmp_path / "b", **kw)
    fa = _files(a)
    assert fa == _files(b)  # same seed -> byte-identical export
    src = D.StoryworldSource(a)
    assert len(src) == 3 and src.storage == storage
    for i in range(3):
        ex = src[i]
        ref = D.make_example("scripts", i, 11, 32, 32, 16, {"num_segments": 3})
        np.testing.assert_array_equal(ex["video"], ref["video"])
        assert ex["video"].dtype == np.uint8
        assert ex["prompts"] == ref["prompts"] and ex["start_frames"] == ref["start_frames"]
        assert ex["seed"] == ref["seed"] and ex["index"] == i
        for k, v in ref["annotations"].items():
            np.testing.assert_array_equal(ex["annotations"][k], v)
        # the stored script re-renders to the stored video
        v, _ = R.render_video(S.script_from_dict(ex["script"]), ex["seed"], height=32, width=32)
        np.testing.assert_array_equal(v, ex["video"])
    with pytest.raises(IndexError):
        src[3]
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(src))[-1]["video"], src[2]["video"])
    # prompt files in the reference's formats
    lines = fa["prompts.txt"].decode().splitlines()
    switch = fa["switch_prompts.txt"].decode().splitlines()
    scripts = [json.loads(x) for x in fa["scripts.jsonl"].decode().splitlines()]
    assert len(lines) == len(switch) == len(scripts) == 3
    for i, rec in enumerate(scripts):
        assert rec["prompts"][0] == lines[i] and rec["prompts"][1] == switch[i]
        assert len(rec["switch_frames"]) == len(rec["prompts"]) - 1 == 2
    assert fa["vocab.txt"].decode().splitlines() == list(C.VOCABULARY)


def test_stories_export_is_on_the_chunk_grid(tmp_path):
    """kind=stories: every segment boundary starts a latent chunk, every story has a returning object, and
    segment_prompts.txt lists every segment's prompt once (the text cache's input)."""
    num_latent, chunk, stride = 12, 3, 4
    path = D.write_dataset(tmp_path / "st", kind="stories", num_examples=3, seed=5, height=32, width=32,
                           storage="files", num_latent=num_latent, chunk=chunk, t_stride=stride)
    src = D.StoryworldSource(path)
    every = []
    for i in range(3):
        ex = src[i]
        assert ex["num_frames"] == SC.video_frames(num_latent, stride) == ex["video"].shape[0]
        assert ex["latent_switch_frames"] == [SC.video_to_latent_start(v, stride) for v in ex["switch_frames"]]
        assert all(f % chunk == 0 and 0 < f < num_latent for f in ex["latent_switch_frames"])
        assert SC.returning_objects(S.script_from_dict(ex["script"]))
        every += ex["prompts"]
    listed = (tmp_path / "st" / "segment_prompts.txt").read_text().splitlines()
    assert sorted(listed) == sorted(set(every)) and len(listed) == len(set(listed))
    with pytest.raises(ValueError, match="num_latent"):
        D.write_dataset(tmp_path / "bad", kind="stories", num_examples=1, height=32, width=32)
    # --p-late-memory reaches the stories' scripts (36 latent frames: 3-6 segments, the 4+ ones late)
    late = [D.make_example("stories", i, 5, 32, 32, sampler_kwargs=dict(num_latent=36, chunk=3, t_stride=4,
                                                                         p_late_memory=1.0)) for i in range(6)]
    scripts = [S.script_from_dict(ex["script"]) for ex in late]
    assert all(SC.returns_after_the_start(sc) == (len(sc.segments) >= 4) for sc in scripts)
    assert any(len(sc.segments) >= 4 for sc in scripts)


def test_stories_with_long_absences_and_their_returns(tmp_path):
    """min_absent: every return of every story is off screen >= that many latent frames; latent_returns
    (recorded in the index) gives each return's object, the latent frame its segment starts (a switch frame)
    and its absence; min_absent=0 keeps the stories drawn before the option."""
    kw = dict(num_latent=36, chunk=3, t_stride=4)
    same = 0
    for seed in range(8):
        script = SC.sample_aligned_script(np.random.default_rng(seed), min_absent=9, **kw)
        rets = SC.latent_returns(script, 4, 3)
        assert rets and [(k, a) for k, _, a in rets] == [(k, SC.absent_latent_frames(script, k, 4))
                                                         for k, _, _ in SC.returning_objects(script)]
        switches = SC.latent_switches(script, 4, 3)
        for (k, start, absent), (_, leave, ret) in zip(rets, SC.returning_objects(script)):
            # off screen = the segments between the exit's and the return's: from the one after the exit's start
            assert absent >= 9 and start == switches[ret - 1] and absent == start - switches[leave]
        first = SC.sample_aligned_script(np.random.default_rng(seed), **kw)  # the one draw of min_absent=0
        if min(a for _, _, a in SC.latent_returns(first, 4, 3)) >= 9:
            assert first == script  # the first draw qualified: the same story
            same += 1
    assert same  # (seeds 2 and 3)
    with pytest.raises(ValueError, match="at most 27"):
        SC.sample_aligned_script(np.random.default_rng(0), min_absent=28, **kw)
    with pytest.raises(ValueError, match="must be >= 0"):
        SC.sample_aligned_script(np.random.default_rng(0), min_absent=-1, **kw)
    path = D.write_dataset(tmp_path / "st", kind="stories", num_examples=3, seed=5, height=32, width=32,
                           storage="files", min_absent=9, **kw)
    for rec, i in zip(D.StoryworldSource(path).index_records(), range(3)):
        script = S.script_from_dict(D.StoryworldSource(path)[i]["script"])
        assert rec["latent_returns"] == [list(r) for r in SC.latent_returns(script, 4, 3)]
        assert all(a >= 9 for _, _, a in rec["latent_returns"])


def test_grain_map_dataset_reads_source(tmp_path):
    import grain
    path = D.write_dataset(tmp_path / "clips", kind="clips", num_examples=2, seed=0, height=32, width=32,
                           num_frames=8)
    ds = grain.MapDataset.source(D.StoryworldSource(path)).map(lambda ex: ex["video"].shape)
    assert list(ds) == [(8, 32, 32, 3)] * 2


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------


def test_metrics_ground_truth_is_perfect():
    script, video, ann = _story(0)
    res = M.evaluate(video, ann)
    assert res["adherence"] == 1.0
    assert {"present", "shape", "background"} <= set(res["adherence_detail"])
    assert len(res["consistency"]) >= 1
    for rec in res["consistency"]:
        assert rec["passed"] and rec["distance"] < 0.1 and rec["hue_distance"] < 1.0
    # another resolution (nearest 2x upsampling) scores the same
    up = video.repeat(2, axis=1).repeat(2, axis=2)
    assert M.prompt_adherence(up, ann)["mean"] == 1.0
    assert 0.0 < res["smoothness"] < 0.05


def test_metrics_detect_wrong_colour_and_background():
    script, video, ann = _story(0)
    k = 0
    other = next(c for c in S.OBJECT_COLOURS if c not in {o.colour for o in script.objects})
    objs = list(script.objects)
    objs[k] = dataclasses.replace(objs[k], colour=other)
    bad, _ = R.render_video(dataclasses.replace(script, objects=tuple(objs)), 0)
    res = M.prompt_adherence(bad, ann)
    assert res["present"] < 0.75 and res["mean"] < 0.9
    # wrong background colour everywhere
    bg_other = next(c for c in S.BACKGROUND_COLOURS if c not in {s.background.colour for s in script.segments})
    segs = tuple(dataclasses.replace(s, background=S.Background(bg_other, s.background.texture))
                 for s in script.segments)
    bad_bg, _ = R.render_video(dataclasses.replace(script, segments=segs), 0)
    assert M.prompt_adherence(bad_bg, ann)["background"] == 0.0
    # a blank video fails presence; mismatched length is a clear error
    blank = np.full_like(video, 128)
    assert M.prompt_adherence(blank, ann)["present"] == 0.0
    with pytest.raises(ValueError, match="frames"):
        M.evaluate(video[:-1], ann)


@pytest.mark.parametrize("change", ["hue", "pattern"])
def test_metrics_detect_swapped_hidden_attribute(change):
    script, video, ann = _story(0)
    k, _, ret = SC.returning_objects(script)[0]
    hidden = list(S.sample_hidden(script, 0))
    h = hidden[k]
    if change == "hue":
        i = S.HUE_OFFSETS.index(h.hue_offset)
        new = S.HUE_OFFSETS[i + 1 if i + 1 < len(S.HUE_OFFSETS) else i - 1]  # the nearest other level
        hidden[k] = S.HiddenAttributes(new, h.pattern)
    else:
        new = S.PATTERNS[(S.PATTERNS.index(h.pattern) + 1) % len(S.PATTERNS)]
        hidden[k] = S.HiddenAttributes(h.hue_offset, new)
    swapped, _ = R.render_video(script, 0, hidden=hidden)
    corrupted = video.copy()
    start = script.start_frames[ret]
    corrupted[start:] = swapped[start:]  # the object comes back with another hidden attribute
    rec = next(r for r in M.reappearance_consistency(corrupted, ann) if r["object"] == k)
    assert not rec["passed"] and rec["distance"] > 1.4
    # each side's look is kept, and look_distance of the two is the record's distance
    got = M.look_distance(rec["hue_before"], rec["pattern_before"], rec["hue_after"], rec["pattern_after"])
    np.testing.assert_allclose(got, (rec["hue_distance"], rec["pattern_distance"], rec["distance"]))
    if change == "hue":
        assert abs(rec["hue_distance"] - 8.0) < 1.0  # HUE_OFFSETS are 8 degrees apart
    # prompt adherence is blind to it (the prompt does not state it)
    assert M.prompt_adherence(corrupted, ann)["mean"] == 1.0



def test_first_appearance_reads_the_hidden_attribute_and_same_look_rate():
    """The first look of every object of a rendered story is its hidden attribute; renders with other hidden
    attributes give other looks, and same_look_rate counts equal looks over pairs."""
    script, video, ann = _story(0)
    looks = {}
    for k in range(len(script.objects)):
        h, p = M.first_appearance(video, ann, k)
        want = S.OBJECT_HUES[S.OBJECT_COLOURS.index(script.objects[k].colour)] + ann["hue_offset"][k]
        assert float(M.hue_distance(h, want)) < 1.0
        looks[k] = [(h, p)] * 3  # one look for every seed: every pair is the same look
    assert M.same_look_rate(looks) == (3 * len(looks), 1.0)
    # the same script with every object's hidden hue moved to another level: no pair of the two renders matches
    hidden = [S.HiddenAttributes(S.HUE_OFFSETS[(S.HUE_OFFSETS.index(h) + 2) % len(S.HUE_OFFSETS)], p.pattern)
              for h, p in zip(ann["hue_offset"], S.sample_hidden(script, 0))]
    other, _ = R.render_video(script, 0, hidden=hidden)
    pairs = {k: [M.first_appearance(video, ann, k), M.first_appearance(other, ann, k)] for k in looks}
    assert M.same_look_rate(pairs) == (len(looks), 0.0)
    assert M.same_look_rate({})[0] == 0 and np.isnan(M.same_look_rate({})[1])
    blank = np.zeros_like(video)  # an object never drawn has no first look
    assert M.first_appearance(blank, ann, 0) is None


def test_reappearance_needs_the_objects_shape():
    """A returning object's colour without its shape (e.g. colour noise) is not measured as the object."""
    script, video, ann = _story(0)
    k, _, ret = SC.returning_objects(script)[0]
    objs = list(script.objects)
    other = next(sh for sh in S.SHAPES if sh != objs[k].shape)
    objs[k] = dataclasses.replace(objs[k], shape=other)
    reshaped, _ = R.render_video(dataclasses.replace(script, objects=tuple(objs)), 0,
                                 hidden=S.sample_hidden(script, 0))
    corrupted = video.copy()
    start = script.start_frames[ret]
    corrupted[start:] = reshaped[start:]
    rec = next(r for r in M.reappearance_consistency(corrupted, ann) if r["object"] == k)
    assert rec["frames_before"] > 0 and rec["frames_after"] == 0 and not rec["passed"]
    assert rec["pattern_before"] is not None and rec["pattern_after"] is None and np.isnan(rec["hue_after"])

def test_temporal_smoothness():
    _, video, _ = _story(1)
    shuffled = video[np.random.default_rng(0).permutation(len(video))]
    assert M.temporal_smoothness(video) < M.temporal_smoothness(shuffled)
    assert M.temporal_smoothness(np.repeat(video[:1], 4, 0)) == 0.0
    v = np.zeros((2, 8, 8, 3), np.uint8)
    v[1] = 255
    assert M.temporal_smoothness(v) == 1.0
