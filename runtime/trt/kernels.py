"""GPU pre- and post-processing with pycuda kernels, matching the CPU path.

Preprocess: the uint8 BGR frame (any size) is uploaded once; one kernel resizes it
bilinearly, reorders channels, normalises and writes NCHW fp32 or fp16 straight into the
engine's input buffer. Postprocess: a second kernel maps the model-resolution label map to
the frame (nearest neighbour, as ``postprocess.resize_labels``), colours it with the
palette and blends it over the frame already on the GPU (as ``postprocess.overlay``).

Parity with the CPU path is by construction: the sampling tables (source rows/columns and
11-bit fixed-point weights) are computed once on the host by the same numpy code the
reference functions below use, and the kernels do the same integer arithmetic as OpenCV's
vectorised INTER_LINEAR for uint8 (``(w * (h >> 4)) >> 16`` per row, then ``(v + 2) >> 2``).
Measured here against cv2.resize: identical on downscales, at most 1 grey level apart on
some upscaled rows (OpenCV's border handling). Normalisation uses unfused multiply/add so
it rounds exactly like numpy's float32 ``x * scale + shift``.

The numpy reference functions need no GPU and are what the kernels are tested against.
pycuda is imported only by the GPU classes.
"""

from __future__ import annotations

import numpy as np

from ..backends.base import BackendError
from ..metadata import ModelMeta
from ..postprocess import palette_bgr
from .deps import import_pycuda as _import_pycuda

COEF_BITS = 11
COEF_SCALE = 1 << COEF_BITS  # OpenCV's INTER_RESIZE_COEF_SCALE


# -- sampling tables (shared by kernels and references) ----------------------------------------

def linear_tables(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output index: first and second source index and the 11-bit weight of the first,
    computed like OpenCV (float32 source coordinate with half-pixel centres, clamped)."""
    scale = n_in / n_out
    f = ((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    i0 = np.floor(f).astype(np.int64)
    a = (f - i0.astype(np.float32)).astype(np.float32)
    low = i0 < 0
    a[low], i0[low] = 0, 0
    high = i0 >= n_in - 1
    a[high], i0[high] = 0, n_in - 1
    i1 = np.minimum(i0 + 1, n_in - 1)
    c0 = np.round((np.float32(1) - a) * np.float32(COEF_SCALE)).astype(np.int32)
    return i0.astype(np.int32), i1.astype(np.int32), c0.astype(np.int32)


def nearest_table(n_in: int, n_out: int) -> np.ndarray:
    """Per output index: the source index cv2.INTER_NEAREST picks."""
    return np.minimum(np.floor(np.arange(n_out) * (n_in / n_out)).astype(np.int64), n_in - 1).astype(np.int32)


def normalisation(meta: ModelMeta) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source channel per output channel, float32 scale, float32 shift) as ``preprocess.normalize``."""
    order = np.array([2, 1, 0] if meta.color_order == "RGB" else [0, 1, 2], np.int32)
    std = np.asarray(meta.std, dtype=np.float32)
    scale = (1.0 / (255.0 * std)).astype(np.float32)
    shift = (-np.asarray(meta.mean, dtype=np.float32) / std).astype(np.float32)
    return order, scale, shift


# -- numpy references (what the kernels compute) -----------------------------------------------

def resize_bilinear_reference(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 HxWxC -> uint8 hxwxC, the kernel's arithmetic (OpenCV INTER_LINEAR, fixed point)."""
    h, w = size
    ih, iw = frame.shape[:2]
    x0, x1, cx = linear_tables(iw, w)
    y0, y1, cy = linear_tables(ih, h)
    img = frame.astype(np.int64)
    cx0, cx1 = cx[None, :, None].astype(np.int64), (COEF_SCALE - cx)[None, :, None].astype(np.int64)
    h0 = img[y0][:, x0] * cx0 + img[y0][:, x1] * cx1
    h1 = img[y1][:, x0] * cx0 + img[y1][:, x1] * cx1
    r0, r1 = cy[:, None, None].astype(np.int64), (COEF_SCALE - cy)[:, None, None].astype(np.int64)
    v = ((r0 * (h0 >> 4)) >> 16) + ((r1 * (h1 >> 4)) >> 16)
    return np.clip((v + 2) >> 2, 0, 255).astype(np.uint8)


def preprocess_reference(frame_bgr: np.ndarray, meta: ModelMeta, size: tuple[int, int],
                         dtype=np.float32) -> np.ndarray:
    """The preprocess kernel's output, 1x3xhxw: resize, channel order, (x/255 - mean)/std."""
    resized = resize_bilinear_reference(frame_bgr, size)
    order, scale, shift = normalisation(meta)
    out = np.empty((1, 3, *size), np.float32)
    for c in range(3):
        np.multiply(resized[:, :, order[c]], scale[c], out=out[0, c], casting="unsafe")
        out[0, c] += shift[c]
    return out.astype(dtype, copy=False)


def render_reference(labels: np.ndarray, frame: np.ndarray, meta: ModelMeta, alpha: float = 0.5,
                     visible: list[int] | None = None, view: str = "overlay") -> tuple[np.ndarray, np.ndarray]:
    """The render kernel's output: (BGR picture at frame size, uint8 labels at frame size)."""
    fh, fw = frame.shape[:2]
    lh, lw = labels.shape[-2:]
    lab = np.asarray(labels).reshape(lh, lw).astype(np.int64) & 255  # as astype(uint8) wraps
    big = lab[nearest_table(lh, fh)][:, nearest_table(lw, fw)].astype(np.uint8)
    lut = palette_bgr(meta, visible)
    mask = lut[big]
    if view == "mask":
        return mask, big
    a = np.float32(alpha)
    blended = np.rint(mask.astype(np.float32) * a + frame.astype(np.float32) * (np.float32(1) - a))
    out = np.clip(blended, 0, 255).astype(np.uint8)
    if visible is not None:
        keep = ~np.isin(big, visible)
        out[keep] = frame[keep]
    return out, big


# -- kernels -----------------------------------------------------------------------------------

KERNELS = r"""
#include <cuda_fp16.h>

__device__ __forceinline__ int lerp_u8(const unsigned char* row0, const unsigned char* row1, int xa, int xb,
                                        int a0, int r0) {
    int a1 = 2048 - a0, r1 = 2048 - r0;
    int h0 = row0[xa] * a0 + row0[xb] * a1;
    int h1 = row1[xa] * a0 + row1[xb] * a1;
    int v = ((r0 * (h0 >> 4)) >> 16) + ((r1 * (h1 >> 4)) >> 16);
    v = (v + 2) >> 2;
    return v < 0 ? 0 : (v > 255 ? 255 : v);
}

__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half_rn(v); }

template <typename T>
__device__ void resize_normalize(const unsigned char* __restrict__ src, int src_pitch,
                                 const int* __restrict__ x0, const int* __restrict__ x1, const int* __restrict__ cx,
                                 const int* __restrict__ y0, const int* __restrict__ y1, const int* __restrict__ cy,
                                 int out_h, int out_w, int ch0, int ch1, int ch2,
                                 float s0, float s1, float s2, float b0, float b1, float b2,
                                 T* __restrict__ dst) {
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= out_w || y >= out_h) return;
    const unsigned char* row0 = src + (size_t)y0[y] * src_pitch;
    const unsigned char* row1 = src + (size_t)y1[y] * src_pitch;
    int xa = x0[x] * 3, xb = x1[x] * 3, a0 = cx[x], r0 = cy[y];
    size_t plane = (size_t)out_h * out_w, at = (size_t)y * out_w + x;
    // __fmul_rn/__fadd_rn: no fused multiply-add, so the rounding is numpy's float32 x*scale + shift.
    store(dst + at,             __fadd_rn(__fmul_rn((float)lerp_u8(row0, row1, xa + ch0, xb + ch0, a0, r0), s0), b0));
    store(dst + plane + at,     __fadd_rn(__fmul_rn((float)lerp_u8(row0, row1, xa + ch1, xb + ch1, a0, r0), s1), b1));
    store(dst + 2 * plane + at, __fadd_rn(__fmul_rn((float)lerp_u8(row0, row1, xa + ch2, xb + ch2, a0, r0), s2), b2));
}

extern "C" __global__ void resize_normalize_f32(const unsigned char* src, int src_pitch, const int* x0, const int* x1,
        const int* cx, const int* y0, const int* y1, const int* cy, int out_h, int out_w, int ch0, int ch1, int ch2,
        float s0, float s1, float s2, float b0, float b1, float b2, float* dst) {
    resize_normalize<float>(src, src_pitch, x0, x1, cx, y0, y1, cy, out_h, out_w, ch0, ch1, ch2, s0, s1, s2, b0, b1, b2, dst);
}

extern "C" __global__ void resize_normalize_f16(const unsigned char* src, int src_pitch, const int* x0, const int* x1,
        const int* cx, const int* y0, const int* y1, const int* cy, int out_h, int out_w, int ch0, int ch1, int ch2,
        float s0, float s1, float s2, float b0, float b1, float b2, __half* dst) {
    resize_normalize<__half>(src, src_pitch, x0, x1, cx, y0, y1, cy, out_h, out_w, ch0, ch1, ch2, s0, s1, s2, b0, b1, b2, dst);
}

template <typename L>
__device__ void colorize_blend(const L* __restrict__ labels, int lab_w, const int* __restrict__ ys,
                               const int* __restrict__ xs, const unsigned char* __restrict__ lut,
                               const unsigned char* __restrict__ visible, const unsigned char* __restrict__ frame,
                               int frame_pitch, int out_h, int out_w, float alpha, int mask_only,
                               unsigned char* __restrict__ out, int out_pitch, unsigned char* __restrict__ labels_out) {
    int x = blockIdx.x * blockDim.x + threadIdx.x;
    int y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x >= out_w || y >= out_h) return;
    int id = ((int)labels[(size_t)ys[y] * lab_w + xs[x]]) & 255;
    if (labels_out) labels_out[(size_t)y * out_w + x] = (unsigned char)id;
    const unsigned char* f = frame + (size_t)y * frame_pitch + 3 * x;
    unsigned char* o = out + (size_t)y * out_pitch + 3 * x;
    const unsigned char* c = lut + 3 * id;
    if (mask_only) { o[0] = c[0]; o[1] = c[1]; o[2] = c[2]; return; }
    if (!visible[id]) { o[0] = f[0]; o[1] = f[1]; o[2] = f[2]; return; }
    float beta = 1.0f - alpha;
    for (int k = 0; k < 3; ++k) {
        int v = __float2int_rn(__fadd_rn(__fmul_rn((float)c[k], alpha), __fmul_rn((float)f[k], beta)));
        o[k] = (unsigned char)(v < 0 ? 0 : (v > 255 ? 255 : v));
    }
}

extern "C" __global__ void colorize_blend_i32(const int* labels, int lab_w, const int* ys, const int* xs,
        const unsigned char* lut, const unsigned char* visible, const unsigned char* frame, int frame_pitch,
        int out_h, int out_w, float alpha, int mask_only, unsigned char* out, int out_pitch, unsigned char* labels_out) {
    colorize_blend<int>(labels, lab_w, ys, xs, lut, visible, frame, frame_pitch, out_h, out_w, alpha, mask_only,
                        out, out_pitch, labels_out);
}

extern "C" __global__ void colorize_blend_u8(const unsigned char* labels, int lab_w, const int* ys, const int* xs,
        const unsigned char* lut, const unsigned char* visible, const unsigned char* frame, int frame_pitch,
        int out_h, int out_w, float alpha, int mask_only, unsigned char* out, int out_pitch, unsigned char* labels_out) {
    colorize_blend<unsigned char>(labels, lab_w, ys, xs, lut, visible, frame, frame_pitch, out_h, out_w, alpha,
                                  mask_only, out, out_pitch, labels_out);
}
"""

BLOCK = (32, 8, 1)


def _grid(h: int, w: int) -> tuple[int, int]:
    return (w + BLOCK[0] - 1) // BLOCK[0], (h + BLOCK[1] - 1) // BLOCK[1]


def import_pycuda():
    """``pycuda.driver``, or a BackendError that says how to get it."""
    return _import_pycuda(BackendError, "the CUDA pre/post-processing kernels")


_MODULES: dict = {}


def kernels():
    """The compiled module for the current CUDA context (compiled once per context)."""
    cuda = import_pycuda()
    from pycuda.compiler import SourceModule

    ctx = cuda.Context.get_current()
    key = ctx.handle if ctx is not None else None
    if key not in _MODULES:
        _MODULES[key] = SourceModule(KERNELS, no_extern_c=True)
    return _MODULES[key]


def release_kernels() -> None:
    """Drop the module compiled for the current context (call before the context goes away)."""
    cuda = import_pycuda()
    ctx = cuda.Context.get_current()
    _MODULES.pop(ctx.handle if ctx is not None else None, None)


class _Tables:
    """Device copies of the sampling tables for one (source size, output size)."""

    def __init__(self, cuda, arrays: list[np.ndarray]) -> None:
        self.arrays = [cuda.to_device(np.ascontiguousarray(a, np.int32)) for a in arrays]

    def ptrs(self) -> list[int]:
        return [int(a) for a in self.arrays]

    def free(self) -> None:
        for a in self.arrays:
            a.free()
        self.arrays = []


class GpuFrame:
    """The current BGR frame on the GPU, uploaded once through a page-locked staging buffer
    and shared by the preprocess and render kernels."""

    def __init__(self) -> None:
        self.cuda = import_pycuda()
        self.shape: tuple[int, ...] | None = None
        self.host = None
        self.dev = None

    def upload(self, frame_bgr: np.ndarray, stream) -> None:
        if frame_bgr.dtype != np.uint8 or frame_bgr.ndim != 3 or frame_bgr.shape[2] != 3:
            raise ValueError(f"expected a BGR uint8 HxWx3 frame, got {frame_bgr.dtype} {frame_bgr.shape}")
        if frame_bgr.shape != self.shape:
            self.free()
            self.host = self.cuda.pagelocked_empty(frame_bgr.shape, np.uint8)
            self.dev = self.cuda.mem_alloc(self.host.nbytes)
            self.shape = frame_bgr.shape
        np.copyto(self.host, frame_bgr)
        self.cuda.memcpy_htod_async(self.dev, self.host, stream)

    @property
    def pitch(self) -> int:
        return int(self.shape[1]) * 3

    def free(self) -> None:
        if self.dev is not None:
            self.dev.free()
        if self.host is not None and getattr(self.host, "base", None) is not None:
            self.host.base.free()
        self.dev = self.host = None
        self.shape = None


class GpuPreprocessor:
    """Frame on the GPU -> normalised NCHW written into a device buffer (the engine input)."""

    def __init__(self, meta: ModelMeta) -> None:
        self.cuda = import_pycuda()
        mod = kernels()
        self.fn = {np.dtype(np.float32): mod.get_function("resize_normalize_f32"),
                   np.dtype(np.float16): mod.get_function("resize_normalize_f16")}
        for f in self.fn.values():
            f.prepare("PiPPPPPPiiiiiffffffP")
        self.order, self.scale, self.shift = normalisation(meta)
        self._tables: dict[tuple, _Tables] = {}

    def tables(self, src: tuple[int, int], out: tuple[int, int]) -> _Tables:
        key = (src, out)
        if key not in self._tables:
            x = linear_tables(src[1], out[1])
            y = linear_tables(src[0], out[0])
            self._tables[key] = _Tables(self.cuda, [*x, *y])
        return self._tables[key]

    def run(self, frame: GpuFrame, dst_ptr: int, size: tuple[int, int], dtype, stream) -> None:
        h, w = size
        t = self.tables(frame.shape[:2], (h, w)).ptrs()
        o, s, b = self.order, self.scale, self.shift
        self.fn[np.dtype(dtype)].prepared_async_call(
            _grid(h, w), BLOCK, stream, int(frame.dev), np.int32(frame.pitch), *t, np.int32(h), np.int32(w),
            np.int32(o[0]), np.int32(o[1]), np.int32(o[2]), np.float32(s[0]), np.float32(s[1]), np.float32(s[2]),
            np.float32(b[0]), np.float32(b[1]), np.float32(b[2]), int(dst_ptr))

    def free(self) -> None:
        for t in self._tables.values():
            t.free()
        self._tables.clear()


class GpuRenderer:
    """Label map on the GPU (engine output) + frame on the GPU -> BGR picture (and frame-size labels)."""

    def __init__(self, meta: ModelMeta) -> None:
        self.cuda = import_pycuda()
        self.meta = meta
        mod = kernels()
        self.fn = {np.dtype(np.int32): mod.get_function("colorize_blend_i32"),
                   np.dtype(np.uint8): mod.get_function("colorize_blend_u8")}
        for f in self.fn.values():
            f.prepare("PiPPPPPiiifiPiP")
        self._tables: dict[tuple, _Tables] = {}
        self._lut_key = None
        self.lut = self.vis = None
        self.out_host = self.out_dev = self.lab_host = self.lab_dev = None
        self.out_shape = None

    def _palette(self, visible: list[int] | None) -> None:
        key = None if visible is None else tuple(sorted(visible))
        if self.lut is not None and key == self._lut_key:
            return
        vis = np.zeros(256, np.uint8)
        vis[list(range(256)) if visible is None else list(visible)] = 1
        for a in (self.lut, self.vis):
            if a is not None:
                a.free()
        self.lut = self.cuda.to_device(np.ascontiguousarray(palette_bgr(self.meta, visible)))
        self.vis = self.cuda.to_device(vis)
        self._lut_key = key

    def _outputs(self, shape: tuple[int, int]) -> None:
        if self.out_shape == shape:
            return
        self.free_outputs()
        self.out_host = self.cuda.pagelocked_empty((*shape, 3), np.uint8)
        self.out_dev = self.cuda.mem_alloc(self.out_host.nbytes)
        self.lab_host = self.cuda.pagelocked_empty(shape, np.uint8)
        self.lab_dev = self.cuda.mem_alloc(self.lab_host.nbytes)
        self.out_shape = shape

    def run(self, labels_ptr: int, label_shape: tuple[int, int], label_dtype, frame: GpuFrame, stream,
            alpha: float = 0.5, visible: list[int] | None = None, view: str = "overlay") -> tuple[np.ndarray, np.ndarray]:
        """Launch, download and return (picture, labels at frame size); waits for the stream."""
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be within 0..1, got {alpha}")
        if view not in ("overlay", "mask"):
            raise ValueError(f"the GPU renderer draws 'overlay' or 'mask', not {view!r}")
        fh, fw = frame.shape[:2]
        lh, lw = label_shape
        self._palette(visible)
        self._outputs((fh, fw))
        key = ((lh, lw), (fh, fw))
        if key not in self._tables:
            self._tables[key] = _Tables(self.cuda, [nearest_table(lh, fh), nearest_table(lw, fw)])
        ys, xs = self._tables[key].ptrs()
        self.fn[np.dtype(label_dtype)].prepared_async_call(
            _grid(fh, fw), BLOCK, stream, int(labels_ptr), np.int32(lw), ys, xs, int(self.lut), int(self.vis),
            int(frame.dev), np.int32(frame.pitch), np.int32(fh), np.int32(fw), np.float32(alpha),
            np.int32(view == "mask"), int(self.out_dev), np.int32(fw * 3), int(self.lab_dev))
        self.cuda.memcpy_dtoh_async(self.out_host, self.out_dev, stream)
        self.cuda.memcpy_dtoh_async(self.lab_host, self.lab_dev, stream)
        stream.synchronize()
        return self.out_host.copy(), self.lab_host.copy()

    def free_outputs(self) -> None:
        for name in ("out_dev", "lab_dev"):
            a = getattr(self, name)
            if a is not None:
                a.free()
        for name in ("out_host", "lab_host"):
            a = getattr(self, name)
            if a is not None and getattr(a, "base", None) is not None:
                a.base.free()
        self.out_host = self.out_dev = self.lab_host = self.lab_dev = None
        self.out_shape = None

    def free(self) -> None:
        self.free_outputs()
        for t in self._tables.values():
            t.free()
        self._tables.clear()
        for a in (self.lut, self.vis):
            if a is not None:
                a.free()
        self.lut = self.vis = None
