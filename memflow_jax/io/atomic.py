"""Atomic replacement of output directories: write into a temporary sibling, then swap it in."""
from __future__ import annotations

import os
import shutil


def replace_dir(tmp: str, out_dir: str) -> None:
    """Move the finished directory ``tmp`` to ``out_dir``; an existing ``out_dir`` is replaced only now."""
    if os.path.exists(out_dir):
        old = out_dir + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
