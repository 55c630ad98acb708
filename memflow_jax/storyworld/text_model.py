"""The storyworld demo's text front end: a sentencepiece tokenizer trained on the world's captions and a small
UMT5 encoder, saved as a converted checkpoint (component ``t5`` + ``tokenizer/`` + ``config.json``)::

    python -m memflow_jax.storyworld.text_model --config configs/storyworld.yaml --out runs/storyworld/art/text

Steps (deterministic: the same ``--seed`` and options give byte-identical ``spiece.model`` and identical params):

1. Corpus: ``--num-captions`` prompts from the storyworld samplers (clips and multi-prompt scripts alternate,
   sampled as the ``data`` stage of ``train_demo.sh`` samples them), plus a few captions of the longest structure
   the caption templates can produce (an object comes back while two others enter and the background turns
   back: 31 words + 3 sentence separators), so the length check covers the worst case at any corpus size, and
   54 captions that use every palette word (every caption word is then a whole piece however small the corpus).
   The negative prompt ``""`` needs no corpus entry: it encodes to ``</s>`` alone (checked).
2. Tokenizer: sentencepiece BPE, ``--vocab-size`` pieces (default ``text.vocab_size``) including the T5 special
   ids ``<pad>``=0, ``</s>``=1, ``<unk>``=2 (no ``<s>``), case-folding NFKC normalisation, one thread, no input
   sampling or shuffling. Pieces never cross whitespace (so every caption word is one piece: colour, shape, size
   and motion words keep their own embeddings, which multi-word pieces like ``▁red▁circle`` would entangle), but
   may cross scripts, so the sentence separator joins the word before it (``▁left.``): the longest template
   caption is 31 pieces + ``</s>`` = 32 = ``text.text_len``; with ``.`` as its own piece it would need 35.
   BPE rather than unigram: on this closed ~40-word corpus sentencepiece's unigram trainer stops at ~67 mostly
   single-character pieces (95 tokens for the longest caption). Written as ``tokenizer/`` (``spiece.model``,
   ``tokenizer_config.json``, ``special_tokens_map.json``) for :class:`memflow_jax.text.tokenizer.UMT5Tokenizer`;
   the build fails, naming the caption, if any caption does not fit ``text_len``.
3. Encoder: UMT5 params from ``text.*`` initialised with the seed, then by default *pretrained* for
   ``--pretrain-steps`` (default 1500: ~25 s on 2 CPU cores; the whole default build ~40 s) on a cheap
   supervised binding objective: from every token's output feature, linear heads predict the size / colour /
   shape / action / side / article of the object its sentence describes (class 0 for sentences about no object)
   and the caption's background colour / texture / event. Why: the DiT reads the text through cross-attention, i.e. through convex combinations of
   (projected) token features. With a random encoder a token's feature holds its own word but hardly its
   sentence's: the "red" token does not say that the red object moves left, so the DiT would have to learn the
   binding itself from the video loss. After pretraining, attending to any token of a sentence reads that
   object's whole description. Measured with the same ridge-regression linear probe on frozen per-token
   features (2000 captions, 1000 held-out captions; ``config.json`` -> ``text_model.probe``), seed 0 defaults:
   per-token object-head accuracy 0.65 (random encoder) -> 1.00 (pretrained), captions with every head of every
   token right 0.00 -> 0.98. ``--pretrain-steps 0`` keeps the frozen random-feature encoder. Either way the
   encoder stays frozen in every later stage (only the DiT trains).

Everything (tokenizer + params + config dict with every section of ``--config`` + build metadata) is written
atomically with :func:`memflow_jax.convert.common.save_converted`; ``storyworld.package`` later merges it with
the DiT and VAE. ``config.json`` also records ``negative_prompt: ""`` (the demo's unconditional prompt), which
``memflow_jax.data.text_cache build --converted-ckpt`` caches by default.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

import numpy as np

from memflow_jax import config as config_lib
from memflow_jax.config import TextConfig
from memflow_jax.storyworld import captions as C
from memflow_jax.storyworld import scene as S
from memflow_jax.storyworld import scripts as SC

DEFAULT_NUM_CAPTIONS = 10000
DEFAULT_PRETRAIN_STEPS = 1500
TOKENIZER_DIR = "tokenizer"
NEGATIVE_PROMPT = ""  # the demo's unconditional prompt (configs/storyworld_*.yaml train.negative_prompt)
MAX_SLOTS = 3  # objects a caption can mention (scripts.sample_* allow at most 3)
# as the `data` stage of train_demo.sh samples them (captions barely depend on durations)
CLIP_KWARGS: dict[str, Any] = {"num_frames": 33}
SCRIPT_KWARGS: dict[str, Any] = {"segment_frames": (24, 48), "frame_multiple": 12}
PROBE_TRAIN_CAPTIONS = 2000  # linear probe: captions it is fitted on / evaluated on (held out)
PROBE_EVAL_CAPTIONS = 1000
NUM_LONGEST = 32  # captions of the longest template structure added to every corpus

PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
SPECIAL_TOKENS = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}

_ACTIONS = S.MOTIONS + S.EVENTS  # an object's action in a caption (absent objects are not mentioned)
# Pretraining heads, predicted from every token's output feature. Object heads: the object of the token's
# sentence (class 0: the sentence mentions no object, e.g. "the background turns navy"); background heads: the
# caption's background (texture class 0: not stated).
OBJECT_HEADS: tuple[tuple[str, int], ...] = (
    ("size", len(S.SIZES) + 1), ("colour", len(S.OBJECT_COLOURS) + 1), ("shape", len(S.SHAPES) + 1),
    ("action", len(_ACTIONS) + 1), ("side", len(S.SIDES) + 2), ("article", 3))  # side 1: a motion; article 1: "a"
BG_HEADS: tuple[tuple[str, int], ...] = (
    ("bg_colour", len(S.BACKGROUND_COLOURS)), ("bg_texture", len(S.TEXTURES) + 1),
    ("bg_event", len(S.BACKGROUND_EVENTS)))
HEADS = OBJECT_HEADS + BG_HEADS
LABEL_WIDTH = MAX_SLOTS * len(OBJECT_HEADS) + len(BG_HEADS)  # caption_labels: objects in mention order, bg


class TextModelError(ValueError):
    """A tokenizer / corpus / config combination that cannot make a working text model."""


# --------------------------------------------------------------------------------------------------
# Corpus
# --------------------------------------------------------------------------------------------------


def caption_labels(script: S.Script, index: int) -> np.ndarray:
    """What the prompt of segment ``index`` states: ``[LABEL_WIDTH]`` int32 = for each of ``MAX_SLOTS`` mention
    slots the :data:`OBJECT_HEADS` classes (all 0 past the last mentioned object), then :data:`BG_HEADS`.

    Mirrors :func:`captions.segment_sentences`: sentence k describes the k-th present object (object order),
    with "the" for objects shown in an earlier segment; the background texture is stated only when the
    background does not change in this segment.
    """
    seg = script.segments[index]
    shown_before: set[int] = set()
    for prev in script.segments[:index]:
        shown_before |= {k for k, a in enumerate(prev.actions) if a.kind != "absent"}
    present = [k for k, a in enumerate(seg.actions) if a.kind != "absent"]
    if len(present) > MAX_SLOTS:
        raise TextModelError(f"a caption mentions {len(present)} objects; the pretraining labels hold {MAX_SLOTS}")
    out: list[int] = []
    for slot in range(MAX_SLOTS):
        if slot >= len(present):
            out.extend([0] * len(OBJECT_HEADS))
            continue
        k = present[slot]
        obj, act = script.objects[k], seg.actions[k]
        side = S.SIDES.index(act.side) + 1 if act.side else 0  # 0: a motion (no side)
        out.extend([obj.size_id + 1, obj.colour_id + 1, obj.shape_id + 1, _ACTIONS.index(act.kind) + 1,
                    side + 1, 2 if k in shown_before else 1])
    texture = seg.background.texture_id + 1 if seg.bg_event == "" else 0
    out.extend([seg.background.colour_id, texture, S.BACKGROUND_EVENTS.index(seg.bg_event)])
    return np.asarray(out, np.int32)


def longest_structure_scripts(rng: np.random.Generator, n: int = NUM_LONGEST) -> list[S.Script]:
    """Scripts whose last prompt has the longest template structure: one object comes back while two others
    enter and the background turns back (``"the .. comes back from the .. . a .. enters from the .. . a ..
    enters from the .. . the background turns back to .."``). Words are drawn at random from the palettes."""
    out = []
    for _ in range(n):
        cols = rng.choice(len(S.OBJECT_COLOURS), size=MAX_SLOTS, replace=False)
        objs = tuple(S.ObjectSpec(S.SHAPES[int(rng.integers(len(S.SHAPES)))], S.OBJECT_COLOURS[int(c)],
                                  S.SIZES[int(rng.integers(len(S.SIZES)))]) for c in cols)
        bgs = rng.choice(len(S.BACKGROUND_COLOURS), size=2, replace=False)
        tex = S.TEXTURES[int(rng.integers(len(S.TEXTURES)))]
        base, other = (S.Background(S.BACKGROUND_COLOURS[int(b)], tex) for b in bgs)
        side = lambda: S.SIDES[int(rng.integers(len(S.SIDES)))]  # noqa: E731
        absent = S.ObjectAction("absent")
        segs = (S.Segment(1, base, (S.ObjectAction("still"), absent, absent)),
                S.Segment(1, other, (S.ObjectAction("leave", side=side()), absent, absent), "change"),
                S.Segment(1, base, (S.ObjectAction("return", side=side()), S.ObjectAction("enter", side=side()),
                                    S.ObjectAction("enter", side=side())), "revert"))
        out.append(S.Script(objs, segs))
    return out


def coverage_scripts() -> list[S.Script]:
    """One-segment scripts whose captions use every palette word: each (colour, shape, size) once with a motion
    or a leave, and "nothing moves" on every (background colour, texture). Keeps every caption word a whole
    piece at any corpus size (a word the corpus lacks would be split into letters)."""
    out = []
    actions = S.MOTIONS + ("leave",)
    combos = [(c, sh, sz) for c in S.OBJECT_COLOURS for sh in S.SHAPES for sz in S.SIZES]
    for i, (colour, shape, size) in enumerate(combos):
        bg = S.Background(S.BACKGROUND_COLOURS[i % len(S.BACKGROUND_COLOURS)], S.TEXTURES[i % len(S.TEXTURES)])
        kind = actions[i % len(actions)]
        act = S.ObjectAction(kind, side=S.SIDES[i % len(S.SIDES)] if kind in S.EVENTS else "")
        out.append(S.Script((S.ObjectSpec(shape, colour, size),), (S.Segment(1, bg, (act,)),)))
    for colour in S.BACKGROUND_COLOURS:
        for texture in S.TEXTURES:
            seg = S.Segment(1, S.Background(colour, texture), (S.ObjectAction("absent"),))
            out.append(S.Script((S.ObjectSpec(S.SHAPES[0], S.OBJECT_COLOURS[0], S.SIZES[0]),), (seg,)))
    return out


@dataclasses.dataclass
class Corpus:
    """Distinct captions (first-seen order) and what each states, ``labels [N, LABEL_WIDTH]``."""

    captions: list[str]
    labels: np.ndarray
    num_sampled: int  # prompts drawn from the samplers (with repeats)


def build_corpus(seed: int, num_captions: int = DEFAULT_NUM_CAPTIONS) -> Corpus:
    """``num_captions`` prompts from alternating clip / script samples, then the longest-structure and the
    coverage captions (see :func:`longest_structure_scripts`, :func:`coverage_scripts`)."""
    if num_captions < 1:
        raise TextModelError(f"--num-captions={num_captions} must be >= 1")
    rng = np.random.default_rng(np.random.SeedSequence([0x7E47, int(seed)]))
    seen: dict[str, np.ndarray] = {}

    def add(script: S.Script, indices: Sequence[int]) -> int:
        for i in indices:
            text = C.segment_prompt(script, i)
            if text not in seen:
                seen[text] = caption_labels(script, i)
        return len(indices)

    sampled, i = 0, 0
    while sampled < num_captions:
        if i % 2 == 0:
            script = SC.sample_clip(rng, **CLIP_KWARGS)
        else:
            script = SC.sample_script(rng, **SCRIPT_KWARGS)
        sampled += add(script, range(min(len(script.segments), num_captions - sampled)))
        i += 1
    for script in longest_structure_scripts(rng) + coverage_scripts():
        add(script, [len(script.segments) - 1])
    captions = list(seen)
    return Corpus(captions, np.stack([seen[c] for c in captions]), sampled)


# --------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------


def train_tokenizer(captions: Sequence[str], out_dir: str, vocab_size: int, text_len: int) -> str:
    """Train the BPE sentencepiece model on ``captions`` and write a UMT5Tokenizer folder; returns it."""
    import sentencepiece as spm  # lazy: training-only dependency

    lines = [c for c in captions if c.strip()]
    if not lines:
        raise TextModelError("the caption corpus is empty; raise --num-captions")
    if vocab_size <= len(SPECIAL_TOKENS):
        raise TextModelError(f"vocab_size={vocab_size} leaves no room for pieces after {len(SPECIAL_TOKENS)} "
                             "special tokens")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=int(vocab_size),
            hard_vocab_limit=False,  # a small corpus may not have vocab_size pieces: use fewer
            character_coverage=1.0, normalization_rule_name="nmt_nfkc_cf",
            split_by_whitespace=True, split_by_unicode_script=False, split_by_number=True,
            pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=-1,
            pad_piece=SPECIAL_TOKENS["pad_token"], eos_piece=SPECIAL_TOKENS["eos_token"],
            unk_piece=SPECIAL_TOKENS["unk_token"],
            num_threads=1, input_sentence_size=0, shuffle_input_sentence=False, max_sentence_length=1 << 14,
            minloglevel=2)
    except RuntimeError as e:
        raise TextModelError(f"sentencepiece training failed ({e}); with a tiny corpus raise --num-captions or "
                             "lower --vocab-size") from None
    os.makedirs(out_dir, exist_ok=True)
    from memflow_jax.text.tokenizer import CONFIG_FILE, SPECIAL_MAP_FILE, SPM_FILE

    files = {
        SPM_FILE: model.getvalue(),
        SPECIAL_MAP_FILE: _json_bytes(dict(SPECIAL_TOKENS)),
        CONFIG_FILE: _json_bytes({**SPECIAL_TOKENS, "extra_ids": 0, "additional_special_tokens": [],
                                  "model_max_length": int(text_len), "tokenizer_class": "T5Tokenizer",
                                  "source": "memflow_jax.storyworld.text_model"}),
    }
    for name, data in files.items():
        with open(os.path.join(out_dir, name), "wb") as f:
            f.write(data)
    return out_dir


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def token_lengths(tok: Any, captions: Sequence[str]) -> np.ndarray:
    """Tokens of each caption including ``</s>``, untruncated: ``[N]`` int."""
    from memflow_jax.text.tokenizer import clean_text

    return np.asarray([len(ids) + 1 for ids in tok.backend.encode([clean_text(c) for c in captions])], np.int64)


def check_tokenizer(tok: Any, captions: Sequence[str], cfg: TextConfig) -> dict[str, Any]:
    """Fail clearly unless every caption fits ``text_len`` (with ``</s>``), the ids fit ``vocab_size``, the T5
    special ids are where the encoder expects them and ``""`` encodes to ``</s>`` alone. Returns statistics."""
    if tok.vocab_size > cfg.vocab_size:
        raise TextModelError(f"tokenizer has {tok.vocab_size} ids > text.vocab_size={cfg.vocab_size}; lower "
                             "--vocab-size")
    if (tok.pad_id, tok.eos_id) != (PAD_ID, EOS_ID):
        raise TextModelError(f"tokenizer pad/eos ids are {tok.pad_id}/{tok.eos_id}, expected {PAD_ID}/{EOS_ID}")
    lengths = token_lengths(tok, captions)
    worst = int(np.argmax(lengths))
    if lengths[worst] > cfg.text_len:
        pieces = tok.backend.sp.encode(captions[worst], out_type=str)
        raise TextModelError(
            f"caption {captions[worst]!r} needs {lengths[worst]} tokens with </s> > text.text_len={cfg.text_len} "
            f"({int(np.sum(lengths > cfg.text_len))} of {len(captions)} captions do not fit; pieces: {pieces}); "
            "raise text.text_len (and model.text_len with it)")
    ids, mask = tok([NEGATIVE_PROMPT])
    if int(mask.sum()) != 1 or int(ids[0, 0]) != EOS_ID:
        raise TextModelError(f"the empty negative prompt encodes to {ids[0, :int(mask.sum())].tolist()}, "
                             f"expected [{EOS_ID}] (</s>)")
    words = [w for w in C.VOCABULARY if w != C.SENTENCE_SEPARATOR.strip()]
    word_ids = tok.backend.encode(words)
    return {"max_tokens": int(lengths[worst]), "mean_tokens": round(float(lengths.mean()), 2),
            "longest_caption": captions[worst],
            "vocab_words_with_unk": sorted(w for w, ids in zip(words, word_ids) if UNK_ID in ids),
            "vocab_words_not_one_piece": sorted(w for w, ids in zip(words, word_ids) if len(ids) != 1)}


# --------------------------------------------------------------------------------------------------
# Encoder: init, optional pretraining, probe
# --------------------------------------------------------------------------------------------------


def token_targets(tok: Any, captions: Sequence[str], labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token pretraining targets ``[N, L, len(HEADS)]`` int32 and weights ``[N, L, len(HEADS)]`` float32.

    A token's sentence is found from the pieces (a piece ending in "." closes one); tokens of sentence k < the
    number of mentioned objects take slot k's object classes, the others class 0. Object heads are weighted on
    the caption's pieces, background heads also on ``</s>``; padding has weight 0.
    """
    from memflow_jax.text.tokenizer import clean_text

    n, length, n_obj = len(captions), tok.text_len, len(OBJECT_HEADS)
    targets = np.zeros((n, length, len(HEADS)), np.int32)
    weights = np.zeros((n, length, len(HEADS)), np.float32)
    sep = C.SENTENCE_SEPARATOR.strip()
    for row, text in enumerate(captions):
        pieces = tok.backend.sp.encode(clean_text(text), out_type=str)[: length - 1]
        slots = labels[row, : MAX_SLOTS * n_obj].reshape(MAX_SLOTS, n_obj)  # [MAX_SLOTS, n_obj]
        mentioned = int(np.sum(slots[:, 0] > 0))
        sentence = 0
        for t, piece in enumerate(pieces):
            if sentence < mentioned:
                targets[row, t, :n_obj] = slots[sentence]
            sentence += piece.endswith(sep)
        targets[row, : len(pieces) + 1, n_obj:] = labels[row, MAX_SLOTS * n_obj:]
        weights[row, : len(pieces), :n_obj] = 1.0
        weights[row, : len(pieces) + 1, n_obj:] = 1.0
    return targets, weights


_MAX_CLASSES = max(n for _, n in HEADS)


def _class_bias() -> np.ndarray:
    """``[H, C]``: 0 on each head's classes, -1e9 on the padding classes up to ``_MAX_CLASSES``."""
    return np.where(np.arange(_MAX_CLASSES)[None, :] < np.asarray([n for _, n in HEADS])[:, None], 0.0,
                    -1e9).astype(np.float32)


def _heads_loss(head: dict[str, Any], feats: Any, targets: Any, weights: Any) -> tuple[Any, Any]:
    """Weighted cross-entropy of every head over every token, and the predictions.

    feats ``[..., D]``; targets / weights ``[..., H]`` -> (scalar, predictions ``[..., H]``). The heads share one
    matmul: logits ``[..., H, C]`` with the classes past each head's count masked out.
    """
    import jax
    import jax.numpy as jnp

    n_heads = len(HEADS)
    logits = (feats.astype(jnp.float32) @ head["w"] + head["b"]).reshape(
        feats.shape[:-1] + (n_heads, _MAX_CLASSES)) + _class_bias()  # [..., H, C]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.sum(logp * jax.nn.one_hot(targets, _MAX_CLASSES, dtype=logp.dtype), -1)  # [..., H]
    loss = jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    return loss, jnp.argmax(logits, axis=-1)


def _init_head(dim: int, key: Any) -> dict[str, Any]:
    import jax
    import jax.numpy as jnp

    total = len(HEADS) * _MAX_CLASSES
    return {"w": jax.random.normal(key, (dim, total), jnp.float32) * dim ** -0.5,
            "b": jnp.zeros((total,), jnp.float32)}


def _accuracy(preds: np.ndarray, targets: np.ndarray, weights: np.ndarray) -> dict[str, Any]:
    """Held-out accuracies over weighted tokens: every head, object / background means, tokens with every
    object head right, captions with every head of every token right. All inputs ``[N, L, H]``."""
    right = preds == targets
    on = weights > 0
    per_head = {name: round(float(right[..., j][on[..., j]].mean()), 4) for j, (name, _) in enumerate(HEADS)}
    n_obj = len(OBJECT_HEADS)
    tok_on = on[..., 0]  # [N, L] caption pieces
    obj_all = np.all(right[..., :n_obj], -1)[tok_on]
    caption = np.all(right | ~on, axis=(1, 2))
    return {"object_heads": round(float(np.mean([per_head[h] for h, _ in OBJECT_HEADS])), 4),
            "background_heads": round(float(np.mean([per_head[h] for h, _ in BG_HEADS])), 4),
            "token_object_exact": round(float(obj_all.mean()), 4),
            "caption_exact": round(float(caption.mean()), 4), "per_head": per_head}


@functools.lru_cache(maxsize=4)
def _embed_fn(cfg: TextConfig) -> Callable[..., Any]:
    import jax

    from memflow_jax.nn import t5 as t5_nn

    return jax.jit(lambda p, i, m: t5_nn.prompt_embeds(p, cfg, i, m))


def token_features(params: Any, cfg: TextConfig, ids: np.ndarray, mask: np.ndarray,
                   batch_size: int = 256) -> np.ndarray:
    """Encoder output of every row, ``[N, L] -> [N, L, D]`` float32 (fixed batch shape: one compile)."""
    fn = _embed_fn(cfg)
    n = ids.shape[0]
    bs = min(batch_size, n)
    out = []
    for start in range(0, n, bs):
        i, m = ids[start:start + bs], mask[start:start + bs]
        pad = bs - i.shape[0]
        if pad:
            i, m = np.concatenate([i, ids[:pad]]), np.concatenate([m, mask[:pad]])
        out.append(np.asarray(fn(params, i, m), np.float32)[:bs - pad])
    return np.concatenate(out)


def linear_probe(train: tuple[np.ndarray, np.ndarray, np.ndarray], held_out: tuple[np.ndarray, np.ndarray,
                 np.ndarray], ridge: float = 1e-3) -> dict[str, Any]:
    """Ridge-regression linear probe on frozen per-token features (closed form, float64); held-out accuracies.

    ``train`` / ``held_out``: (features ``[N, L, D]``, targets ``[N, L, H]``, weights ``[N, L, H]``). Each group
    of heads (object / background) is fitted on the tokens it is weighted on, to one-hot targets; a token's
    class is the argmax of its head's scores.
    """
    preds = np.zeros(held_out[1].shape, np.int32)  # [N, L, H]
    n_obj = len(OBJECT_HEADS)
    for group in (range(n_obj), range(n_obj, len(HEADS))):
        j0 = group[0]
        on_tr, on_ev = train[2][..., j0] > 0, held_out[2][..., j0] > 0  # [N, L]
        x = np.concatenate([train[0][on_tr], np.ones((int(on_tr.sum()), 1))], 1).astype(np.float64)  # [T, D+1]
        y = np.concatenate([np.eye(HEADS[j][1])[train[1][..., j][on_tr]] for j in group], 1)  # [T, sum(n_j)]
        gram = x.T @ x
        w = np.linalg.solve(gram + ridge * np.trace(gram) / len(gram) * np.eye(len(gram)), x.T @ y)
        xe = np.concatenate([held_out[0][on_ev], np.ones((int(on_ev.sum()), 1))], 1).astype(np.float64)
        scores = xe @ w
        start = 0
        for j in group:
            n = HEADS[j][1]
            preds[..., j][on_ev] = np.argmax(scores[:, start:start + n], 1)
            start += n
    return _accuracy(preds, held_out[1], held_out[2])


@functools.lru_cache(maxsize=4)
def _pretrain_step(cfg: TextConfig, steps: int, lr: float) -> tuple[Any, Callable[..., Any]]:
    """The optimiser (Adam, warmup + cosine, clipped) and the jitted joint training step (cached: one compile
    per config / schedule in a process)."""
    import jax
    import optax

    from memflow_jax.nn import t5 as t5_nn
    from memflow_jax.training import optim

    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, steps // 20), max(steps, 1), lr * 0.05)
    opt = optim.make_optimizer(sched, beta1=0.9, beta2=0.999, weight_decay=0.0, clip=1.0)  # Adam, clipped

    @jax.jit
    def step(trainable, state, i, m, y, w):  # ids / mask [B, L]; targets / weights [B, L, H]
        def loss_fn(t):
            return _heads_loss(t["head"], t5_nn.prompt_embeds(t["encoder"], cfg, i, m), y, w)[0]

        loss, g = jax.value_and_grad(loss_fn)(trainable)
        upd, state = opt.update(g, state, trainable)
        return optax.apply_updates(trainable, upd), state, loss

    return opt, step


def pretrain(params: Any, cfg: TextConfig, ids: np.ndarray, mask: np.ndarray, targets: np.ndarray,
             weights: np.ndarray, steps: int, seed: int, batch_size: int = 16, lr: float = 3e-3,
             log: Callable[[str], None] | None = None) -> tuple[Any, list[float]]:
    """Train the encoder and linear per-token heads jointly (Adam, warmup + cosine); returns the encoder params
    and the loss at every tenth of the run. ``ids``/``mask`` ``[N, L]``, ``targets``/``weights`` ``[N, L, H]``.

    Small batches: XLA:CPU runs this encoder's backward pass far slower per caption at batch 128 than at 16.
    """
    import jax

    key = jax.random.PRNGKey(seed)
    opt, step = _pretrain_step(cfg, int(steps), float(lr))
    trainable = {"encoder": params, "head": _init_head(cfg.dim, jax.random.fold_in(key, 1))}
    state = opt.init(trainable)

    rng = np.random.default_rng(np.random.SeedSequence([0x7E48, int(seed)]))
    bs = min(batch_size, ids.shape[0])
    losses: list[float] = []
    order, pos = rng.permutation(ids.shape[0]), 0
    every = max(1, steps // 10)
    for s in range(steps):
        if pos + bs > len(order):
            order, pos = rng.permutation(ids.shape[0]), 0
        sel = order[pos:pos + bs]
        pos += bs
        trainable, state, loss = step(trainable, state, ids[sel], mask[sel], targets[sel], weights[sel])
        if (s + 1) % every == 0 or s + 1 == steps:
            losses.append(round(float(loss), 4))
            if log is not None:
                log(f"pretrain step {s + 1}/{steps}: loss {losses[-1]:.4f}")
    return trainable["encoder"], losses


# --------------------------------------------------------------------------------------------------
# Build
# --------------------------------------------------------------------------------------------------


def build(cfg: config_lib.Config, out_dir: str, *, seed: int = 0, num_captions: int = DEFAULT_NUM_CAPTIONS,
          vocab_size: int | None = None, pretrain_steps: int = DEFAULT_PRETRAIN_STEPS, probe: bool = True,
          eval_fraction: float = 0.1, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Corpus -> tokenizer -> (pretrained) UMT5 params -> converted checkpoint at ``out_dir``; returns the
    build summary (also stored in ``config.json`` under ``text_model``)."""
    import jax

    from memflow_jax.convert.common import save_converted
    from memflow_jax.nn import t5 as t5_nn
    from memflow_jax.text.tokenizer import UMT5Tokenizer

    say = log or (lambda m: None)
    tcfg = cfg.text
    tcfg.validate()
    vocab_size = tcfg.vocab_size if vocab_size is None else int(vocab_size)
    if vocab_size > tcfg.vocab_size:
        raise TextModelError(f"--vocab-size={vocab_size} > text.vocab_size={tcfg.vocab_size}: the embedding table "
                             "has no rows for the extra ids")
    if pretrain_steps < 0:
        raise TextModelError(f"--pretrain-steps={pretrain_steps} must be >= 0")
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    corpus = build_corpus(seed, num_captions)
    times["corpus_s"] = round(time.perf_counter() - t0, 2)
    say(f"corpus: {len(corpus.captions)} distinct captions from {corpus.num_sampled} sampled prompts "
        f"(+ longest-structure and coverage captions) in {times['corpus_s']} s")

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(os.path.abspath(out_dir)) + ".tok-", dir=parent)
    try:
        t0 = time.perf_counter()
        tok_dir = train_tokenizer(corpus.captions, os.path.join(tmp, TOKENIZER_DIR), vocab_size, tcfg.text_len)
        tok = UMT5Tokenizer(tok_dir, tcfg.text_len)
        stats = check_tokenizer(tok, corpus.captions, tcfg)
        times["tokenizer_s"] = round(time.perf_counter() - t0, 2)
        say(f"tokenizer: {tok.vocab_size} ids, longest caption {stats['max_tokens']} tokens with </s> "
            f"(text_len {tcfg.text_len}), mean {stats['mean_tokens']}")
        if stats["vocab_words_not_one_piece"]:
            say(f"note: words split into several pieces: {stats['vocab_words_not_one_piece']}")

        t0 = time.perf_counter()
        params = jax.tree_util.tree_map(np.asarray, t5_nn.init_params(tcfg, jax.random.PRNGKey(seed)))
        summary: dict[str, Any] = {
            "seed": int(seed), "num_captions": int(num_captions), "corpus_size": len(corpus.captions),
            "sampled_prompts": corpus.num_sampled, "vocab_size": tok.vocab_size, **stats,
            "pretrain_steps": int(pretrain_steps)}
        if pretrain_steps or probe:
            ids, mask = tok(corpus.captions)  # [N, L] each
            targets, weights = token_targets(tok, corpus.captions, corpus.labels)  # [N, L, H] each
            # held-out captions for the probe (a corpus of one caption trains and evaluates on it)
            order = np.random.default_rng(np.random.SeedSequence([0x7E49, int(seed)])).permutation(len(ids))
            n_eval = min(PROBE_EVAL_CAPTIONS, max(1, int(round(eval_fraction * len(ids)))))
            ev = order[:n_eval]
            tr = order[n_eval:] if len(ids) > n_eval else order
            ptr = tr[:PROBE_TRAIN_CAPTIONS]

            def run_probe(p: Any) -> dict[str, Any]:
                return linear_probe((token_features(p, tcfg, ids[ptr], mask[ptr]), targets[ptr], weights[ptr]),
                                    (token_features(p, tcfg, ids[ev], mask[ev]), targets[ev], weights[ev]))

            probes: dict[str, Any] = {"train_captions": int(len(ptr)), "eval_captions": int(len(ev)),
                                      "method": "ridge regression on frozen per-token features"}
            if probe:
                probes["random"] = run_probe(params)
                say(f"linear probe, random encoder: {_brief(probes['random'])}")
            if pretrain_steps:
                params, losses = pretrain(params, tcfg, ids[tr], mask[tr], targets[tr], weights[tr],
                                          pretrain_steps, seed, log=say)
                params = jax.tree_util.tree_map(np.asarray, params)
                summary["pretrain_losses"] = losses
                if probe:
                    probes["pretrained"] = run_probe(params)
                    say(f"linear probe, pretrained encoder: {_brief(probes['pretrained'])}")
            if probe:
                summary["probe"] = probes
        times["encoder_s"] = round(time.perf_counter() - t0, 2)

        # the encoder as every later stage uses it
        from memflow_jax.text.encoder import TextEncoder

        emb = TextEncoder(tok, params, tcfg).encode_numpy([NEGATIVE_PROMPT, corpus.captions[0]])
        if emb.shape != (2, tcfg.text_len, tcfg.dim) or not np.all(np.isfinite(emb)):
            raise TextModelError(f"encoder output {emb.shape} is not [2, {tcfg.text_len}, {tcfg.dim}] or not finite")
        summary["times"] = times
        save_converted(out_dir, {"t5": params}, cfg.checkpoint_dict(),
                       extra_meta={"text_model": summary, "negative_prompt": NEGATIVE_PROMPT,
                                   "sources": {"text_model": "memflow_jax.storyworld.text_model"}},
                       copy_dirs={TOKENIZER_DIR: tok_dir})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _brief(acc: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in acc.items() if k != "per_head")


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m memflow_jax.storyworld.text_model",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--config", required=True, help="YAML with the text section (configs/storyworld.yaml)")
    ap.add_argument("--out", required=True, help="converted checkpoint folder to write (replaced atomically)")
    ap.add_argument("--seed", type=int, default=0, help="corpus, tokenizer and encoder seed")
    ap.add_argument("--num-captions", type=int, default=DEFAULT_NUM_CAPTIONS,
                    help="prompts to sample (repeats are dropped)")
    ap.add_argument("--vocab-size", type=int, default=None, help="sentencepiece pieces incl. special tokens "
                    "(default: text.vocab_size)")
    ap.add_argument("--pretrain-steps", type=int, default=DEFAULT_PRETRAIN_STEPS,
                    help="caption-attribute pretraining steps of the encoder (0: frozen random features)")
    ap.add_argument("--no-probe", action="store_true", help="skip the before/after linear-probe metrics")
    ap.add_argument("overrides", nargs="*", help="section.key=value config overrides")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        cfg = config_lib.load(args.config, args.overrides)
        summary = build(cfg, args.out, seed=args.seed, num_captions=args.num_captions, vocab_size=args.vocab_size,
                        pretrain_steps=args.pretrain_steps, probe=not args.no_probe,
                        log=lambda m: print(m, file=sys.stderr, flush=True))
    except (TextModelError, config_lib.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    keys = ("corpus_size", "vocab_size", "max_tokens", "mean_tokens", "pretrain_steps")
    print(json.dumps({"out": os.path.abspath(args.out), **{k: summary[k] for k in keys},
                      "seconds": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
