"""Training-curve PNG: matplotlib when installed, else a small built-in line plot (no labels)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

SERIES = (("fvu", (31, 119, 180)), ("dead_fraction", (214, 39, 40)), ("auxk", (44, 160, 44)))


def training_curve(history: list[dict], path: str | Path) -> Path:
    """FVU (blue), dead fraction (red) and AuxK loss (green) against training tokens."""
    path = Path(path)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        path.write_bytes(_png_lines(history))
        return path
    fig, ax = plt.subplots(figsize=(6, 3.5))
    tokens = [h["tokens"] for h in history]
    for key, color in SERIES:
        ax.plot(tokens, [h[key] for h in history], label=key, color=np.array(color) / 255)
    ax.set_xlabel("tokens")
    ax.set_ylim(0, max(1.0, max((h["fvu"] for h in history), default=1)))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _png_lines(history: list[dict], w: int = 600, h: int = 350, pad: int = 30) -> bytes:
    img = np.full((h, w, 3), 255, dtype=np.uint8)
    img[h - pad, pad : w - pad] = 0  # x axis
    img[pad : h - pad, pad] = 0  # y axis (0..1)
    n = len(history)
    for key, color in SERIES:
        ys = np.clip([hh[key] for hh in history], 0, 1)
        xs = np.linspace(pad, w - pad - 1, max(n, 2))[:n]
        for i in range(max(n - 1, 0)):
            for t in np.linspace(0, 1, 40):
                x = int(xs[i] + t * (xs[i + 1] - xs[i]))
                y = int(h - pad - (ys[i] + t * (ys[i + 1] - ys[i])) * (h - 2 * pad))
                img[max(y - 1, 0) : y + 1, x] = color
    raw = b"".join(b"\x00" + row.tobytes() for row in img)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )
