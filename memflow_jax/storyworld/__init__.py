"""Storyworld: a procedural, seeded video world (numpy only) for training a small demo model and measuring
whether memory keeps an object's hidden attribute when it leaves and comes back.

Modules: ``scene`` (scene graph), ``render`` (rasteriser + ground truth), ``captions`` (templates, vocabulary),
``scripts`` (narrative / clip samplers), ``dataset`` (Grain-readable export), ``metrics`` (scores for generated
videos), ``export`` (CLI).
"""
from memflow_jax.storyworld.captions import VOCABULARY, script_captions, script_prompts, segment_prompt, tokenize
from memflow_jax.storyworld.dataset import StoryworldSource, make_example, write_dataset
from memflow_jax.storyworld.metrics import (evaluate, prompt_adherence, reappearance_consistency,
                                            temporal_smoothness)
from memflow_jax.storyworld.render import render_video  # `render` (the function) stays in .render: same name
from memflow_jax.storyworld.scene import (Background, HiddenAttributes, ObjectAction, ObjectSpec, SceneState,
                                          Script, Segment, compile_script, sample_hidden, script_from_dict,
                                          script_to_dict)
from memflow_jax.storyworld.scripts import returning_objects, sample_clip, sample_script

__all__ = [
    "VOCABULARY", "script_captions", "script_prompts", "segment_prompt", "tokenize",
    "StoryworldSource", "make_example", "write_dataset",
    "evaluate", "prompt_adherence", "reappearance_consistency", "temporal_smoothness",
    "render_video",
    "Background", "HiddenAttributes", "ObjectAction", "ObjectSpec", "SceneState", "Script", "Segment",
    "compile_script", "sample_hidden", "script_from_dict", "script_to_dict",
    "returning_objects", "sample_clip", "sample_script",
]
