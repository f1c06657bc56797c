"""A real RTSP server for tests: GStreamer's gst-rtsp-server serving one H.264 stream on 127.0.0.1.

Run under Debian's /usr/bin/python3, which has PyGObject (`python3-gi`) and the GstRtspServer
typelib (`gir1.2-gst-rtsp-server-1.0`); the test helpers in ``servers.py`` start it as a
subprocess. It prints ``READY rtsp://127.0.0.1:PORT/MOUNT`` once it listens, and stops on
SIGTERM/SIGINT.

    /usr/bin/python3 tests/rtsp_server.py --port 8554 --mount x                 # videotestsrc
    /usr/bin/python3 tests/rtsp_server.py --port 8554 --mount x --file v.mp4    # a video file
"""

from __future__ import annotations

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtsp", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtsp, GstRtspServer  # noqa: E402

# Zero-latency x264 with a key frame every second, so a client that joins (or rejoins after a
# restart) decodes within a second instead of waiting for the encoder's default 250-frame GOP.
ENCODE = ("videoconvert ! video/x-raw,format=I420 ! x264enc tune=zerolatency speed-preset=ultrafast "
          "key-int-max={gop} ! rtph264pay name=pay0 pt=96 config-interval=1")


NEEDED = ("videotestsrc", "filesrc", "decodebin", "videorate", "videoconvert", "x264enc", "rtph264pay",
          "avdec_mpeg4", "avdec_h264", "jpegdec")


def launch_line(args: argparse.Namespace) -> str:
    if args.launch:
        return args.launch
    gop = max(1, int(args.fps))
    if args.file:
        # decodebin handles any container/codec GStreamer's plugins read; the file plays once at its
        # own rate and the stream then ends (EOS), as a finite recorded stream does.
        src = f'filesrc location="{args.file}" ! decodebin ! videorate ! video/x-raw,framerate={args.fps}/1'
    else:
        src = (f"videotestsrc is-live=true pattern={args.pattern} ! "
               f"video/x-raw,width={args.width},height={args.height},framerate={args.fps}/1")
    return f"( {src} ! {ENCODE.format(gop=gop)} )"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, default=8554)
    p.add_argument("--mount", default="x", help="path of the stream: rtsp://127.0.0.1:PORT/MOUNT")
    p.add_argument("--file", help="serve this video file (once) instead of videotestsrc")
    p.add_argument("--launch", help="a full gst-rtsp-server launch line, '( ... name=pay0 )'")
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=240)
    p.add_argument("--fps", type=int, default=30)
    p.add_argument("--pattern", default="ball", help="videotestsrc pattern (ball moves, so frames differ)")
    p.add_argument("--udp", action="store_true",
                   help="also offer RTP over UDP (ports from 127.0.0.1 only); default is RTP over the RTSP TCP connection")
    p.add_argument("--check", action="store_true", help="only check that the GStreamer elements are installed")
    args = p.parse_args()

    Gst.init(None)
    if args.check:
        missing = [e for e in NEEDED if Gst.ElementFactory.find(e) is None]
        if missing:
            print(f"GStreamer elements missing: {', '.join(missing)} (Debian: gstreamer1.0-plugins-base/good/ugly, "
                  "gstreamer1.0-libav)", file=sys.stderr)
            return 1
        return 0
    line = launch_line(args)
    try:
        # gst-rtsp-server builds the pipeline only when a client connects: a typo or a missing
        # element would only show then, so build it once now.
        Gst.parse_launch(line.strip().removeprefix("(").removesuffix(")"))
    except GLib.Error as exc:
        print(f"bad launch line {line!r}: {exc.message}", file=sys.stderr, flush=True)
        return 1
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    factory.set_launch(line)
    # One pipeline for every client: a second reader sees the same live stream, as with a camera.
    factory.set_shared(True)
    if args.udp:
        pool = GstRtspServer.RTSPAddressPool()
        pool.add_range("127.0.0.1", "127.0.0.1", 50000, 60000, 0)
        factory.set_address_pool(pool)
        factory.set_protocols(GstRtsp.RTSPLowerTrans.UDP | GstRtsp.RTSPLowerTrans.TCP)
    else:
        # UDP would bind RTP ports on every interface; TCP keeps the stream on the one loopback socket.
        factory.set_protocols(GstRtsp.RTSPLowerTrans.TCP)
    server.get_mount_points().add_factory("/" + args.mount.lstrip("/"), factory)
    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr, flush=True)
        return 1

    loop = GLib.MainLoop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_HIGH, sig, loop.quit)
    print(f"READY rtsp://127.0.0.1:{server.get_bound_port()}/{args.mount.lstrip('/')}", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
