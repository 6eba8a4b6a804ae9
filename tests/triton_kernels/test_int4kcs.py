"""int4kcs (int4kc, each block's first token's keys exact): fused kernels against the reference."""

import pytest
import torch
from paged_cases import LAYOUTS, decode_both, encode_both, make_paged, nan_equal, triton_mode

from kvplug import codec_int4kc as kc

with triton_mode() as DEV:  # TRITON_INTERPRET=1 unless set: kernels run on CPU
    from kvplug.triton_kernels.int4kc_decode import int4kc_decode
    from kvplug.triton_kernels.int4kc_encode import int4kc_encode


def _sink(dtype):
    size = dtype.itemsize
    return ((lambda t, h, d, g: kc.layer_bytes(t, h, d, g, size)),
            (lambda v, ids, out, g: kc.encode(v, ids, out, g, sink=True)),
            (lambda src, v, ids, g: kc.decode(src, v, ids, g, sink=True)))


def enc_both(view, ids, group=0):
    nbytes, ref_encode, _ = _sink(view.dtype)
    return encode_both(nbytes, ref_encode, lambda v, i, o, g: int4kc_encode(v, i, o, g, sink=True),
                       DEV, view, ids, group)


def dec_both(kind, nb, t, h, d, ids, group=0, dtype=torch.bfloat16, poison=None):
    return decode_both(_sink(dtype), lambda s, v, i, g: int4kc_decode(s, v, i, g, sink=True), DEV,
                       kind, nb, t, h, d, ids, group, dtype, poison)


@pytest.mark.parametrize("kind", LAYOUTS)
def test_encode_decode_match_reference_every_layout(kind):
    _, _, view = make_paged(kind, nb=5, t=4, h=2, d=64)
    got, want = enc_both(view, [4, 0, 2])
    assert torch.equal(got, want)
    _, got, want, _ = dec_both(kind, 5, 4, 2, 64, [4, 0, 2])
    assert nan_equal(got, want)


@pytest.mark.parametrize("t,d,group,dtype", [
    (3, 64, 0, torch.bfloat16), (5, 80, 16, torch.float16), (4, 96, 32, torch.float32)])
def test_match_reference_shapes(t, d, group, dtype):
    _, _, view = make_paged("nb_2", nb=3, t=t, h=2, d=d, dtype=dtype, seed=d + group)
    got, want = enc_both(view, [2, 1], group)
    assert torch.equal(got, want)
    _, got, want, _ = dec_both("nb_2", 3, t, 2, d, [2, 1], group, dtype)
    assert nan_equal(got, want)


def test_sink_kept_exact_and_out_of_the_range():
    def poison(v):
        v[1, 0, 0, :, :8] *= 200.0  # the sink's keys: far out in a few channels
        v[1, 0, 0, 1, 9] = float("nan")  # kept as it is, not spread over its channel

    src, got, want, view = dec_both("nb_2", 2, 16, 2, 64, [1], 0, torch.bfloat16, poison)
    assert nan_equal(got, want)
    k, k0 = view[1, 0].float(), src[1, 0].float()
    assert nan_equal(k[0], k0[0])  # bit for bit, NaN included
    assert not k[1:].isnan().any()
    rest = (k[1:] - k0[1:]).norm() / k0[1:].norm()
    assert rest < 0.1  # 4-bit over 15 tokens, not over the sink's 200x range
