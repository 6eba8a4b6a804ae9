import pytest
import torch
from paged_cases import LAYOUTS, decode_both as _decode_both, make_paged, nan_equal, triton_mode

from kvplug import codec_reference as ref

with triton_mode() as DEV:  # TRITON_INTERPRET=1 unless set: kernels run on CPU
    from kvplug.triton_kernels.int4h_decode import int4h_decode


def decode_both(kind, nb, t, h, d, ids, group=0, dtype=torch.bfloat16, poison=None):
    return _decode_both((ref.int4h_layer_bytes, ref.int4h_encode, ref.int4h_decode), int4h_decode, DEV,
                        kind, nb, t, h, d, ids, group, dtype, poison)


@pytest.mark.parametrize("kind", LAYOUTS)
def test_matches_reference_every_layout(kind):
    _, got, want, _ = decode_both(kind, 5, 4, 2, 64, [4, 0, 2])
    assert nan_equal(got, want)  # untouched blocks are equal too (same seed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d,group", [(64, 0), (80, 0), (80, 16), (96, 32), (128, 0), (128, 32), (256, 0)])
def test_matches_reference_head_dims(d, group, dtype):
    src, got, want, view = decode_both("nb_2", 3, 2, 2, d, [2, 1], group, dtype)
    assert nan_equal(got, want)
    err = (view[[2, 1]].float() - src[[2, 1]].float()).norm() / src[[2, 1]].float().norm()
    assert err < 0.12  # 4-bit min-max of Gaussian data: ~0.09


def test_untouched_blocks_stay():
    _, got, want, _ = decode_both("cpu_packed", 4, 4, 2, 64, [1])
    _, fresh, _ = make_paged("cpu_packed", 4, 4, 2, 64, seed=1)
    assert torch.equal(got[[0, 2, 3]], fresh[[0, 2, 3]]) and not torch.equal(got[1], fresh[1])


def test_non_finite_decodes_to_nan_over_its_hadamard_block():
    def poison(v):
        v[0, 0, 0, 0, 3] = float("nan")  # d=80: Hadamard blocks of 16, group = whole head
        v[0, 1, 1, 1, 70] = float("inf")

    _, got, want, view = decode_both("nb_2", 2, 2, 2, 80, [0], 16, torch.float32, poison)
    assert nan_equal(got, want)
    nan = view[0].isnan()
    assert nan[0, 0, 0, :16].all() and nan[1, 1, 1, 64:].all() and nan.sum() == 32


def test_empty_block_list():
    _, raw, view = make_paged("nb_2", 2, 4, 2, 64)
    before = raw.clone()
    int4h_decode(torch.empty(0, ref.int4h_layer_bytes(4, 2, 64, 0), dtype=torch.uint8, device=DEV),
                 view.to(DEV), torch.empty(0, dtype=torch.long, device=DEV))
    assert torch.equal(raw, before)
