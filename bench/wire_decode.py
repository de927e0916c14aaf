"""Frame decode speed of this tree's ``common/wire.py`` against another revision's.

Decodes 3,534 real Pong frames (the distinct frames of one batch of 512, n=3) per
codec with both versions, interleaved in one process; prints one JSON object with
the best-of-``--reps`` microseconds per frame of each and their ratio (new / base).

    python bench/wire_decode.py --baseline main
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.synthetic import pong_frames  # noqa: E402
from common import wire  # noqa: E402

BATCH_FRAMES = 3534


def load_revision(rev: str):
    """``common/wire.py`` as of git revision ``rev``, imported as a separate module."""
    root = Path(__file__).resolve().parent.parent
    text = subprocess.run(
        ["git", "show", f"{rev}:common/wire.py"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "wire_base.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("wire_base", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--baseline", default="main", help="git revision to compare with")
    ap.add_argument("--reps", type=int, default=41)
    args = ap.parse_args()
    base = load_revision(args.baseline)
    frames = pong_frames(num_envs=8, steps=100)
    dictionary = wire.train_zstd_dictionary(frames[:400])
    out: dict = {"baseline": args.baseline, "frames_per_decode": BATCH_FRAMES}
    for name in wire.CODEC_IDS:
        new, old = wire.FrameCodec(name, dictionary), base.FrameCodec(name, dictionary)
        blobs = new.encode(frames[400:])
        many = (blobs * (BATCH_FRAMES // len(blobs) + 1))[:BATCH_FRAMES]
        assert np.array_equal(new.decode(many), old.decode(many))
        best = {"new": float("inf"), "base": float("inf")}
        for _ in range(args.reps):
            for tag, codec in (("base", old), ("new", new)):
                t = time.perf_counter()
                codec.decode(many)
                best[tag] = min(best[tag], time.perf_counter() - t)
        out[name] = {
            "us_per_frame": round(best["new"] / BATCH_FRAMES * 1e6, 3),
            "baseline_us_per_frame": round(best["base"] / BATCH_FRAMES * 1e6, 3),
            "ratio": round(best["new"] / best["base"], 3),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
