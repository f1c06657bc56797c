"""A real HTTP server for tests: Python's http.server on 127.0.0.1, serving a folder (404 for
anything missing), optionally throttled, plus an endless MJPEG stream at ``/live.mjpg``.

The test helpers in ``servers.py`` run it as a subprocess, so stopping it (SIGTERM or SIGKILL)
drops every open connection the way a crashed or restarted server does. It prints
``READY http://127.0.0.1:PORT/`` once it listens.

    python3 tests/http_server.py --port 8080 --root DIR
    python3 tests/http_server.py --port 8080 --root DIR --rate 200000     # 200 kB/s per response
    curl http://127.0.0.1:8080/live.mjpg                                  # multipart/x-mixed-replace
"""

from __future__ import annotations

import argparse
import functools
import http.server
import sys
import time

LIVE_PATH = "/live.mjpg"
BOUNDARY = "dilsegframe"


def live_frames(width: int, height: int):
    """JPEG frames of a bright square moving across a gradient, frame index encoded in the square's
    position so a reader can tell frames apart."""
    import cv2
    import numpy as np

    base = np.zeros((height, width, 3), np.uint8)
    base[:] = np.linspace(0, 160, width, dtype=np.uint8)[None, :, None]
    side = max(4, min(width, height) // 6)
    i = 0
    while True:
        frame = base.copy()
        x = (i * 4) % max(1, width - side)
        frame[height // 3:height // 3 + side, x:x + side] = (255, 255, 255)
        ok, jpeg = cv2.imencode(".jpg", frame)
        assert ok
        yield jpeg.tobytes()
        i += 1


class Handler(http.server.SimpleHTTPRequestHandler):
    rate: float = 0.0  # bytes per second per response; 0 = as fast as the socket takes it
    fps: float = 15.0
    size: tuple[int, int] = (320, 240)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path.split("?", 1)[0] == LIVE_PATH:
            self.send_live()
        else:
            super().do_GET()

    def send_live(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", f"multipart/x-mixed-replace; boundary={BOUNDARY}")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        period = 1.0 / self.fps
        next_at = time.monotonic()
        try:
            for jpeg in live_frames(*self.size):
                head = (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n").encode()
                self.wfile.write(head + jpeg + b"\r\n")
                self.wfile.flush()
                next_at += period
                time.sleep(max(0.0, next_at - time.monotonic()))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the reader went away

    def copyfile(self, source, outputfile) -> None:
        if not self.rate:
            return super().copyfile(source, outputfile)
        # Small chunks at a fixed rate, so a client is still mid-transfer when the server is stopped.
        chunk = max(1024, int(self.rate / 20))
        while True:
            data = source.read(chunk)
            if not data:
                return
            outputfile.write(data)
            outputfile.flush()
            time.sleep(len(data) / self.rate)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - http.server's signature
        sys.stderr.write(f"{self.address_string()} {format % args}\n")
        sys.stderr.flush()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--root", required=True, help="folder to serve")
    p.add_argument("--rate", type=float, default=0.0, help="bytes per second for each file response (0: unthrottled)")
    p.add_argument("--fps", type=float, default=15.0, help="frame rate of /live.mjpg")
    p.add_argument("--size", default="320x240", help="WxH of /live.mjpg frames")
    args = p.parse_args()
    w, h = (int(v) for v in args.size.lower().split("x"))
    handler = type("ConfiguredHandler", (Handler,), {"rate": args.rate, "fps": args.fps, "size": (w, h)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port),
                                             functools.partial(handler, directory=args.root))
    server.daemon_threads = True
    print(f"READY http://127.0.0.1:{server.server_address[1]}/", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
