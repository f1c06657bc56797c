"""Why a stream URL did not open, asked of the server itself.

OpenCV's FFmpeg backend reports any failure as "not opened", whether the port refused the
connection at once, the server answered 404, or nothing answered at all. After such a failure
one plain request (an HTTP GET, an RTSP DESCRIBE, a TCP connect) says which it was, so the message
can say "connection refused" or "HTTP 404 Not Found" instead of blaming a timeout.
"""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from urllib.parse import urlsplit

DEFAULT_PORTS = {"rtsp": 554, "rtsps": 322, "rtmp": 1935, "http": 80, "https": 443}


def _connect(host: str, port: int, timeout: float) -> tuple[socket.socket | None, str | None]:
    try:
        return socket.create_connection((host, port), timeout=timeout), None
    except ConnectionRefusedError:
        return None, f"connection refused by {host}:{port} (nothing listens there)"
    except socket.gaierror:
        return None, f"cannot resolve the host name {host!r}"
    except (TimeoutError, socket.timeout):
        return None, f"no answer from {host}:{port} within {timeout:g}s"
    except OSError as exc:
        return None, f"cannot connect to {host}:{port}: {exc.strerror or exc}"


def _http(url: str, timeout: float) -> str | None:
    req = urllib.request.Request(url, headers={"User-Agent": "dilseg", "Range": "bytes=0-0"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            kind = resp.headers.get("Content-Type", "unknown")
            return f"the server answered HTTP {resp.status} with {kind}, which OpenCV could not read as video"
    except urllib.error.HTTPError as exc:
        return f"the server answered HTTP {exc.code} {exc.reason}"
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, ConnectionRefusedError):
            parts = urlsplit(url)
            return f"connection refused by {parts.hostname}:{parts.port or DEFAULT_PORTS[parts.scheme]} " \
                   "(nothing listens there)"
        if isinstance(reason, socket.gaierror):
            return f"cannot resolve the host name {urlsplit(url).hostname!r}"
        return f"cannot connect: {getattr(reason, 'strerror', None) or reason}"
    except (TimeoutError, socket.timeout):
        return f"no answer within {timeout:g}s"
    except OSError as exc:
        return f"cannot connect: {exc.strerror or exc}"


def _rtsp(url: str, host: str, port: int, timeout: float) -> str | None:
    sock, why = _connect(host, port, timeout)
    if sock is None:
        return why
    with sock:
        try:
            sock.sendall(f"DESCRIBE {url} RTSP/1.0\r\nCSeq: 1\r\nAccept: application/sdp\r\n"
                         "User-Agent: dilseg\r\n\r\n".encode())
            status = sock.recv(4096).split(b"\r\n", 1)[0].decode("latin-1").strip()
        except OSError as exc:
            return f"{host}:{port} accepted the connection but did not answer ({exc.strerror or exc})"
    parts = status.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("RTSP/"):
        return f"{host}:{port} is not an RTSP server (it answered {status[:60]!r})" if status else \
            f"{host}:{port} closed the connection without an RTSP answer"
    if parts[1] == "200":
        return "the RTSP server has this stream, but OpenCV could not read it (codec or transport)"
    hint = {"404": " (no stream at this path)",
            "401": " (check the user and password in the URL)" if urlsplit(url).username else
            " (credentials needed: rtsp://USER:PASS@HOST/...)"}.get(parts[1], "")
    return f"the RTSP server answered {' '.join(parts[1:])}{hint}"


def why_not_open(url: str, timeout: float = 3.0) -> str | None:
    """A short reason the stream at ``url`` cannot be opened, or None when one request cannot tell
    (UDP, which nothing answers; a TCP port that accepts)."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        return f"the port in {url!r} is not a number"
    host = parts.hostname
    if not host:
        return None
    if scheme in ("http", "https"):
        return _http(url, timeout)
    if scheme == "rtsp":
        return _rtsp(url, host, port or DEFAULT_PORTS["rtsp"], timeout)
    if scheme in DEFAULT_PORTS or (scheme == "tcp" and port):
        sock, why = _connect(host, port or DEFAULT_PORTS.get(scheme, 0), timeout)
        if sock is not None:
            sock.close()
        return why
    return None
