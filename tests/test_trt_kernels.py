"""GPU pre/post-processing: the numpy references against the CPU path (runs everywhere), and
the pycuda kernels against the references and the CPU path (marked gpu, skipped without CUDA)."""

import cv2
import numpy as np
import pytest

from dilseg.runtime.trt import kernels as cp
from dilseg.runtime.dataset import CAMVID_CLASSES, CAMVID_IGNORE, CAMVID_PALETTE
from dilseg.runtime.metadata import ModelMeta
from dilseg.runtime.postprocess import render, resize_labels
from dilseg.runtime.preprocess import preprocess

META = ModelMeta(model="edge_s", classes=CAMVID_CLASSES, palette=CAMVID_PALETTE, input_size=(64, 96),
                 ignore_index=CAMVID_IGNORE)
BGR_META = ModelMeta(model="edge_s", classes=CAMVID_CLASSES, palette=CAMVID_PALETTE, input_size=(64, 96),
                     color_order="BGR", mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))

# (frame H, W) -> model (H, W): downscale, upscale, odd sizes, same size, a 1080p camera frame.
SIZES = [((360, 480), (64, 96)), ((37, 53), (64, 96)), ((100, 150), (256, 320)), ((64, 96), (64, 96)),
         ((1080, 1920), (360, 480)), ((481, 641), (360, 480))]


def frame(h, w, seed=0):
    """Camera-like content: smooth gradients, edges and sensor noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w * 255, yy / h * 255, 128 + 100 * np.sin(xx / 7) * np.cos(yy / 5)], -1)
    base[h // 3: h // 2, w // 4: w // 2] = (250, 10, 60)
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


# -- references vs the CPU path (no GPU) ---------------------------------------------------------

@pytest.mark.parametrize("src,dst", SIZES)
def test_resize_reference_matches_opencv(src, dst):
    img = frame(*src)
    ours = cp.resize_bilinear_reference(img, dst)
    ref = cv2.resize(img, dst[::-1], interpolation=cv2.INTER_LINEAR)
    diff = np.abs(ours.astype(int) - ref.astype(int))
    assert diff.max() <= 1
    # OpenCV's fixed-point arithmetic is reproduced (x86 build here: identical on downscales,
    # off by one on a few border rows of upscales); other OpenCV builds may round a few more.
    assert (diff == 0).mean() >= 0.99


@pytest.mark.parametrize("meta", [META, BGR_META], ids=["rgb", "bgr"])
@pytest.mark.parametrize("src,dst", SIZES[:4])
def test_preprocess_reference_matches_cpu_preprocess(meta, src, dst):
    from dataclasses import replace

    meta = replace(meta, input_size=dst)
    img = frame(*src, seed=1)
    ours = cp.preprocess_reference(img, meta, dst)
    cpu = preprocess(img, meta)
    assert ours.shape == cpu.shape == (1, 3, *dst) and ours.dtype == np.float32
    one_level = 1.0 / (255 * min(meta.std))
    assert np.abs(ours - cpu).max() <= one_level + 1e-6
    assert (ours == cpu).mean() >= 0.99  # bit-identical wherever the resize is


def test_nearest_table_matches_resize_labels():
    rng = np.random.default_rng(2)
    for lab_hw, out_hw in [((64, 96), (360, 480)), ((45, 60), (720, 1280)), ((64, 96), (37, 53)), ((8, 8), (8, 8))]:
        lab = rng.integers(0, 11, lab_hw, dtype=np.uint8)
        ours = lab[cp.nearest_table(lab_hw[0], out_hw[0])][:, cp.nearest_table(lab_hw[1], out_hw[1])]
        np.testing.assert_array_equal(ours, resize_labels(lab, out_hw))


@pytest.mark.parametrize("alpha,visible,view", [(0.5, None, "overlay"), (0.3, [0, 3, 8], "overlay"),
                                                 (1.0, None, "overlay"), (0.5, [1, 2], "mask")])
def test_render_reference_matches_cpu_render(alpha, visible, view):
    rng = np.random.default_rng(3)
    img = frame(360, 480, seed=4)
    labels = rng.integers(0, 12, (1, 64, 96)).astype(np.int32)  # 11 = void: black in the palette
    ours, big = cp.render_reference(labels, img, META, alpha, visible, view)
    cpu_labels = resize_labels(labels[0].astype(np.uint8), img.shape[:2])
    np.testing.assert_array_equal(big, cpu_labels)
    cpu = render(img, cpu_labels, META, view, alpha, visible)
    assert np.abs(ours.astype(int) - cpu.astype(int)).max() <= 1


# -- the kernels (GPU) -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cuda(pycuda_device):
    cuda = pycuda_device
    from dilseg.runtime.trt.cuda import PrimaryContext

    ctx = PrimaryContext(cuda, 0)  # pop-then-detach would leave the released context current
    try:
        with ctx.active():
            yield cuda
    finally:
        ctx.release()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("src,dst", SIZES)
def test_preprocess_kernel(cuda, src, dst, dtype):
    from dataclasses import replace

    meta = replace(META, input_size=dst)
    img = frame(*src, seed=5)
    stream = cuda.Stream()
    gf, pre = cp.GpuFrame(), cp.GpuPreprocessor(meta)
    out = cuda.pagelocked_empty((1, 3, *dst), dtype)
    dev = cuda.mem_alloc(out.nbytes)
    try:
        gf.upload(img, stream)
        pre.run(gf, int(dev), dst, dtype, stream)
        cuda.memcpy_dtoh_async(out, dev, stream)
        stream.synchronize()
        np.testing.assert_array_equal(out, cp.preprocess_reference(img, meta, dst, dtype))
        cpu = preprocess(img, meta).astype(dtype)
        one_level = 1.0 / (255 * min(meta.std)) + (2e-3 if dtype == np.float16 else 1e-6)
        assert np.abs(out.astype(np.float32) - cpu.astype(np.float32)).max() <= one_level
    finally:
        dev.free()
        gf.free()
        pre.free()


@pytest.mark.gpu
@pytest.mark.parametrize("label_dtype", [np.int32, np.uint8])
@pytest.mark.parametrize("alpha,visible,view", [(0.5, None, "overlay"), (0.35, [0, 3, 8], "overlay"),
                                                 (0.5, [1, 2], "mask")])
def test_render_kernel(cuda, label_dtype, alpha, visible, view):
    rng = np.random.default_rng(6)
    img = frame(360, 480, seed=7)
    labels = rng.integers(0, 12, (1, 64, 96)).astype(label_dtype)
    stream = cuda.Stream()
    gf, ren = cp.GpuFrame(), cp.GpuRenderer(META)
    dev = cuda.to_device(np.ascontiguousarray(labels))
    try:
        gf.upload(img, stream)
        picture, big = ren.run(int(dev), (64, 96), label_dtype, gf, stream, alpha, visible, view)
        ref_picture, ref_big = cp.render_reference(labels, img, META, alpha, visible, view)
        np.testing.assert_array_equal(big, ref_big)  # labels exactly
        np.testing.assert_array_equal(picture, ref_picture)
        cpu_labels = resize_labels(labels[0].astype(np.uint8), img.shape[:2])
        np.testing.assert_array_equal(big, cpu_labels)
        cpu = render(img, cpu_labels, META, view, alpha, visible)
        assert np.abs(picture.astype(int) - cpu.astype(int)).max() <= 1  # colours within 1
    finally:
        dev.free()
        gf.free()
        ren.free()


# -- the kernel source itself, compiled for the CPU (no GPU needed) --------------------------------

HOST_SHIM = r"""
#include <cmath>
#include <cstddef>
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
struct dim3 { int x, y, z; };
static dim3 blockIdx, blockDim, threadIdx;
struct __half { unsigned short x; };
// IEEE binary16, round to nearest even, as CUDA's __float2half_rn (and numpy's float16 cast).
inline __half __float2half_rn(float v) { _Float16 h = (_Float16)v; __half r; __builtin_memcpy(&r.x, &h, 2); return r; }
// CUDA's _rn intrinsics are single IEEE operations; volatile keeps the host compiler from fusing them.
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline int __float2int_rn(float a) { return (int)std::nearbyint(a); }
"""

HOST_LAUNCH = r"""
#define LAUNCH(H, W, CALL) for (int by = 0; by < (H + 7) / 8; ++by) for (int bx = 0; bx < (W + 31) / 32; ++bx) \
  for (int ty = 0; ty < 8; ++ty) for (int tx = 0; tx < 32; ++tx) { \
    blockDim = {32, 8, 1}; blockIdx = {bx, by, 0}; threadIdx = {tx, ty, 0}; CALL; }
extern "C" void run_pre(const unsigned char* src, int pitch, const int* x0, const int* x1, const int* cx,
    const int* y0, const int* y1, const int* cy, int h, int w, int c0, int c1, int c2, float s0, float s1, float s2,
    float b0, float b1, float b2, float* dst) {
  LAUNCH(h, w, resize_normalize_f32(src, pitch, x0, x1, cx, y0, y1, cy, h, w, c0, c1, c2, s0, s1, s2, b0, b1, b2, dst))
}
extern "C" void run_pre_f16(const unsigned char* src, int pitch, const int* x0, const int* x1, const int* cx,
    const int* y0, const int* y1, const int* cy, int h, int w, int c0, int c1, int c2, float s0, float s1, float s2,
    float b0, float b1, float b2, __half* dst) {
  LAUNCH(h, w, resize_normalize_f16(src, pitch, x0, x1, cx, y0, y1, cy, h, w, c0, c1, c2, s0, s1, s2, b0, b1, b2, dst))
}
extern "C" void run_render(const int* labels, int lw, const int* ys, const int* xs, const unsigned char* lut,
    const unsigned char* vis, const unsigned char* frame, int fp, int h, int w, float alpha, int mask,
    unsigned char* out, int op, unsigned char* lo) {
  LAUNCH(h, w, colorize_blend_i32(labels, lw, ys, xs, lut, vis, frame, fp, h, w, alpha, mask, out, op, lo))
}
"""


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory):
    """The CUDA kernel source compiled as C++ for the CPU and run thread by thread over the
    same grid: checks the kernels' indexing and arithmetic where no GPU is available."""
    import ctypes
    import shutil
    import subprocess

    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the kernel source for the CPU")
    d = tmp_path_factory.mktemp("kernels")
    src = d / "kernels.cpp"
    src.write_text(HOST_SHIM + cp.KERNELS.replace("#include <cuda_fp16.h>", "") + HOST_LAUNCH)
    r = subprocess.run([cxx, "-std=c++14", "-O1", "-ffp-contract=off", "-shared", "-fPIC", "-o", str(d / "k.so"),
                        str(src)], capture_output=True, text=True)
    if r.returncode and "_Float16" in r.stderr:
        pytest.skip(f"{cxx} has no _Float16 (GCC >= 12 or Clang on x86-64/arm64 has) for the fp16 store")
    assert r.returncode == 0, r.stderr
    return ctypes.CDLL(str(d / "k.so"))


def _ptr(a):
    import ctypes

    return a.ctypes.data_as(ctypes.c_void_p)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("src,dst", SIZES)
def test_preprocess_kernel_source_on_cpu(host_kernels, src, dst, dtype):
    import ctypes
    from dataclasses import replace

    meta = replace(META, input_size=dst)
    img = frame(*src, seed=8)
    x0, x1, cx = cp.linear_tables(src[1], dst[1])
    y0, y1, cy = cp.linear_tables(src[0], dst[0])
    order, scale, shift = cp.normalisation(meta)
    out = np.full((1, 3, *dst), np.nan, dtype)
    run = host_kernels.run_pre if dtype == np.float32 else host_kernels.run_pre_f16
    run(_ptr(img), src[1] * 3, *map(_ptr, (x0, x1, cx, y0, y1, cy)), dst[0], dst[1],
        *map(int, order), *[ctypes.c_float(v) for v in (*scale, *shift)], _ptr(out))
    ref = cp.preprocess_reference(img, meta, dst, dtype)  # float32, then numpy's float16 cast
    assert ref.dtype == dtype and len(np.unique(ref)) > 100
    np.testing.assert_array_equal(out.view(np.uint16 if dtype == np.float16 else np.uint32),
                                  ref.view(np.uint16 if dtype == np.float16 else np.uint32))  # bit for bit


@pytest.mark.parametrize("alpha,visible,view", [(0.5, None, "overlay"), (0.35, [0, 3, 8], "overlay"),
                                                 (0.5, [1, 2], "mask")])
def test_render_kernel_source_on_cpu(host_kernels, alpha, visible, view):
    import ctypes

    rng = np.random.default_rng(9)
    img = frame(360, 480, seed=10)
    labels = rng.integers(0, 12, (1, 64, 96)).astype(np.int32)
    lut = np.ascontiguousarray(cp.palette_bgr(META, visible))
    vis = np.zeros(256, np.uint8)
    vis[list(range(256)) if visible is None else visible] = 1
    out, big = np.zeros((360, 480, 3), np.uint8), np.zeros((360, 480), np.uint8)
    host_kernels.run_render(_ptr(labels), 96, _ptr(cp.nearest_table(64, 360)), _ptr(cp.nearest_table(96, 480)),
                            _ptr(lut), _ptr(vis), _ptr(img), 480 * 3, 360, 480, ctypes.c_float(alpha),
                            int(view == "mask"), _ptr(out), 480 * 3, _ptr(big))
    ref, ref_big = cp.render_reference(labels, img, META, alpha, visible, view)
    np.testing.assert_array_equal(big, ref_big)
    np.testing.assert_array_equal(out, ref)


# -- the kernel source compiled by NVIDIA's compiler, as pycuda compiles it (no GPU needed) ----------

@pytest.mark.nvcc
@pytest.mark.parametrize("arch", ["sm_87", "sm_90"])  # Jetson Orin, Hopper
def test_kernels_compile_with_nvcc_as_pycuda_does(nvcc, tmp_path, arch):
    """``SourceModule(KERNELS, no_extern_c=True)`` runs ``nvcc --cubin -arch sm_XX kernel.cu`` on the
    source as is (no ``extern "C"`` wrapper): the cubin must hold every entry get_function asks for,
    unmangled, built for that GPU. Skipped with the reason where there is no nvcc."""
    import re
    import struct

    from servers import compile_cubin

    cubin = compile_cubin(cp.KERNELS, arch, tmp_path, nvcc, no_extern_c=True)
    data = cubin.read_bytes()
    assert data[:4] == b"\x7fELF" and struct.unpack_from("<H", data, 18)[0] == 190  # EM_CUDA
    flags, sm = struct.unpack_from("<I", data, 48)[0], int(arch[3:])
    assert sm in ((flags >> 8) & 0xFF, flags & 0xFF), f"e_flags {flags:#x} does not name {arch}"
    entries = re.findall(r'extern "C" __global__ void (\w+)\(', cp.KERNELS)
    assert sorted(entries) == ["colorize_blend_i32", "colorize_blend_u8", "resize_normalize_f16",
                               "resize_normalize_f32"]
    for name in entries:
        assert b"\0" + name.encode() + b"\0" in data, f"{name} is not an unmangled symbol of the {arch} cubin"
