"""Frame rate of the demo's shared server-camera worker alone (no browser, no Streamlit):
capture, inference, and the render + JPEG encode one viewer's stream costs.

    python scripts/bench_demo_worker.py                                   # shipped model, test://640x480?fps=30
    python scripts/bench_demo_worker.py --model m.onnx --source 0 --seconds 20

Set beside the page's displayed FPS (tests/test_demo_browser.py prints it), this separates
what the worker can do from what the browser on the same machine takes away. Prints; asserts
nothing.
"""

from __future__ import annotations

import argparse
import time

from pathlib import Path

from dilseg.demo import shared_camera
from dilseg.demo.loading import auto_choice, load_segmenter
from dilseg.runtime.backends import open_backend
from dilseg.runtime.defaults import default_model_path
from dilseg.runtime.segmenter import Segmenter
from dilseg.runtime.view import ViewSettings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(default_model_path()))
    ap.add_argument("--source", default="test://640x480?fps=30")
    ap.add_argument("--seconds", type=float, default=8.0, help="measured time after a 3 s warm-up")
    ap.add_argument("--view", default="overlay", choices=["overlay", "mask", "side-by-side"])
    ap.add_argument("--threads", type=int, help="inference threads (default: the backend's choice, every core)")
    args = ap.parse_args()
    settings = ViewSettings(view=args.view)
    if args.threads is None:
        segmenter = load_segmenter(Path(args.model), "auto")  # what the page's default runs
    else:
        choice = auto_choice(Path(args.model))
        path, backend, options = (choice.path, choice.backend, choice.options) if choice else (args.model, "auto", {})
        segmenter = Segmenter(open_backend(path, backend, **{**options, "threads": args.threads}))
    print(f"backend: {segmenter.backend.name} on {Path(segmenter.backend.path).name}")
    worker = shared_camera.acquire(args.source, segmenter)
    stream = worker.open_stream("bench", settings, lambda: None)  # one viewer: one view drawn and encoded per frame
    try:
        time.sleep(3.0)
        f0, t0 = worker.stats()["frames"], time.monotonic()
        time.sleep(args.seconds)
        stats, t1 = worker.stats(), time.monotonic()
    finally:
        worker.close_stream(stream)
        worker.stop()
        worker.join(5)
    print(f"{args.source} with {args.model}: worker {(stats['frames'] - f0) / (t1 - t0):.1f} FPS over {args.seconds:.0f} s")
    print("mean ms per stage: " + ", ".join(f"{k} {v:.1f}" for k, v in stats["latency_ms"].items()))
    if stats["error"]:
        print(f"worker error: {stats['error']}")


if __name__ == "__main__":
    main()
