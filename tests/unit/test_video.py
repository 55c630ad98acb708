"""mp4 / PNG output: round trip through imageio, the reference's uint8 mapping, atomic writes."""
from __future__ import annotations

import os

import imageio.v3 as iio
import numpy as np
import pytest

from memflow_jax.io.video import Mp4Writer, frame_strip_png, pixels_to_uint8, write_mp4

# reading back starts ffmpeg by fork+exec; JAX (imported by other tests in the process) warns on any fork
pytestmark = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")

T, H, W = 7, 32, 48  # H != W to catch transpositions


def _read(path: str) -> np.ndarray:
    return iio.imread(path, plugin="FFMPEG")  # [T, H, W, 3] uint8


def _float_frames(t: int = T) -> np.ndarray:
    """[t, 3, H, W] in [-1, 1]: frame i is a flat grey of level -1 + 2i/(t-1) (dark to bright)."""
    levels = np.linspace(-1.0, 1.0, t, dtype=np.float32)
    return np.broadcast_to(levels[:, None, None, None], (t, 3, H, W)).copy()


def _leftovers(d) -> list[str]:
    return sorted(f for f in os.listdir(d) if ".part" in f)


def test_pixels_to_uint8_reference_mapping() -> None:
    """uint8(255 * clamp(x/2 + 1/2, 0, 1)) with truncation (torch's float -> uint8 cast), [T,3,H,W] -> [T,H,W,3]."""
    x = np.array([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0], np.float32).reshape(1, 3, 1, 2)
    u = pixels_to_uint8(x)
    assert u.dtype == np.uint8 and u.shape == (1, 1, 2, 3)
    want = (np.clip(x * 0.5 + 0.5, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(u, want)
    assert u[0, 0, 0, 1] == 127  # 0.0 -> 127.5 truncated
    same = np.zeros((2, 4, 6, 3), np.uint8)
    assert pixels_to_uint8(same) is same
    with pytest.raises(ValueError, match=r"\[T, 3, H, W\]"):
        pixels_to_uint8(np.zeros((2, 4, 6, 3), np.float32))


@pytest.mark.parametrize("kind", ["float", "uint8"])
def test_write_mp4_round_trip(tmp_path, kind) -> None:
    frames = _float_frames()
    data = frames if kind == "float" else pixels_to_uint8(frames)
    path = str(tmp_path / "sub" / "video.mp4")
    assert write_mp4(path, data, fps=16) == path
    back = _read(path)
    assert back.shape == (T, H, W, 3) and back.dtype == np.uint8
    means = back.reshape(T, -1).mean(axis=1)
    assert np.all(np.diff(means) > 0), f"frame order / content lost: {means}"  # dark -> bright preserved
    assert means[0] < 32 and means[-1] > 223
    assert iio.immeta(path, plugin="FFMPEG")["fps"] == 16
    assert _leftovers(tmp_path / "sub") == []


def test_streaming_writer_appends_chunks(tmp_path) -> None:
    path = str(tmp_path / "stream.mp4")
    chunks = [_float_frames(9), _float_frames(12), pixels_to_uint8(_float_frames(4))]
    with Mp4Writer(path, fps=16) as w:
        for c in chunks:
            w.append(c)
            assert not os.path.exists(path), "final file must appear only on close"
    assert w.num_frames == 25
    assert _read(path).shape == (25, H, W, 3)
    assert _leftovers(tmp_path) == []


def test_failure_mid_write_keeps_existing_file(tmp_path) -> None:
    path = str(tmp_path / "keep.mp4")
    write_mp4(path, _float_frames(3))
    before = open(path, "rb").read()
    with pytest.raises(RuntimeError, match="boom"):
        with Mp4Writer(path) as w:
            w.append(_float_frames(5))
            raise RuntimeError("boom")
    assert open(path, "rb").read() == before
    assert _leftovers(tmp_path) == []
    # a bad chunk (other frame size) mid-stream: same guarantee
    with pytest.raises(ValueError, match="size"):
        with Mp4Writer(path) as w:
            w.append(_float_frames(5))
            w.append(np.zeros((2, H + 2, W, 3), np.uint8))
    assert open(path, "rb").read() == before
    assert _leftovers(tmp_path) == []


def test_failure_leaves_no_partial_file(tmp_path) -> None:
    path = str(tmp_path / "new.mp4")
    with pytest.raises(ValueError):
        write_mp4(path, np.zeros((3, 5, H, W), np.float32))  # not [T, 3, H, W]
    with pytest.raises(ValueError, match="no frames"):
        with Mp4Writer(path):
            pass
    assert not os.path.exists(path)
    assert os.listdir(tmp_path) == []


def test_frame_strip_png(tmp_path) -> None:
    path = str(tmp_path / "strip.png")
    frame_strip_png(_float_frames(), path, num_frames=4, gap=2)
    img = iio.imread(path)
    assert img.shape == (H, 4 * W + 3 * 2, 3)
    np.testing.assert_array_equal(img[:, :W], pixels_to_uint8(_float_frames())[0])
    assert _leftovers(tmp_path) == []
