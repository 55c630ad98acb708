"""Text side: the UMT5 tokenizer and the cached prompt -> embedding front end."""
from memflow_jax.text.encoder import TextEncoder
from memflow_jax.text.tokenizer import TokenizerError, UMT5Tokenizer, clean_text

__all__ = ["TextEncoder", "TokenizerError", "UMT5Tokenizer", "clean_text"]
