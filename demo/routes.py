"""HTTP routes the demo adds beside Streamlit's own: the shared server-camera stream as MJPEG,
and a JSON view of the live counters (the page's panel, tests and scripts read it).

MJPEG because every browser shows it in a plain <img>, it needs no WebRTC/ICE between a
Jetson and a laptop, and JPEG-encoding a 640x480 frame costs a few milliseconds.
"""

from __future__ import annotations

import asyncio

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from dilseg.runtime.view import ViewSettings

from . import shared_camera, webcam

PREFIX = "/dilseg"
BOUNDARY = "dilsegframe"


async def stream(request: Request):
    worker = shared_camera.find(request.path_params["worker"])
    if worker is None or not worker.alive:
        return PlainTextResponse("no such running source; press Start on the page", status_code=404)
    try:
        settings = ViewSettings.from_query(dict(request.query_params))
        settings.check_classes(worker.segmenter.meta.num_classes)
    except ValueError as exc:
        return PlainTextResponse(f"bad view settings: {exc}", status_code=400)
    viewer = request.query_params.get("viewer")  # the page's tab; a hand-written URL may have none

    async def frames():
        loop = asyncio.get_running_loop()
        fresh = asyncio.Event()

        def wake() -> None:  # called from the worker thread
            try:
                loop.call_soon_threadsafe(fresh.set)
            except RuntimeError:  # the loop closed under us: the server is shutting down
                pass

        # Registered when the response starts, and ended in `finally` when the browser goes
        # away, the viewer opens its next stream, or its page stops showing the source.
        stream = worker.open_stream(viewer, settings, wake)
        seq = 0
        try:
            while worker.alive and not stream.closed:
                try:
                    await asyncio.wait_for(fresh.wait(), 1.0)
                except asyncio.TimeoutError:
                    continue
                fresh.clear()
                published = worker.latest()
                if stream.closed or published is None or published.seq <= seq:
                    continue
                seq = published.seq
                data = published.jpegs.get(settings)
                if data is None:  # a frame made before this stream registered its view
                    data = await asyncio.to_thread(shared_camera.encode_view, published.result, settings)
                stream.meter.tick()
                yield (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(data)}\r\n\r\n"
                       .encode() + data + b"\r\n")
        finally:
            worker.close_stream(stream)

    return StreamingResponse(frames(), media_type=f"multipart/x-mixed-replace; boundary={BOUNDARY}",
                             headers={"Cache-Control": "no-store"})


async def stats(request: Request):
    return JSONResponse({"cameras": shared_camera.stats(), "webcam": webcam.stats()})


class NoGzipForStreams:
    """Streamlit gzips responses it does not recognise as media; a gzipped MJPEG stream would
    be buffered instead of streamed, so these routes are served as if the client did not
    accept gzip."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("path", "").startswith(PREFIX + "/"):
            scope = dict(scope)
            scope["headers"] = [(k, v) for k, v in scope["headers"] if k.lower() != b"accept-encoding"]
        await self.app(scope, receive, send)


ROUTES = [
    Route(PREFIX + "/stream/{worker}.mjpg", stream),
    Route(PREFIX + "/stats.json", stats),
]
