"""Atomic replacement of output directories: write into a temporary sibling, then swap it in."""
from __future__ import annotations

import os
import shutil
from typing import Callable


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


def write_file(path: str, write: Callable[[str], None]) -> str:
    """Atomic file write: ``write(tmp)`` fills a temporary sibling, which then replaces ``path`` (removed on
    failure, so a crash never leaves a half-written ``path``)."""
    root, ext = os.path.splitext(path)
    tmp = f"{root}.tmp-{os.getpid()}{ext}"  # keep the extension: writers pick the format from it
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_text(path: str, text: str) -> str:
    """Atomic UTF-8 text file (``\n`` line ends) via :func:`write_file`."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)

    return write_file(path, write)
