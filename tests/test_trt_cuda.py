"""The primary CUDA context's lifetime (runtime/trt/cuda.py): how the driver's context stack is
put back after pycuda's detach (runs everywhere), and, on a GPU, the real stack and the real
reference count after a release in the same thread, from another thread and over another
context (marked gpu; pycuda and a CUDA device, else skipped with the reason)."""

import subprocess
import sys
import textwrap

import pytest

from dilseg.runtime.trt.cuda import detach_repair


def driver_stack_after_pycuda_detach(stack: list[int], ours: int) -> list[int]:
    """The driver's context stack once pycuda has pushed ``ours`` (``context_push``: the context
    pycuda had current is popped from the driver first, ``prepare_context_switch``) and detached
    it while current (``context::detach``: ``cuDevicePrimaryCtxRelease`` pops nothing, then the
    context beneath in pycuda's stack is pushed again). pycuda's src/cpp/cuda.hpp, read as is."""
    beneath = stack[-1] if stack else None
    driver = stack[:-1] if stack else []
    driver.append(ours)
    if beneath is not None:
        driver.append(beneath)
    return driver


def apply(steps: list[tuple[str, int]], stack: list[int]) -> list[int]:
    stack = list(stack)
    for step, handle in steps:
        if step == "pop":
            assert stack and stack[-1] == handle, f"pop expects {handle:#x} on top of {stack}"
            stack.pop()
        else:
            stack.append(handle)
    return stack


@pytest.mark.parametrize("before", [[], [0xB0], [0xC0, 0xB0], [0xA0]], ids=["empty", "another", "two", "same-handle"])
def test_release_leaves_the_driver_stack_as_it_found_it(before):
    ours = 0xA0  # "same-handle": another pycuda object of the same primary context is current
    beneath = before[-1] if before else None
    left = driver_stack_after_pycuda_detach(before, ours)
    assert left != before  # what pycuda alone leaves: the released context still on the stack
    assert apply(detach_repair(ours, beneath), left) == before


def test_detach_repair_steps():
    assert detach_repair(0xA, None) == [("pop", 0xA)]
    assert detach_repair(0xA, 0xB) == [("pop", 0xB), ("pop", 0xA), ("push", 0xB)]


# -- on a GPU: a fresh process, so nothing else holds the primary context ---------------------------

GPU_SCRIPT = textwrap.dedent('''
    import ctypes, threading
    import pycuda.driver as cuda
    from dilseg.runtime.trt.cuda import PrimaryContext

    cuda.init()
    lib = ctypes.CDLL("libcuda.so.1")

    def current():
        h = ctypes.c_void_p()
        assert lib.cuCtxGetCurrent(ctypes.byref(h)) == 0
        return h.value or 0

    def primary_active():
        dev, flags, active = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
        assert lib.cuDeviceGet(ctypes.byref(dev), 0) == 0
        assert lib.cuDevicePrimaryCtxGetState(dev, ctypes.byref(flags), ctypes.byref(active)) == 0
        return active.value

    def use(ctx):
        with ctx.active():
            cuda.mem_alloc(1 << 20).free()

    assert current() == 0 and primary_active() == 0, "the primary context is in use before the test"
    # 1. retained, used and released in one thread
    ctx = PrimaryContext(cuda, 0)
    use(ctx)
    assert primary_active() == 1
    ctx.release()
    ctx.release()  # idempotent
    print("same thread: current", hex(current()), "active", primary_active())
    assert current() == 0, "the released primary context is still current"
    assert primary_active() == 0, "the primary context is still retained"
    # 2. retained and used in a worker thread, released from this one
    made = {}
    worker = threading.Thread(target=lambda: (made.update(ctx=PrimaryContext(cuda, 0)), use(made["ctx"])))
    worker.start(); worker.join()
    assert primary_active() == 1
    made["ctx"].release()
    print("other thread: current", hex(current()), "active", primary_active())
    assert current() == 0 and primary_active() == 0, "a release from another thread kept the reference"
    # 3. released while another context is current: that one stays current, and retained
    outer, inner = PrimaryContext(cuda, 0), PrimaryContext(cuda, 0)
    with outer.active():
        handle = cuda.Context.get_current().handle
        use(inner)
        inner.release()
        assert current() == handle and cuda.Context.get_current().handle == handle
        assert primary_active() == 1
        cuda.mem_alloc(1 << 20).free()  # the outer context still works
    outer.release()
    print("over another: current", hex(current()), "active", primary_active())
    assert current() == 0 and primary_active() == 0
    # 4. many threads closing one context at once: released exactly once
    ctx = PrimaryContext(cuda, 0)
    use(ctx)
    threads = [threading.Thread(target=ctx.release) for _ in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
    assert primary_active() == 0 and ctx.released
    print("OK")
''')


@pytest.mark.gpu
def test_primary_context_lifetime_on_the_gpu(pycuda_device):
    r = subprocess.run([sys.executable, "-c", GPU_SCRIPT], capture_output=True, text=True, timeout=120)
    print(r.stdout, r.stderr)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr
