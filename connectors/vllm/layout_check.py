"""Start-up self-check: kvplug addresses vLLM's paged KV exactly where vLLM's attention does.

``paged_view`` reads a layer's tensor from its shape, its strides and what the
worker says it holds (``kv_format``, or the CPU backend's probed strides). A
wrong guess would not fail: K and V would be saved and loaded scrambled and
the model would quietly answer worse. So the worker runs ``self_check`` once,
at register_kv_caches: on a few blocks it writes values tagged with their
(block, K/V, token, head, dim) the way vLLM's attention writes them (the
backend's own split of the 4-D view; on the CPU backend vLLM's cache-write
op), reads them back through kvplug's view and checks every element; then it
runs the codecs and a partial-block load on those blocks. Anything off raises
LayoutCheckError, naming the layout, shape and strides.

It runs on the real tensors, not on a copy: a scratch tensor with the same
strides spans a whole layer when heads come before blocks (LHBNC, BHLNC),
memory vLLM has already handed out. At register time no request has run; the
blocks used are saved through vLLM's own block rows and restored bit for bit;
and kvplug's view writes only after its reads proved it addresses exactly
vLLM's elements of those blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from kvplug.codec import Codec, get_codec
from kvplug.layout import BlockStrides, KVLayout, copy_tokens, gather_blocks, paged_view, scatter_blocks
from kvplug.paged_views import KV_LAST, KV_PLANES, block_shape_4d

AXES = ("block", "K/V", "token", "head", "dim")
TAG_BASE = 64  # tag digits: 1..128 with the pass offset, exact in bf16


class LayoutCheckError(ValueError):
    """kvplug's view of vLLM's paged KV does not address what vLLM's attention does."""


def kv_format_of(spec) -> str:
    """The ``kv_format`` of the 4-D views vLLM makes for an attention spec (``kv_cache_config``'s,
    already customized by the backend): what the worker passes to paged_view and self_check."""
    item = spec.dtype.itemsize
    if spec.num_head_slots is None and spec.state_content_bytes is None:
        return KV_LAST
    if spec.num_head_slots == 2 and spec.state_content_bytes == spec.num_kv_heads * spec.head_size * item:
        return KV_PLANES
    raise ValueError(
        f"kvplug: vLLM's attention backend packs this KV cache as {spec.num_head_slots} head slots of "
        f"{spec.state_content_bytes} bytes per token ({spec.num_kv_heads} KV heads of {spec.head_size}); "
        "kvplug reads K and V side by side per head (kv_last) or as two planes of all heads (kv_planes) only"
    )


def backend_split(kv: torch.Tensor, layout: KVLayout, kv_format: str = KV_LAST) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V ``[rows, tokens, H, D]`` of vLLM's 4-D view, split as vLLM's attention backends split it."""
    D = layout.head_size
    if kv.dim() != 4 or tuple(kv.shape[1:]) != block_shape_4d(layout, kv_format, kv.shape[2]):
        raise ValueError(f"paged KV of shape {tuple(kv.shape)} is no {kv_format} view for {layout}")
    if kv_format == KV_LAST:  # flash_attn.py, flashinfer.py, triton_attn.py
        k, v = kv.transpose(1, 2).split(D, dim=-1)
        return k, v
    k, v = kv.unbind(1)  # b12x.py
    return k.unflatten(-1, (layout.num_kv_heads, D)), v.unflatten(-1, (layout.num_kv_heads, D))


def self_check(kv_caches: Mapping[str, torch.Tensor] | torch.Tensor, layout: KVLayout, *,
               kv_format: str = KV_LAST, cpu_strides: BlockStrides | None = None, codec: Codec | None = None,
               view_fn: Callable[[torch.Tensor], object] | None = None,
               probe_blocks: Sequence[int] | None = None, vllm_layout: str | None = None) -> None:
    """Check that kvplug reads and writes vLLM's paged KV where vLLM's attention does; raise LayoutCheckError if not.

    kv_caches: what register_kv_caches received (layer name -> 4-D view), or one tensor.
        Tensors sharing shape, strides, dtype and device are checked once, on the
        first and the last of them (the last one has a non-zero offset).
    layout: the connector's KVLayout (block_tokens = the manager's block size).
    kv_format: ``kv_format_of(spec)`` on a GPU runner; ignored when cpu_strides is given.
    cpu_strides: on vLLM's CPU backend, the probed BlockStrides (as for paged_view); the
        tags are then written by vLLM's ``cpu_attn_reshape_and_cache`` (when this vLLM has it).
    codec: the configured codec; raw is always checked too.
    view_fn: kv -> kvplug's paged view; default ``paged_view(kv, layout, cpu_strides, kv_format=...)``.
    probe_blocks: manager block ids to use; default two blocks, the last one among them.
    vllm_layout: vLLM's KVCacheLayout name, for the error message.

    The worker calls it after building its views, e.g.
    ``self_check(kv_caches, geo.layout, kv_format=kv_format_of(spec), cpu_strides=strides,
    codec=geo.codec, vllm_layout=vllm_config.cache_config.kv_cache_layout)``.
    """
    tensors = [kv_caches] if isinstance(kv_caches, torch.Tensor) else list(kv_caches.values())
    groups: dict[tuple, list[torch.Tensor]] = {}
    for kv in tensors:
        groups.setdefault((tuple(kv.shape), kv.stride(), kv.dtype, kv.device), []).append(kv)
    how = f"vLLM's CPU backend, K/V at {cpu_strides}" if cpu_strides is not None else f"kv_format={kv_format}"
    if view_fn is not None:  # vLLM's side still writes per kv_format / cpu_strides
        how = f"{getattr(view_fn, '__name__', 'view_fn')} (vLLM writing as {how})"
    how += f", vLLM layout {vllm_layout}" if vllm_layout else ""
    view_fn = view_fn or (lambda kv: paged_view(kv, layout, cpu_strides, kv_format=kv_format))
    codecs = [get_codec("raw", layout)] + ([codec] if codec is not None and codec.name != "raw" else [])
    with torch.inference_mode():  # vLLM's caches may be inference tensors: written only in this mode
        for same in groups.values():
            for kv in {id(t): t for t in (same[0], same[-1])}.values():
                _Probe(kv, layout, view_fn, kv_format, cpu_strides, probe_blocks, how).run(codecs)


class _Probe:
    """The check of one tensor: vLLM writes blocks, kvplug's view reads them (and then writes)."""

    def __init__(self, kv, layout, view_fn, kv_format, cpu_strides, probe_blocks, how: str):
        if kv.dim() != 4:
            raise ValueError(f"self_check reads vLLM's 4-D KV views, got shape {tuple(kv.shape)}")
        self.kv, self.layout, self.view = kv, layout, view_fn(kv)
        T = layout.block_tokens
        self.ratio = T // kv.shape[2]  # kernel blocks per manager block
        nb = self.view.shape[0]
        self.ids = list(probe_blocks) if probe_blocks is not None else sorted({max(0, nb // 2 - 1), nb - 1})
        if not self.ids or len(set(self.ids)) != len(self.ids) or min(self.ids) < 0 or max(self.ids) >= nb:
            raise ValueError(f"self_check: probe_blocks {self.ids} must be distinct block ids in [0, {nb})")
        self.ids_t = torch.tensor(self.ids, dtype=torch.long, device=kv.device)
        self.rows = torch.tensor([b * self.ratio + j for b in self.ids for j in range(self.ratio)],
                                 dtype=torch.long, device=kv.device)
        self.shape = (len(self.ids), 2, T, layout.num_kv_heads, layout.head_size)
        self.what = (f"paged KV of shape {tuple(kv.shape)}, strides {kv.stride()}, {kv.dtype} on {kv.device}, "
                     f"read as {how}, for block_tokens={T}, kv_heads={layout.num_kv_heads}, "
                     f"head_size={layout.head_size}")
        self.write = self._cpu_writer() if cpu_strides is not None else self._backend_writer(kv_format)

    def run(self, codecs: list[Codec]) -> None:
        saved = self.kv[self.rows]  # a copy of vLLM's own rows of the probed blocks: every byte of them
        try:
            if self.write is not None:
                self._check_addressing()
            else:  # no vLLM op to write with (then its CPU attention cannot run either): codecs only
                self.write = lambda values: scatter_blocks(self.view, self.ids_t, values)
            raw = self._check_codecs(codecs)
            self._check_partial_load(codecs[0], raw)
        finally:
            self.kv[self.rows] = saved

    # -- vLLM's side: where its attention writes a block's K and V ------------------

    def _backend_writer(self, kv_format: str):
        k, v = (t.unflatten(0, (-1, self.ratio)) for t in backend_split(self.kv, self.layout, kv_format))
        tokens = self.kv.shape[2]

        def write(values: torch.Tensor) -> None:  # values [n, 2, T, H, D]; manager block = ratio kernel rows
            k[self.ids_t] = values[:, 0].unflatten(1, (self.ratio, tokens))
            v[self.ids_t] = values[:, 1].unflatten(1, (self.ratio, tokens))
        return write

    def _cpu_writer(self):
        from vllm import _custom_ops as ops

        from .cpu_layout import _isa

        if not hasattr(torch.ops._C, "cpu_attn_reshape_and_cache"):
            return None
        kv, lay, T = self.kv, self.layout, self.layout.block_tokens
        # as cpu_attn.py hands its caches to the op
        k_cache, v_cache = kv.view(kv.shape[0], kv.shape[1], 2 * T, -1).chunk(2, dim=2)
        slots = (self.ids_t[:, None] * T + torch.arange(T, device=kv.device)).flatten()
        isa = _isa(lay)

        def write(values: torch.Tensor) -> None:
            values = values.expand(self.shape)
            key = values[:, 0].reshape(-1, lay.num_kv_heads, lay.head_size).contiguous()
            value = values[:, 1].reshape(-1, lay.num_kv_heads, lay.head_size).contiguous()
            ops.cpu_attn_reshape_and_cache(key, value, k_cache, v_cache, slots, isa)
        return write

    # -- the checks -------------------------------------------------------------------

    def _read(self) -> torch.Tensor:
        return gather_blocks(self.view, self.ids_t)

    def _check_addressing(self) -> None:
        """Every element kvplug reads is the one vLLM wrote under the same (block, K/V, token, head, dim).

        One pass per axis (and base-64 digit): each element is tagged with its index on
        that axis; alternate passes add 64, so memory a pass did not write cannot match."""
        p = 0
        for axis, size in enumerate(self.shape):
            digits = 0
            while TAG_BASE ** digits < size:
                digits += 1
            for digit in range(digits):
                at = [1] * 5
                at[axis] = size
                index = torch.arange(size, device=self.kv.device).view(at)
                tag = (index // TAG_BASE ** digit % TAG_BASE + 1 + TAG_BASE * (p % 2)).to(self.kv.dtype)
                self.write(tag.expand(self.shape))
                got = self._read()
                bad = got != tag
                if bad.any():
                    first = [int(i) for i in bad.nonzero()[0]]
                    raise LayoutCheckError(
                        f"kvplug: the paged KV layout self-check failed: kvplug's view reads the {AXES[axis]} of "
                        f"{int(bad.sum())} of {bad.numel()} elements wrongly (the first at block {self.ids[first[0]]}, "
                        f"{'KV'[first[1]]}, token {first[2]}, head {first[3]}, dim {first[4]}). {self.what}. "
                        "kvplug refuses to save or load KV it would misread."
                    )
                p += 1

    def _fail(self, step: str) -> None:
        raise LayoutCheckError(f"kvplug: the paged KV layout self-check failed: {step}. {self.what}.")

    def _check_codecs(self, codecs: list[Codec]) -> torch.Tensor:
        """Each codec encodes the probed blocks to the bytes of their canonical copy and decodes
        them back as into it; returns the raw codec's bytes."""
        dev, n = self.kv.device, len(self.ids)
        values = torch.randn(self.shape, generator=torch.Generator().manual_seed(0)).to(self.kv.dtype).to(dev)
        canon_ids = torch.arange(n, device=dev)
        raw = None
        for codec in codecs:
            self.write(values)
            got = torch.empty((n, codec.layer_bytes), dtype=torch.uint8, device=dev)
            want = torch.empty_like(got)
            codec.encode(self.view, self.ids_t, got)
            codec.encode(values, canon_ids, want)
            if not torch.equal(got, want):
                self._fail(f"the {codec.name} codec encodes the probed blocks to other bytes than their canonical copy")
            self.write(torch.zeros_like(values))
            codec.decode(got, self.view, self.ids_t)
            expect = torch.empty_like(values)
            codec.decode(got, expect, canon_ids)
            if not torch.equal(self._read().view(torch.uint8), expect.view(torch.uint8)):
                self._fail(f"the {codec.name} codec decodes into the probed blocks other values than into their canonical copy")
            raw = got if codec.name == "raw" else raw
        return raw

    def _check_partial_load(self, raw_codec: Codec, raw: torch.Tensor) -> None:
        """A block hit for its first tokens only gets those (decoded into scratch, then
        copied, as LayerPipeline does); its other tokens and the other blocks keep theirs."""
        T = self.layout.block_tokens
        if T < 2:
            return
        guard = torch.full(self.shape, -3.0, dtype=self.kv.dtype, device=self.kv.device)
        guard[:, 1] = 5.0
        self.write(guard)
        scratch = torch.empty((1, *self.shape[1:]), dtype=self.kv.dtype, device=self.kv.device)
        raw_codec.decode(raw[:1], scratch, torch.zeros(1, dtype=torch.long, device=self.kv.device))
        n = T // 2
        copy_tokens(self.view, self.ids[0], scratch[0], n)
        got = self._read()
        want = guard.clone()
        want[0, :, :n] = scratch[0, :, :n]
        if not torch.equal(got.view(torch.uint8), want.view(torch.uint8)):
            self._fail(f"a load of the first {n} of {T} tokens of a block wrote other elements than those tokens")
