"""Template captions of storyworld scripts over a small closed vocabulary.

A segment's prompt is a few short sentences joined by ". " (lower case, no trailing period), e.g.
``"a small red circle moves right on a striped sand background. a large blue square bounces"`` or
``"the small red circle comes back from the left. the background turns back to sand"``.
Objects are introduced with "a" in the first segment that shows them and referred to with "the" afterwards
(the reference's interactive prompts also restate who is on screen in every segment). Captions are built
from the :class:`scene.Script` only, which does not hold the hidden attributes, so they cannot state them.
"""
from __future__ import annotations

from memflow_jax.storyworld import scene as S

_MOTION_VERBS = {"left": "moves left", "right": "moves right", "up": "moves up", "down": "moves down",
                 "still": "stays still", "bounce": "bounces"}
_EVENT_VERBS = {"enter": "enters from the", "leave": "leaves to the", "return": "comes back from the"}
_TEXTURE_WORDS = {"plain": "", "stripes": "striped", "dots": "dotted"}
SENTENCE_SEPARATOR = ". "

_TEMPLATE_WORDS = ("a", "the", "on", "background", "turns", "back", "to", "nothing", "moves", "stays", "still",
                   "bounces", "enters", "from", "leaves", "comes", "left", "right", "up", "down", ".")

#: Every token a caption can contain (see :func:`tokenize`), sorted; "." is the sentence separator.
VOCABULARY: tuple[str, ...] = tuple(sorted(set(
    _TEMPLATE_WORDS + S.OBJECT_COLOURS + S.BACKGROUND_COLOURS + S.SHAPES + S.SIZES
    + tuple(w for w in _TEXTURE_WORDS.values() if w)
    + tuple(w for v in list(_MOTION_VERBS.values()) + list(_EVENT_VERBS.values()) for w in v.split()))))


def tokenize(text: str) -> list[str]:
    """Split a caption into vocabulary tokens (words and ".")."""
    return text.replace(".", " . ").split()


def noun_phrase(obj: S.ObjectSpec, definite: bool) -> str:
    """``"a small red circle"`` / ``"the small red circle"``."""
    return f"{'the' if definite else 'a'} {obj.size} {obj.colour} {obj.shape}"


def action_sentence(obj: S.ObjectSpec, action: S.ObjectAction, definite: bool) -> str | None:
    """One sentence for an object's action; ``None`` when the object is absent."""
    if action.kind == "absent":
        return None
    if action.kind in _MOTION_VERBS:
        verb = _MOTION_VERBS[action.kind]
    else:
        verb = f"{_EVENT_VERBS[action.kind]} {action.side}"
    return f"{noun_phrase(obj, definite)} {verb}"


def background_phrase(bg: S.Background) -> str:
    """``"on a striped sand background"``."""
    words = ["on", "a", _TEXTURE_WORDS[bg.texture], bg.colour, "background"]
    return " ".join(w for w in words if w)


def segment_sentences(script: S.Script, index: int) -> list[str]:
    """The sentences describing segment ``index`` of ``script``."""
    seg = script.segments[index]
    shown_before = set()
    for prev in script.segments[:index]:
        shown_before |= {k for k, a in enumerate(prev.actions) if a.kind != "absent"}
    sentences = []
    for k, (obj, action) in enumerate(zip(script.objects, seg.actions)):
        sent = action_sentence(obj, action, definite=k in shown_before)
        if sent is not None:
            sentences.append(sent)
    if seg.bg_event == "change":
        sentences.append(f"the background turns {seg.background.colour}")
    elif seg.bg_event == "revert":
        sentences.append(f"the background turns back to {seg.background.colour}")
    elif sentences:
        sentences[0] = f"{sentences[0]} {background_phrase(seg.background)}"
    else:
        sentences.append(f"nothing moves {background_phrase(seg.background)}")
    return sentences


def segment_prompt(script: S.Script, index: int) -> str:
    """The prompt of segment ``index`` (its sentences joined by ". ")."""
    return SENTENCE_SEPARATOR.join(segment_sentences(script, index))


def script_prompts(script: S.Script) -> list[str]:
    """One prompt per segment."""
    return [segment_prompt(script, i) for i in range(len(script.segments))]


def script_captions(script: S.Script) -> list[list[str]]:
    """The sentences of every segment."""
    return [segment_sentences(script, i) for i in range(len(script.segments))]
