"""`dilseg demo`: start the Streamlit demo page."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from pathlib import Path

EPILOG = """\
examples:
  dilseg demo                                   # shipped model, http://localhost:8501
  dilseg demo --port 8600 --model edge_m.onnx   # another port and model
  dilseg demo --model edge_m.engine --source csi://0   # Jetson: TensorRT engine, CSI camera
  dilseg demo --address 0.0.0.0                 # watch a Jetson's camera from a laptop
  dilseg demo --ice-server stun:stun.l.google.com:19302   # browser webcam across NAT

sources on the page:
  browser webcam     the viewer's camera over WebRTC, segmented on this machine
  server camera      a camera index, stream URL, csi://N, video file or test:// opened HERE;
                     one worker per source serves every open tab (an MJPEG stream)
  upload image/video result plus downloadable colour mask, label PNG or MP4

WebRTC (browser webcam) uses no STUN/TURN server by default, so nothing is contacted
outside this machine and browsers on the same machine or LAN connect directly. Add
--ice-server (repeatable; TURN credentials with --ice-username/--ice-credential) for
viewers behind NAT. Live counters: http://HOST:PORT/dilseg/stats.json

Uploads are limited to --max-upload-mb (the page says so when one is larger), and an image
is refused from its header, before decoding, above DILSEG_MAX_IMAGE_PIXELS pixels: a small
compressed file can decode to gigabytes. Raise either when starting the demo, e.g.
  DILSEG_MAX_IMAGE_PIXELS=200000000 dilseg demo --max-upload-mb 500"""

MAX_UPLOAD_MB = 200  # Streamlit's own default, stated so that --help can say it


def ice_servers_json(urls: list[str], username: str | None, credential: str | None) -> str:
    servers = []
    for url in urls:
        if not url.startswith(("stun:", "stuns:", "turn:", "turns:")):
            from dilseg.runtime.cli import CliError

            raise CliError(f"--ice-server {url!r}: expected a stun:, stuns:, turn: or turns: URL")
        server: dict = {"urls": [url]}
        if url.startswith("turn") and username:
            server.update(username=username, credential=credential or "")
        servers.append(server)
    return json.dumps(servers)


def streamlit_command(args: argparse.Namespace) -> list[str]:
    server = Path(__file__).with_name("server.py")
    cmd = [sys.executable, "-m", "streamlit", "run", str(server),
           "--server.headless", "true",
           "--server.port", str(args.port),
           "--browser.gatherUsageStats", "false",  # nothing leaves the machine
           "--server.fileWatcherType", "none",
           "--server.runOnSave", "false",
           "--global.developmentMode", "false",
           "--client.toolbarMode", "minimal",
           # Streamlit runs a full gc.collect() after every script run, fragments included; the page
           # reruns its stats fragment every second and each collection holds the GIL for a large
           # fraction of a frame, stalling the camera worker's threads.
           "--runner.postScriptGC", "false",
           "--server.maxUploadSize", str(args.max_upload_mb)]
    if args.address:
        cmd += ["--server.address", args.address]
    return cmd


def run_demo(args: argparse.Namespace) -> int:
    from dilseg.runtime.cli import CliError
    from dilseg.runtime.defaults import default_model_path, resolve_model

    from .settings import ENV_ICE, ENV_MODEL, ENV_SOURCE

    missing = [name for name in ("streamlit", "streamlit_webrtc", "av") if importlib.util.find_spec(name) is None]
    if missing:
        raise CliError(f"the demo needs its extra packages ({', '.join(missing)} missing): pip install 'dilseg[demo]'")
    if not 0 < args.port < 65536:
        raise CliError(f"--port {args.port}: choose a port between 1 and 65535")
    if args.max_upload_mb < 1:
        raise CliError(f"--max-upload-mb {args.max_upload_mb}: must be >= 1")
    env = dict(os.environ)
    if args.model:
        model = resolve_model(args.model)
        env[ENV_MODEL] = model if isinstance(model, str) else str(model.resolve())  # str: a triton:// URL
    elif not default_model_path().exists():
        print(f"note: the shipped model {default_model_path().name} is missing from this install; "
              "the page will ask for a model (or pass --model PATH)", file=sys.stderr)
    if args.ice_server:
        env[ENV_ICE] = ice_servers_json(args.ice_server, args.ice_username, args.ice_credential)
    if args.source:
        env[ENV_SOURCE] = args.source
    cmd = streamlit_command(args)
    print(f"dilseg demo: http://{args.address or 'localhost'}:{args.port}  (Ctrl+C stops it)", file=sys.stderr)
    sys.stderr.flush()
    # Become the server process: signals (Ctrl+C, a test's terminate()) reach Streamlit directly.
    os.execvpe(cmd[0], cmd, env)
    return 0  # pragma: no cover - exec does not return


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="live segmentation web page (browser webcam, server camera, uploads)",
        description="Start the Streamlit demo page: live segmentation of the browser's webcam, a camera or "
                    "stream on this machine, or uploaded images and videos.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--port", type=int, default=8501, help="HTTP port (default 8501)")
    p.add_argument("--address", default=None,
                   help="interface to listen on (default: all interfaces, as Streamlit does); 127.0.0.1 keeps it local")
    p.add_argument("--model", default=None, help="model the page starts with (.onnx or .engine; default: the shipped model)")
    p.add_argument("--source", default=None, help="server source the page suggests (e.g. 0, csi://0, test://)")
    p.add_argument("--max-upload-mb", type=int, default=MAX_UPLOAD_MB, metavar="MB",
                   help=f"largest upload the page accepts, in MB (default {MAX_UPLOAD_MB}); images are also refused "
                        "above DILSEG_MAX_IMAGE_PIXELS pixels (default 100 million) before they are decoded")
    p.add_argument("--ice-server", action="append", default=[], metavar="URL",
                   help="STUN/TURN server for the browser-webcam WebRTC link (repeatable); none by default")
    p.add_argument("--ice-username", default=None, help="username for --ice-server turn: URLs")
    p.add_argument("--ice-credential", default=None, help="credential for --ice-server turn: URLs")
    p.set_defaults(func=run_demo)
