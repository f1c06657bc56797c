"""What `dilseg demo` runs: Streamlit's ASGI app serving the page (app.py) plus the demo's own
routes (MJPEG stream of the shared server camera, live stats as JSON), all on one port."""

from contextlib import asynccontextmanager

import streamlit as st
from starlette.middleware import Middleware

from dilseg.demo.routes import ROUTES, NoGzipForStreams
from dilseg.demo.shared_camera import stop_all


@asynccontextmanager
async def lifespan(_app):
    yield
    stop_all()  # release cameras before the process exits


app = st.App("app.py", routes=ROUTES, middleware=[Middleware(NoGzipForStreams)], lifespan=lifespan)
