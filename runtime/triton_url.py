"""``triton://HOST:PORT/MODEL[/VERSION]`` (gRPC) and ``triton+http://...`` (HTTP): where a model
served by Triton Inference Server lives. Parsing needs no tritonclient, so the CLI and the
backend factory can recognise these URLs before the client library is imported."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from .errors import DilsegError

SCHEMES = {"triton": "grpc", "triton+grpc": "grpc", "triton+http": "http"}
DEFAULT_PORTS = {"grpc": 8001, "http": 8000}  # tritonserver's own defaults
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
EXAMPLE = "triton://127.0.0.1:8001/edge_m (gRPC) or triton+http://127.0.0.1:8000/edge_m/1 (HTTP)"


class TritonURLError(DilsegError, ValueError):
    """A triton:// URL that does not name a server and a model."""


@dataclass(frozen=True)
class TritonURL:
    protocol: str  # "grpc" or "http"
    host: str
    port: int
    model: str
    version: str = ""  # "" : the server's choice (its latest ready version)

    @property
    def address(self) -> str:
        """``HOST:PORT`` as tritonclient takes it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def local(self) -> bool:
        return self.host in LOCAL_HOSTS

    def __str__(self) -> str:
        scheme = "triton" if self.protocol == "grpc" else "triton+http"
        return f"{scheme}://{self.address}/{self.model}" + (f"/{self.version}" if self.version else "")


def is_triton_url(text: object) -> bool:
    return isinstance(text, str) and text.split("://", 1)[0].lower() in SCHEMES and "://" in text


def parse_triton_url(text: str) -> TritonURL:
    if not is_triton_url(text):
        raise TritonURLError(f"{text!r}: not a Triton URL; expected {EXAMPLE}")
    parts = urllib.parse.urlsplit(text)
    protocol = SCHEMES[parts.scheme.lower()]
    if not parts.hostname:
        raise TritonURLError(f"{text}: no server host; expected {EXAMPLE}")
    try:
        port = parts.port or DEFAULT_PORTS[protocol]
    except ValueError:
        raise TritonURLError(f"{text}: the port is not a number in 1..65535") from None
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise TritonURLError(f"{text}: name the model (and optionally its version) after the host: {EXAMPLE}")
    version = path[1] if len(path) == 2 else ""
    if version and not version.isdigit():
        raise TritonURLError(f"{text}: model version {version!r} is not a number")
    if parts.query or parts.fragment:
        raise TritonURLError(f"{text}: a Triton URL takes no ?query or #fragment; backend options are flags")
    return TritonURL(protocol, parts.hostname, port, path[0], version)
