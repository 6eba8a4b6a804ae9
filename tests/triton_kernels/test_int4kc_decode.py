import pytest
import torch
from paged_cases import LAYOUTS, decode_both as _decode_both, make_paged, nan_equal, triton_mode

from kvplug import codec_int4kc as kc

with triton_mode() as DEV:  # TRITON_INTERPRET=1 unless set: kernels run on CPU
    from kvplug.triton_kernels.int4kc_decode import int4kc_decode


def decode_both(kind, nb, t, h, d, ids, group=0, dtype=torch.bfloat16, poison=None):
    return _decode_both((kc.layer_bytes, kc.encode, kc.decode), int4kc_decode, DEV,
                        kind, nb, t, h, d, ids, group, dtype, poison)


@pytest.mark.parametrize("kind", LAYOUTS)
def test_matches_reference_every_layout(kind):
    _, got, want, _ = decode_both(kind, 5, 4, 2, 64, [4, 0, 2])
    assert nan_equal(got, want)  # untouched blocks are equal too (same seed)


@pytest.mark.parametrize("t,d,group,dtype", [
    (3, 64, 0, torch.bfloat16), (5, 80, 16, torch.float16), (2, 96, 32, torch.float32),
    (8, 128, 0, torch.float16), (2, 256, 0, torch.bfloat16)])
def test_matches_reference_shapes(t, d, group, dtype):
    src, got, want, view = decode_both("nb_2", 3, t, 2, d, [2, 1], group, dtype)
    assert nan_equal(got, want)
    err = (view[[2, 1]].float() - src[[2, 1]].float()).norm() / src[[2, 1]].float().norm()
    assert err < 0.15  # 4-bit min-max of Gaussian data


def test_channel_tiles_of_a_long_block():
    _, got, want, _ = decode_both("cpu_packed", 2, 128, 1, 64, [1])
    assert nan_equal(got, want)


def test_non_finite_decodes_to_nan_over_its_channel():
    def poison(v):
        v[0, 0, 1, 0, 3] = float("nan")  # K: channel 3 of head 0, every token of the block
        v[0, 1, 1, 1, 70] = float("inf")  # V: token 1 head 1, its Hadamard block of 16

    _, got, want, view = decode_both("nb_2", 2, 4, 2, 80, [0], 16, torch.float32, poison)
    assert nan_equal(got, want)
    nan = view[0].isnan()
    assert nan[0, :, 0, 3].all() and nan[1, 1, 1, 64:].all() and nan.sum() == 4 + 16


def test_empty_block_list():
    _, raw, view = make_paged("nb_2", 2, 4, 2, 64)
    before = raw.clone()
    int4kc_decode(torch.empty(0, kc.layer_bytes(4, 2, 64, 0), dtype=torch.uint8, device=DEV),
                  view.to(DEV), torch.empty(0, dtype=torch.long, device=DEV))
    assert torch.equal(raw, before)
