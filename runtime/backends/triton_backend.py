"""Triton client backend: a model served by Triton Inference Server, named by
``triton://HOST:PORT/MODEL[/VERSION]`` (gRPC) or ``triton+http://...`` (HTTP).

What the model is comes from the server: the model config's ``parameters`` (written by
`dilseg export triton`) carry dilseg's metadata, and ``dilseg_input`` says what to send:
``frame`` (BGR uint8 frames resized to the model's input; the server normalises them with
dilseg's own code) or ``tensor`` (the normalised NCHW tensor, for the ONNX Runtime and TensorRT
platforms). Labels come back. Everything is checked against the config before the first frame
and each response against what was asked, so a server whose model does not match its
description is an error, never a wrong mask.

A server that goes away mid-run (restart, crash) is waited for, up to ``reconnect`` seconds:
the request in flight is sent again once the model is ready, so the run continues and loses
no frame of a file (a live source keeps dropping to its newest frame meanwhile).

``shared_memory``: frames and labels travel through POSIX shared memory registered with the
server instead of the socket. None (auto, the default) uses it when the URL names this machine
and the server can map a probe region (a tritonserver in a container with a /dev/shm of its
own cannot: then the socket, with a warning saying why); True insists (an error when it cannot
work), False keeps the socket. gRPC requests are framed by
``triton_wire`` (the request's header serialised once per shape, each frame's bytes appended),
HTTP ones by tritonclient.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..errors import first_line
from ..metadata import METADATA_KEY, MetadataError, ModelMeta
from ..preprocess import input_size_for, preprocess
from ..triton_url import TritonURL, parse_triton_url
from .base import Backend, BackendError, BackendOptions, Capabilities
from .triton_wire import RawInfer

log = logging.getLogger("dilseg.triton")

INPUT_PARAM = "dilseg_input"
_NP = {"UINT8": np.uint8, "INT8": np.int8, "INT32": np.int32, "INT64": np.int64, "FP32": np.float32,
       "FP16": np.float16}
_LABEL_TYPES = ("INT32", "INT64", "UINT8", "INT8")
_FLOAT_TYPES = ("FP32", "FP16")


class TritonError(BackendError):
    """Something about a Triton-served model; the message names the URL and what to do."""


class TritonUnavailable(TritonError):
    """The server cannot be reached (down, wrong address, gone and not back in time)."""


class TritonModelError(TritonError):
    """The server runs, but the model is missing, not ready, or not a dilseg model."""


class TritonMismatch(TritonError):
    """The model's config, its metadata and what it returns do not agree."""


class TritonTimeout(TritonError):
    """The server did not answer within the timeout."""


@dataclass(frozen=True)
class TritonOptions(BackendOptions):
    timeout: float = 10.0  # seconds one request (or a status query) may take
    shared_memory: bool | None = None  # system shared memory for frames and labels; None: when the server can map it
    reconnect: float = 60.0  # seconds to wait for a lost server to come back; 0: fail at once

    def __post_init__(self) -> None:
        for flag, value in (("--timeout", self.timeout), ("--reconnect", self.reconnect)):
            if not isinstance(value, (int, float)) or value < 0:
                raise BackendError(f"{flag} {value}: must be seconds >= 0")
        if self.timeout == 0:
            raise BackendError("--timeout 0: a request needs some time; give seconds > 0")


@dataclass(frozen=True)
class ServedModel:
    """What a model config says, checked: the metadata and the tensors to send and expect."""

    meta: ModelMeta
    frame_input: bool  # True: BGR uint8 N x H x W x 3; False: the normalised N x 3 x H x W tensor
    max_batch_size: int
    input_name: str
    input_type: str  # Triton datatype: UINT8, FP32, FP16
    input_dims: tuple[int, ...]  # without the batch axis
    output_name: str
    output_type: str
    output_dims: tuple[int, ...]  # without the batch axis

    @classmethod
    def from_config(cls, config: dict, where: str) -> "ServedModel":
        def mismatch(problem: str) -> TritonMismatch:
            return TritonMismatch(f"{where}: {problem}; re-export the model with `dilseg export triton`")

        params = {k: (v or {}).get("string_value", "") for k, v in (config.get("parameters") or {}).items()}
        if METADATA_KEY not in params:
            raise TritonModelError(f"{where}: the model's config has no {METADATA_KEY!r} parameter, so its classes and "
                                   "normalisation are unknown; serve a repository made by `dilseg export triton`")
        try:
            meta = ModelMeta.from_json(params[METADATA_KEY])
        except MetadataError as exc:
            raise TritonModelError(f"{where}: the {METADATA_KEY!r} parameter is not dilseg metadata: {exc}") from None
        mode = params.get(INPUT_PARAM, "")
        if mode not in ("frame", "tensor"):
            raise TritonModelError(f"{where}: parameter {INPUT_PARAM!r} is {mode!r}, not 'frame' or 'tensor'")
        batch = int(config.get("max_batch_size", 0))
        inputs, outputs = config.get("input") or [], config.get("output") or []
        if len(inputs) != 1 or not outputs:
            raise mismatch(f"expected one input and an output, the config has {len(inputs)} and {len(outputs)}")

        def tensor(t: dict) -> tuple[str, str, tuple[int, ...]]:
            dims = tuple(int(d) for d in t.get("dims", []))
            if batch == 0:  # the batch axis is part of dims: it must take a batch of one
                if not dims or dims[0] not in (1, -1):
                    raise mismatch(f"{t['name']!r} has dims {list(dims)} without a batch of one in front")
                dims = dims[1:]
            return t["name"], str(t.get("data_type", "")).removeprefix("TYPE_"), dims

        in_name, in_type, in_dims = tensor(inputs[0])
        out = next((o for o in outputs if o["name"] == "labels"), outputs[0])
        out_name, out_type, out_dims = tensor(out)
        size = meta.input_size
        if mode == "frame":
            if in_type != "UINT8" or len(in_dims) != 3 or in_dims[2] != 3:
                raise mismatch(f"a frame input must be UINT8 H x W x 3, the config has {in_type} {list(in_dims)}")
            hw = in_dims[:2]
        else:
            if in_type not in _FLOAT_TYPES or len(in_dims) != 3 or in_dims[0] != 3:
                raise mismatch(f"a tensor input must be FP32/FP16 3 x H x W, the config has {in_type} {list(in_dims)}")
            hw = in_dims[1:]
        if size is not None and any(d != -1 and d != s for d, s in zip(hw, size)):
            raise mismatch(f"the input is {'x'.join(map(str, hw))} but the metadata's input size is {size[0]}x{size[1]}")
        if size is None and mode == "tensor" and any(d != -1 for d in hw):
            raise mismatch(f"the metadata says any input size, the config fixes {'x'.join(map(str, hw))}")
        if meta.output_kind == "labels":
            if out_type not in _LABEL_TYPES or len(out_dims) != 2:
                raise mismatch(f"labels must be integer H x W, the config's output {out_name!r} is {out_type} "
                               f"{list(out_dims)}")
        else:
            if out_type not in _FLOAT_TYPES or len(out_dims) != 3:
                raise mismatch(f"logits must be float C x H x W, the config's output {out_name!r} is {out_type} "
                               f"{list(out_dims)}")
            if out_dims[0] not in (-1, meta.num_classes):
                raise mismatch(f"the output has {out_dims[0]} classes but the metadata lists {meta.num_classes}")
        if size is not None and any(d != -1 and d != s for d, s in zip(out_dims[-2:], size)):
            raise mismatch(f"the output is {'x'.join(map(str, out_dims[-2:]))} but the metadata's input size is "
                           f"{size[0]}x{size[1]} (dilseg models return labels at their input size)")
        return cls(meta, mode == "frame", batch, in_name, in_type, in_dims, out_name, out_type, out_dims)


def tensor_to_frames(tensor: np.ndarray, meta: ModelMeta) -> np.ndarray:
    """The BGR uint8 frames a preprocessed N x 3 x H x W tensor was made from (undoes ``normalize``;
    exact for tensors made by ``preprocess``, whose float error is far below half a grey level)."""
    if tensor.ndim != 4 or tensor.shape[1] != 3:
        raise BackendError(f"expected an N x 3 x H x W tensor, got {'x'.join(map(str, tensor.shape))}")
    std = np.asarray(meta.std, np.float32).reshape(1, 3, 1, 1)
    mean = np.asarray(meta.mean, np.float32).reshape(1, 3, 1, 1)
    pixels = np.rint((tensor.astype(np.float32) * std + mean) * 255.0).clip(0, 255).astype(np.uint8)
    if meta.color_order == "RGB":
        pixels = pixels[:, ::-1]
    return np.ascontiguousarray(pixels.transpose(0, 2, 3, 1))


SHM_PREFIX = "dilseg_"  # /dev/shm/dilseg_<pid>_<id>_<role>


def remove_orphaned_regions(folder: str | Path = "/dev/shm") -> list[str]:
    """Unlink the regions a killed dilseg client left behind; returns their names. A region's
    memory is held until its file goes, so without this each killed client would keep ~0.7 MB of
    RAM per 360x480 stream until the machine restarts. A region is an orphan when the pid in its
    name does not run here and nobody holds the shared lock its owner keeps on it (a client in
    another pid namespace sharing this /dev/shm keeps its lock, so its regions stay)."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        parts = name.split("_")
        if not name.startswith(SHM_PREFIX) or len(parts) < 4 or not parts[1].isdigit():
            continue
        try:
            os.kill(int(parts[1]), 0)
            continue  # alive here
        except ProcessLookupError:
            pass
        except (PermissionError, OverflowError):
            continue
        path = os.path.join(folder, name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # its owner still holds it
        else:
            try:
                os.unlink(path)
                removed.append(name)
            except OSError:
                pass
        finally:
            os.close(fd)
    return removed


class _SharedMemory:
    """Input and output regions in /dev/shm, registered with the server; grown when a bigger batch
    needs it, registered again after a server restart."""

    def __init__(self, timeout: dict | None = None) -> None:
        import tritonclient.utils.shared_memory as shm

        self.shm = shm
        # A stopped server must not hang a registration: gRPC calls take ``client_timeout``
        # (HTTP clients carry their timeout already).
        self.timeout = timeout or {}
        self.tag = f"{SHM_PREFIX}{os.getpid()}_{id(self):x}"
        self.regions: dict[str, tuple[object, int]] = {}  # role -> (handle, bytes)
        self.locks: dict[str, int] = {}  # role -> fd holding a shared lock on its file

    def probe(self, client) -> None:
        """Register and drop a small region: raises what the server answers when it cannot map
        this machine's shared memory."""
        self.ensure(client, "probe", 64)
        self._drop(client, "probe")

    def name(self, role: str) -> str:
        return f"{self.tag}_{role}"

    def ensure(self, client, role: str, nbytes: int) -> object:
        handle, size = self.regions.get(role, (None, 0))
        if size >= nbytes:
            return handle
        if handle is not None:
            self._drop(client, role)
        handle = self.shm.create_shared_memory_region(self.name(role), f"/{self.name(role)}", nbytes)
        self.regions[role] = (handle, nbytes)
        self._hold(role)
        try:
            client.register_system_shared_memory(self.name(role), f"/{self.name(role)}", nbytes, **self.timeout)
        except Exception:
            # Not known to be registered (a timeout may or may not have reached the server): made
            # again, and registered, by the next request.
            self._drop(client, role)
            raise
        return handle

    def _hold(self, role: str) -> None:
        """A shared lock on the region's file for as long as it is ours (remove_orphaned_regions)."""
        try:
            fd = os.open(f"/dev/shm/{self.name(role)}", os.O_RDONLY)
        except OSError:  # shared memory elsewhere than /dev/shm: nothing to mark
            return
        fcntl.flock(fd, fcntl.LOCK_SH)
        self.locks[role] = fd

    def register_all(self, client) -> None:
        """After a reconnect: a restarted server has forgotten the regions, one that only dropped
        the connection still knows them; either way they end up registered once."""
        for role, (_, size) in self.regions.items():
            try:
                client.unregister_system_shared_memory(self.name(role), **self.timeout)
            except Exception:  # not registered (a restarted server): nothing to undo
                pass
            client.register_system_shared_memory(self.name(role), f"/{self.name(role)}", size, **self.timeout)

    def _drop(self, client, role: str) -> None:
        handle, _ = self.regions.pop(role)
        if client is not None:
            try:
                client.unregister_system_shared_memory(self.name(role), **self.timeout)
            except Exception:  # the server may be gone already: the region is ours to free regardless
                pass
        self.shm.destroy_shared_memory_region(handle)
        fd = self.locks.pop(role, None)
        if fd is not None:
            os.close(fd)

    def close(self, client) -> None:
        for role in list(self.regions):
            self._drop(client, role)


def _reason(exc: BaseException) -> str:
    msg = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
    return first_line(msg or type(exc).__name__) or type(exc).__name__


# Errors that mean the server (or the model on it) went away, as a restart looks from the client.
_GONE = ("unavailable", "failed to connect", "connection refused", "connection reset", "socket closed",
         "broken pipe", "unknown model", "not ready", "no available versions", "is not found", "server is stopping",
         "exiting", "unloading", "endpoint", "eof", "remotedisconnected", "connection aborted", "connection closed")


def _classify(exc: BaseException) -> str:
    """'timeout', 'gone' (worth reconnecting) or 'refused' (the server answered no)."""
    status = str(exc.status()) if hasattr(exc, "status") and callable(exc.status) else ""
    text = f"{status} {_reason(exc)} {type(exc).__name__}".lower()
    if "deadline_exceeded" in text or "timeout" in text or "timed out" in text or isinstance(exc, socket.timeout):
        return "timeout"
    if isinstance(exc, (ConnectionError, EOFError)) or any(k in text for k in _GONE):
        return "gone"
    if isinstance(exc, OSError):
        return "gone"
    return "refused"


class TritonBackend(Backend):
    name = "triton"
    label = "Triton"
    suffixes = ()
    artifacts = "models served by Triton Inference Server (triton://HOST:PORT/MODEL)"
    selection_hint = "pass --model triton://HOST:PORT/MODEL (gRPC) or triton+http://HOST:PORT/MODEL"
    Options = TritonOptions
    requires = (("tritonclient", "pip install 'dilseg[triton]'"),)

    def __init__(self, url: str | TritonURL, options: TritonOptions | None = None, **kwargs) -> None:
        self.url = url if isinstance(url, TritonURL) else parse_triton_url(str(url))
        super().__init__(Path(self.url.model), options if options is not None or not kwargs else TritonOptions(**kwargs))
        self.served: ServedModel | None = None
        self.transport = ""  # how frames travel: "gRPC", "HTTP", either "+ shared memory"
        self.reconnects = 0  # times the server was lost and found again
        self._module = None
        self._shared: _SharedMemory | None = None
        self._local = threading.local()  # the HTTP client is not thread-safe: one per thread
        self._grpc_client = None
        self._raw: RawInfer | None = None  # ModelInfer (gRPC), its channel its own
        self._lock = threading.Lock()
        self._closing = threading.Event()  # set by close(): a reconnect waiting in another thread gives up

    def __str__(self) -> str:
        return str(self.url)

    # -- connection ----------------------------------------------------------------------------

    def _client(self):
        if self.url.protocol == "grpc":
            if self._grpc_client is None:
                self._grpc_client = self._module.InferenceServerClient(self.url.address)
            return self._grpc_client
        client = getattr(self._local, "client", None)
        if client is None:
            t = self.options.timeout
            client = self._module.InferenceServerClient(self.url.address, connection_timeout=t, network_timeout=t)
            self._local.client = client
        return client

    def _drop_clients(self) -> None:
        for client in (self._grpc_client, self._raw, getattr(self._local, "client", None)):
            if client is not None:
                try:
                    client.close()
                except Exception:  # closing a dead connection may fail; it is being discarded
                    pass
        self._grpc_client = self._raw = None
        self._local = threading.local()

    def _ask(self, what: str, call, *args, **kwargs):
        """A status query with the timeout, its failure as the error a user can act on."""
        if self.url.protocol == "grpc":
            kwargs["client_timeout"] = self.options.timeout
        try:
            return call(*args, **kwargs)
        except Exception as exc:  # tritonclient, grpc and socket errors alike
            kind = _classify(exc)
            if kind == "timeout":
                raise TritonTimeout(f"{self.url}: the server did not answer {what} within {self.options.timeout:g} s "
                                    "(raise --timeout if it is busy)") from None
            if kind == "gone":
                raise TritonUnavailable(f"{self.url}: cannot reach Triton Inference Server at {self.url.address} "
                                        f"({_reason(exc)}); start tritonserver there or check the host and port "
                                        f"({'gRPC' if self.url.protocol == 'grpc' else 'HTTP'} port)") from None
            raise TritonModelError(f"{self.url}: {what} failed: {_reason(exc)}") from None

    def _config(self, client) -> dict:
        if self.url.protocol == "grpc":
            reply = self._ask("the model config", client.get_model_config, self.url.model, self.url.version,
                              as_json=True)
            return reply.get("config", {})
        return self._ask("the model config", client.get_model_config, self.url.model, self.url.version)

    def _not_ready(self, client) -> TritonModelError:
        """Why the model is not ready, from the server's repository index."""
        index = self._ask("the repository index", client.get_model_repository_index,
                          **({"as_json": True} if self.url.protocol == "grpc" else {}))
        models = index.get("models", []) if isinstance(index, dict) else index
        mine = [m for m in models if m.get("name") == self.url.model]
        if not mine:
            names = sorted({m.get("name", "?") for m in models})
            return TritonModelError(f"{self.url}: the server has no model {self.url.model!r} (it has: "
                                    f"{', '.join(names) or 'none'}); check the name, or add it to the repository "
                                    "with `dilseg export triton`")
        if self.url.version and not any(m.get("version") == self.url.version for m in mine):
            have = sorted(m.get("version", "?") for m in mine)
            return TritonModelError(f"{self.url}: model {self.url.model!r} has no version {self.url.version} "
                                    f"(versions: {', '.join(have)})")
        # An entry without a state is a model the server has seen in its repository but never loaded.
        state = "; ".join((f"version {m['version']}: " if m.get("version") else "") + m.get("state", "not loaded")
                          + (f" ({first_line(m['reason'])})" if m.get("reason") else "") for m in mine)
        return TritonModelError(f"{self.url}: model {self.url.model!r} is not ready ({state}); load it (tritonserver "
                                "--model-control-mode=explicit --load-model=NAME, or POST /v2/repository/models/NAME/"
                                "load) or see tritonserver's log for why it failed")

    def _connect(self) -> ServedModel:
        client = self._client()
        if not self._ask("whether it is live", client.is_server_live):
            raise TritonUnavailable(f"{self.url}: the server answers but is not live; see tritonserver's log")
        if not self._ask("whether the model is ready", client.is_model_ready, self.url.model, self.url.version):
            raise self._not_ready(client)
        return ServedModel.from_config(self._config(client), str(self.url))

    def load_impl(self) -> None:
        try:
            if self.url.protocol == "grpc":
                import tritonclient.grpc as module
            else:
                import tritonclient.http as module
        except ImportError as exc:
            raise TritonError(f"the Triton client needs tritonclient ({exc}); pip install 'dilseg[triton]'") from None
        self._module = module
        self._closing.clear()
        wanted = self.options.shared_memory
        if wanted and not self.url.local:
            raise TritonError(f"{self.url}: --shared-memory on needs the server on this machine (127.0.0.1 or "
                              f"localhost), not {self.url.host}")
        self.served = self._connect()
        self.meta = self.served.meta
        # What the server takes decides how frames are prepared: a frame server gets resized uint8 frames.
        self.capabilities = Capabilities(frame_input=self.served.frame_input)
        self.transport = "gRPC" if self.url.protocol == "grpc" else "HTTP"
        if wanted is False or not self.url.local:
            return
        remove_orphaned_regions()
        shared = _SharedMemory({"client_timeout": self.options.timeout} if self.url.protocol == "grpc" else None)
        try:
            shared.probe(self._client())
        except Exception as exc:  # the server's refusal (tritonclient) or this machine's (OSError)
            shared.close(None)
            ours = isinstance(exc, (OSError, shared.shm.SharedMemoryException))
            kind = "refused" if ours else _classify(exc)
            if kind == "timeout":
                raise TritonTimeout(f"{self.url}: the server did not answer a shared-memory registration within "
                                    f"{self.options.timeout:g} s (raise --timeout if it is busy)") from None
            if kind == "gone":
                raise TritonUnavailable(f"{self.url}: lost the server while registering shared memory "
                                        f"({_reason(exc)}); check tritonserver") from None
            if wanted:
                raise TritonError(f"{self.url}: --shared-memory on, but the server cannot use this machine's shared "
                                  f"memory ({_reason(exc)}); a tritonserver in a container needs --ipc=host, or "
                                  "pass --shared-memory off") from None
            log.warning("%s: the server cannot map this machine's shared memory (%s); frames go over the socket "
                        "(a tritonserver in a container needs --ipc=host for it)", self.url, _reason(exc))
            return
        self._shared = shared
        self.transport += " + shared memory"

    def _reconnect(self, cause: BaseException) -> None:
        wait = self.options.reconnect
        if not wait:
            raise TritonUnavailable(f"{self.url}: lost the server ({_reason(cause)}); pass --reconnect SECONDS to "
                                    "wait for it to come back") from None
        log.warning("lost Triton at %s (%s); reconnecting for up to %g s", self.url, _reason(cause), wait)
        t0 = time.monotonic()
        delay, last = 0.1, cause
        while True:
            self._drop_clients()
            try:
                served = self._connect()
                if served != self.served:
                    raise TritonMismatch(f"{self.url}: the model on the server changed while this run used it; "
                                         "restart the run for the new model")
                if self._shared is not None:
                    self._shared.register_all(self._client())
                self.reconnects += 1
                log.warning("reconnected to %s after %.1f s", self.url, time.monotonic() - t0)
                return
            except TritonMismatch:
                raise
            except Exception as exc:  # not back yet: tritonclient, grpc and socket errors alike
                last = exc
            if time.monotonic() - t0 > wait:
                raise TritonUnavailable(f"{self.url}: lost the server and it did not come back within {wait:g} s "
                                        f"(last: {_reason(last)})") from None
            if self._closing.wait(delay):
                raise TritonUnavailable(f"{self.url}: closed while waiting for the lost server") from None
            delay = min(delay * 2, 1.0)

    # -- inference -----------------------------------------------------------------------------

    def infer_frame(self, frame_bgr: np.ndarray) -> np.ndarray:
        """A BGR uint8 frame, resized here to the model's input (the server normalises it)."""
        self.require_loaded()
        if not self.served.frame_input:
            return self.infer(preprocess(frame_bgr, self.meta))
        if frame_bgr.dtype != np.uint8 or frame_bgr.ndim != 3 or frame_bgr.shape[2] != 3:
            raise BackendError(f"expected a BGR uint8 HxWx3 frame, got {frame_bgr.dtype} {frame_bgr.shape}")
        h, w = input_size_for(frame_bgr.shape, self.meta)
        if frame_bgr.shape[:2] != (h, w):
            frame_bgr = cv2.resize(frame_bgr, (w, h), interpolation=cv2.INTER_LINEAR)
        output = self._request(np.ascontiguousarray(frame_bgr[None]))
        self.counts.add(1)
        return output

    def batch_range(self) -> tuple[int, int | None]:
        """What the server's config allows: up to its max_batch_size frames in one request (its
        dynamic batcher may still join requests of several clients into one execution)."""
        self.require_loaded()
        return (1, max(self.served.max_batch_size, 1))

    def infer_impl(self, tensor: np.ndarray) -> np.ndarray:
        if tensor.ndim != 4:
            raise BackendError(f"expected an N x 3 x H x W tensor, got {'x'.join(map(str, tensor.shape))}")
        if self.served.frame_input:
            data = tensor_to_frames(tensor, self.meta)
        else:
            data = np.ascontiguousarray(tensor.astype(_NP[self.served.input_type], copy=False))
        return self._request(data)

    def _request(self, batch: np.ndarray) -> np.ndarray:
        served = self.served
        n = batch.shape[0]
        if served.max_batch_size == 0 and n != 1:
            raise BackendError(f"{self.url}: the model is served without batching (max_batch_size 0); send one frame")
        if n > max(served.max_batch_size, 1):
            raise BackendError(f"{self.url}: a batch of {n} exceeds the model's max_batch_size {served.max_batch_size}")
        with self._lock:
            registered_again = False
            while True:
                try:
                    return self._check(self._send(batch), batch)
                except TritonError:
                    raise
                except Exception as exc:  # tritonclient, grpc, gevent and socket errors
                    if (self._shared is not None and not registered_again
                            and "unable to find shared memory region" in _reason(exc).lower()):
                        # The server forgot our regions without dropping the connection (a
                        # registration lost to a timeout, an unregister by someone else): once more.
                        registered_again = True
                        try:
                            self._shared.register_all(self._client())
                            continue
                        except Exception:  # noqa: BLE001 - the request's own error is reported below
                            pass
                    kind = _classify(exc)
                    if kind == "timeout":
                        raise TritonTimeout(f"{self.url}: no answer within {self.options.timeout:g} s (a busy or "
                                            "stuck server; raise --timeout, or check tritonserver)") from None
                    if kind == "refused":
                        raise TritonError(f"{self.url}: the server refused the request: {_reason(exc)}") from None
                    self._reconnect(exc)

    def _send(self, batch: np.ndarray) -> np.ndarray:
        served = self.served
        client = self._client()
        out_elems = batch.shape[0] * int(np.prod(self._expected(batch)[1:]))
        out_bytes = out_elems * np.dtype(_NP[served.output_type]).itemsize
        regions = out_region = None
        if self._shared is not None:
            region = self._shared.ensure(client, "in", batch.nbytes)
            self._shared.shm.set_shared_memory_region(region, [batch])
            out_region = self._shared.ensure(client, "out", out_bytes)
            regions = ((self._shared.name("in"), batch.nbytes), (self._shared.name("out"), out_bytes))
        # Batched, Triton adds the batch axis; unbatched, the config's dims begin with the batch of one.
        if self.url.protocol == "grpc":
            result = self._raw_infer(batch, regions)
        else:
            result = self._http_infer(client, batch, regions)
        if self._shared is None:
            labels = result.as_numpy(served.output_name)
            if labels is None:
                raise TritonMismatch(f"{self.url}: the response has no output {served.output_name!r}")
            return labels
        info = result.get_output(served.output_name)
        dims = info["shape"] if isinstance(info, dict) else info.shape
        datatype = info["datatype"] if isinstance(info, dict) else info.datatype
        # A copy: the region is written again by the next request.
        return np.array(self._shared.shm.get_contents_as_numpy(out_region, _NP.get(datatype, np.int32),
                                                               [int(d) for d in dims]))

    def _raw_infer(self, batch: np.ndarray, regions: tuple | None):
        """gRPC: the request's header serialised once per shape, the frame's bytes appended."""
        if self._raw is None:
            self._raw = RawInfer(self.url.address)
        served = self.served
        header = self._raw.header(self.url.model, self.url.version, served.input_name, served.input_type,
                                  batch.shape, served.output_name, *(regions or (None, None)))
        return self._raw.infer(header, None if regions else batch, timeout=self.options.timeout)

    def _http_infer(self, client, batch: np.ndarray, regions: tuple | None):
        module, served = self._module, self.served
        inp = module.InferInput(served.input_name, list(batch.shape), served.input_type)
        out = module.InferRequestedOutput(served.output_name, binary_data=True)
        if regions:
            inp.set_shared_memory(*regions[0])
            out.set_shared_memory(*regions[1])
        else:
            inp.set_data_from_numpy(batch, binary_data=True)
        return client.infer(self.url.model, [inp], model_version=self.url.version, outputs=[out])

    def _expected(self, batch: np.ndarray) -> tuple[int, ...]:
        """The output shape a batch should produce (dilseg models answer at their input size)."""
        served = self.served
        hw = batch.shape[1:3] if served.frame_input else batch.shape[2:]
        dims = tuple(d if d != -1 else s for d, s in zip(served.output_dims[-2:], hw))
        if self.meta.output_kind == "logits":
            return (batch.shape[0], self.meta.num_classes, *dims)
        return (batch.shape[0], *dims)

    def _check(self, output: np.ndarray, batch: np.ndarray) -> np.ndarray:
        expected = self._expected(batch)
        if self.served.max_batch_size == 0 and output.shape == expected[1:]:
            output = output[None]
        if output.shape != expected:
            raise TritonMismatch(f"{self.url}: the server returned {'x'.join(map(str, output.shape))} for a batch of "
                                 f"{batch.shape[0]}, expected {'x'.join(map(str, expected))}: the served model does not "
                                 "match its config; re-export it with `dilseg export triton`")
        if self.meta.output_kind == "labels" and output.size:
            low, high = int(output.min()), int(output.max())
            if low < 0 or high >= self.meta.num_classes:
                raise TritonMismatch(f"{self.url}: the server returned class id {high if high >= 0 else low} but the "
                                     f"model's metadata lists {self.meta.num_classes} classes: the served model and "
                                     "its config parameters disagree; re-export it with `dilseg export triton`")
        return output

    # -- for people, tests and benchmarks -------------------------------------------------------

    def describe(self) -> dict:
        """What the server's config says beyond the metadata: the tensors, batching, what is sent."""
        self.require_loaded()
        s = self.served
        return {"server": str(self.url), "sends": "BGR uint8 frames" if s.frame_input else "normalised tensors",
                "transport": self.transport, "max_batch_size": s.max_batch_size,
                "input": f"{s.input_name}: {s.input_type} {list(s.input_dims)}",
                "output": f"{s.output_name}: {s.output_type} {list(s.output_dims)}"}


    def statistics(self) -> dict:
        """The server's inference statistics of this model (Triton's JSON: batch_stats, counts, times)."""
        self.require_loaded()
        client = self._client()
        stats = self._ask("statistics", client.get_inference_statistics, self.url.model, self.url.version,
                          **({"as_json": True} if self.url.protocol == "grpc" else {}))
        return (stats.get("model_stats") or [{}])[0]

    def close_impl(self) -> None:
        self._closing.set()
        if self._shared is not None:
            try:
                client = self._client() if self._module is not None else None
            except Exception:  # no client can be made: the regions are still freed
                client = None
            self._shared.close(client)
            self._shared = None
        self._drop_clients()
