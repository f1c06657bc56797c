"""What `dilseg demo` runs: Streamlit's ASGI app serving the page (app.py) plus the demo's own
routes (MJPEG stream of the shared server camera, live stats as JSON), all on one port."""

import sys
from contextlib import asynccontextmanager
from pathlib import Path

import streamlit as st
from starlette.middleware import Middleware

from dilseg.demo.routes import ROUTES, NoGzipForStreams
from dilseg.demo.shared_camera import stop_all

# `streamlit run` put this folder first on sys.path to import this file; everything here is
# imported as dilseg.demo.*, and module names like `settings` or `media` must not shadow
# other packages for the rest of the process.
_here = str(Path(__file__).resolve().parent)
sys.path[:] = [p for p in sys.path if not p or str(Path(p).resolve()) != _here]


@asynccontextmanager
async def lifespan(_app):
    yield
    stop_all()  # release cameras before the process exits


app = st.App("app.py", routes=ROUTES, middleware=[Middleware(NoGzipForStreams)], lifespan=lifespan)
