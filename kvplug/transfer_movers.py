"""How rows of a LayerPipeline batch cross between device staging and CPU slab slots.

A mover copies rows [a, b) of a batch, layers [l0, l1) of each, between a
device staging buffer and the slab rows at arbitrary slots. It is called on
the copy stream of its direction, in that direction's worker thread (see
kvplug/transfer.py). The host row copies serve the CPU path too.
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
import torch

RING = 2  # staging buffers per direction: chunk k+1 moves while chunk k is decoded / encoded


# -- host row copies (CPU path and the host transport) --------------------------------------------


def gather_rows(out: torch.Tensor, rows: list[int], offset: int) -> None:
    """out[k] = the out.shape[1] bytes at rows[k] + offset (slab addresses), one memmove each."""
    move, n, dst, step = ctypes.memmove, out.shape[1], out.data_ptr(), out.stride(0)
    for k, src in enumerate(rows):
        move(dst + k * step, src + offset, n)


def scatter_rows(src: torch.Tensor, rows: list[int], offset: int) -> None:
    move, n, ptr, step = ctypes.memmove, src.shape[1], src.data_ptr(), src.stride(0)
    for k, dst in enumerate(rows):
        move(dst + offset, ptr + k * step, n)


def is_run(slots: np.ndarray) -> bool:
    """Consecutive increasing slots."""
    return int(slots[-1]) - int(slots[0]) == len(slots) - 1 and (len(slots) < 3 or bool((np.diff(slots) == 1).all()))


# -- transports (CUDA): move rows [a, b) of a batch, layers [l0, l1), between staging and the slab ----
# Called on the copy stream of their direction, in that direction's worker thread.


class _Mover:
    def __init__(self, pipe):
        self.pipe, self.slab, self.lb = pipe, pipe.slab, pipe.layer_bytes
        self.stride = pipe.slab.stride(0)  # bytes: uint8

    def prepare(self, batch, stream) -> None:
        pass

    def h2d(self, batch, l0, l1, a, b, stage) -> None:
        """slab[slot, l0 * lb:l1 * lb] of rows [a, b) -> stage [b - a, (l1 - l0) * lb] (on the device)."""
        raise NotImplementedError

    def d2h(self, batch, layer, a, b, stage) -> None:
        """stage [b - a, lb] (on the device) -> slab[slot, layer * lb:(layer + 1) * lb] of rows [a, b)."""
        raise NotImplementedError


class _Rows(_Mover):
    def h2d(self, batch, l0, l1, a, b, stage):
        for k, s in enumerate(batch.slots[a:b].tolist()):
            stage[k].copy_(self.slab[s, l0 * self.lb:l1 * self.lb], non_blocking=True)

    def d2h(self, batch, layer, a, b, stage):
        for k, s in enumerate(batch.slots[a:b].tolist()):
            self.slab[s, layer * self.lb:(layer + 1) * self.lb].copy_(stage[k], non_blocking=True)


class _RuntimeCopy(_Mover):
    """Copies issued through the CUDA runtime: h2d and d2h are one ``_copy`` each way."""

    def __init__(self, pipe):
        super().__init__(pipe)
        self.rt = cudart()

    def _copy(self, batch, l0, l1, a, b, stage, to_slab: bool) -> None:
        raise NotImplementedError

    def h2d(self, batch, l0, l1, a, b, stage):
        self._copy(batch, l0, l1, a, b, stage, False)

    def d2h(self, batch, layer, a, b, stage):
        self._copy(batch, layer, layer + 1, a, b, stage, True)


class _Runs(_RuntimeCopy):
    """One 2-D copy per run of consecutive slots (pitch = slot stride)."""

    @staticmethod
    def _runs(slots: np.ndarray):
        cuts = np.flatnonzero(np.diff(slots) != 1) + 1
        return zip(np.concatenate(([0], cuts)).tolist(), np.concatenate((cuts, [len(slots)])).tolist())

    def _copy(self, batch, l0, l1, a, b, stage, to_slab: bool):
        stream, width, pitch = torch.cuda.current_stream().cuda_stream, (l1 - l0) * self.lb, stage.stride(0)
        for s, e in self._runs(batch.slots[a:b]):
            host, dev = batch.rows[a + s] + l0 * self.lb, stage.data_ptr() + s * pitch
            if to_slab:
                self.rt.memcpy2d(host, self.stride, dev, pitch, width, e - s, stream)
            else:
                self.rt.memcpy2d(dev, pitch, host, self.stride, width, e - s, stream)


class _BatchCopy(_RuntimeCopy):
    """One cudaMemcpyBatchAsync per chunk: one descriptor per row, copy engines only."""

    def prepare(self, batch, stream):
        batch.extra["rows"] = np.array(batch.rows, dtype=np.uint64)

    def _copy(self, batch, l0, l1, a, b, stage, to_slab: bool):
        host = batch.extra["rows"][a:b] + np.uint64(l0 * self.lb)
        dev = np.uint64(stage.data_ptr()) + np.arange(b - a, dtype=np.uint64) * np.uint64(stage.stride(0))
        src, dst = (dev, host) if to_slab else (host, dev)
        self.rt.memcpy_batch(dst, src, (l1 - l0) * self.lb, torch.cuda.current_stream().cuda_stream)


class _UVA(_Mover):
    """torch index kernels on a device alias of the pinned slab (unified addressing)."""

    def __init__(self, pipe):
        super().__init__(pipe)
        if not self.slab.is_contiguous():
            raise ValueError("LayerPipeline: transport='uva' needs a contiguous slab (a tensor-parallel rank's shard of the slab is strided: use transport='auto')")
        self.item = next(e for e in (8, 4, 2, 1)
                         if self.lb % e == 0 and self.stride % e == 0 and self.slab.data_ptr() % e == 0)
        ptr = cudart().device_pointer(self.slab.data_ptr())
        typestr = {8: "<i8", 4: "<i4", 2: "<i2", 1: "|u1"}[self.item]
        shape = (self.slab.shape[0], self.stride // self.item)
        self.alias = torch.as_tensor(_ArrayInterface(ptr, shape, typestr), device=pipe.device)
        assert self.alias.data_ptr() == ptr and self.alias.element_size() == self.item

    def prepare(self, batch, stream):
        with torch.cuda.stream(stream):
            batch.extra["slots"] = torch.from_numpy(batch.slots).pin_memory().to(self.pipe.device, non_blocking=True)

    def _cols(self, l0, l1):
        w = self.lb // self.item
        return self.alias[:, l0 * w:l1 * w]

    def h2d(self, batch, l0, l1, a, b, stage):
        idx, cols, out = batch.extra["slots"][a:b], self._cols(l0, l1), stage.view(self.alias.dtype)
        if out.is_contiguous():
            torch.index_select(cols, 0, idx, out=out)
        else:
            out.copy_(torch.index_select(cols, 0, idx))

    def d2h(self, batch, layer, a, b, stage):
        self._cols(layer, layer + 1).index_copy_(0, batch.extra["slots"][a:b], stage.view(self.alias.dtype))


class _Host(_Mover):
    """Rows gathered / scattered by the worker thread (memmove) through pinned staging, one big copy a chunk."""

    def __init__(self, pipe):
        super().__init__(pipe)
        g, lb = pipe.layers_per_copy, pipe.layer_bytes
        self.ld = [torch.empty(pipe._load_rows * g * lb, dtype=torch.uint8, pin_memory=True) for _ in range(RING)]
        self.ld_done: list = [None] * RING  # event: the H2D out of ld[k] has read it
        self.ld_k = 0
        self.sv = torch.empty(pipe._save_rows * lb, dtype=torch.uint8, pin_memory=True)

    def h2d(self, batch, l0, l1, a, b, stage):
        k = self.ld_k % RING
        self.ld_k += 1
        if self.ld_done[k] is not None:
            self.ld_done[k].synchronize()
        width = (l1 - l0) * self.lb
        pinned = self.ld[k][:(b - a) * width].view(b - a, width)
        gather_rows(pinned, batch.rows[a:b], l0 * self.lb)
        stage.copy_(pinned, non_blocking=True)
        self.ld_done[k] = torch.cuda.Event()
        self.ld_done[k].record()

    def d2h(self, batch, layer, a, b, stage):
        pinned = self.sv[:(b - a) * self.lb].view(b - a, self.lb)
        pinned.copy_(stage, non_blocking=True)
        torch.cuda.current_stream().synchronize()  # the save thread waits, then scatters
        scatter_rows(pinned, batch.rows[a:b], layer * self.lb)


MOVERS = {"rows": _Rows, "runs": _Runs, "batch": _BatchCopy, "uva": _UVA, "host": _Host}


class _ArrayInterface:
    def __init__(self, ptr: int, shape: tuple, typestr: str):
        self.__cuda_array_interface__ = {"shape": shape, "typestr": typestr, "data": (ptr, False),
                                         "version": 2, "strides": None}


# -- the CUDA runtime torch loaded, through ctypes -----------------------------------------------


class _MemcpyAttributes(ctypes.Structure):
    # cudaMemcpyAttributes (driver_types.h, CUDA 12.8 and 13.x): sizeof 24
    _fields_ = [("srcAccessOrder", ctypes.c_int), ("srcLocType", ctypes.c_int), ("srcLocId", ctypes.c_int),
                ("dstLocType", ctypes.c_int), ("dstLocId", ctypes.c_int), ("flags", ctypes.c_uint)]


class _CudaRT:
    def __init__(self):
        self.lib = lib = _load_cudart()
        version = ctypes.c_int(0)
        lib.cudaRuntimeGetVersion(ctypes.byref(version))
        self.version = version.value
        vp, sz = ctypes.c_void_p, ctypes.c_size_t
        lib.cudaMemcpy2DAsync.argtypes = [vp, sz, vp, sz, sz, sz, ctypes.c_int, vp]
        lib.cudaMemcpy2DAsync.restype = ctypes.c_int
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        lib.cudaHostGetDevicePointer.argtypes = [ctypes.POINTER(vp), vp, ctypes.c_uint]
        self._batch = getattr(lib, "cudaMemcpyBatchAsync", None) if self.version >= 12080 else None
        if self._batch is not None:
            fail_idx = [] if self.version >= 13000 else [vp]  # 12.8/12.9 take a failIdx before the stream
            self._batch.argtypes = [vp, vp, vp, sz, vp, vp, sz] + fail_idx + [vp]
            self._batch.restype = ctypes.c_int
            # srcAccessOrder = Stream (1): source read in stream order; flags = PreferOverlapWithCompute (1)
            self._attrs = _MemcpyAttributes(1, 0, 0, 0, 0, 1)
            self._attr_idx = (ctypes.c_size_t * 1)(0)
            self._fail = ctypes.c_size_t(0)
        self._sizes = np.empty(0, dtype=np.uint64)

    @property
    def has_batch(self) -> bool:
        return self._batch is not None

    def _check(self, err: int, what: str) -> None:
        if err:
            raise RuntimeError(f"{what} failed: {self.lib.cudaGetErrorString(err).decode()} ({err})")

    def memcpy2d(self, dst, dpitch, src, spitch, width, height, stream) -> None:
        self._check(self.lib.cudaMemcpy2DAsync(dst, dpitch, src, spitch, width, height, 4, stream),
                    "cudaMemcpy2DAsync")  # 4 = cudaMemcpyDefault: direction from unified addresses

    def memcpy_batch(self, dst: np.ndarray, src: np.ndarray, size: int, stream) -> None:
        n = len(dst)
        if len(self._sizes) < n:
            self._sizes = np.empty(n, dtype=np.uint64)
        self._sizes[:n] = size
        dst, src = np.ascontiguousarray(dst, np.uint64), np.ascontiguousarray(src, np.uint64)
        args = [dst.ctypes.data, src.ctypes.data, self._sizes.ctypes.data, n,
                ctypes.addressof(self._attrs), ctypes.addressof(self._attr_idx), 1]
        if self.version < 13000:
            args.append(ctypes.addressof(self._fail))
        self._check(self._batch(*args, stream), "cudaMemcpyBatchAsync")

    def device_pointer(self, host_ptr: int) -> int:
        out = ctypes.c_void_p()
        self._check(self.lib.cudaHostGetDevicePointer(ctypes.byref(out), host_ptr, 0), "cudaHostGetDevicePointer")
        return out.value


_RT: _CudaRT | None = None


def cudart() -> _CudaRT:
    global _RT
    if _RT is None:
        _RT = _CudaRT()
    return _RT


def _load_cudart() -> ctypes.CDLL:
    """The libcudart torch loaded (a second copy would have its own state)."""
    torch.cuda.init()
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "libcudart" in line and "/" in line}
    except OSError:
        paths = set()
    for path in sorted(paths) + ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]:
        try:
            lib = ctypes.CDLL(path)
            lib.cudaRuntimeGetVersion  # noqa: B018 - raises AttributeError when absent
            return lib
        except (OSError, AttributeError):
            continue
    raise RuntimeError("kvplug transfer: the CUDA runtime library (libcudart) torch uses was not found"
                       f" (searched {sorted(paths) or 'no mapped libcudart'}, pid {os.getpid()})")
