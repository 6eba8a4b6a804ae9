import pytest
import torch
from paged_cases import LAYOUTS, make_paged, triton_mode

from kvplug import codec_reference as ref

with triton_mode() as DEV:  # TRITON_INTERPRET=1 unless set: kernels run on CPU
    from kvplug.triton_kernels.paged_copy import paged_gather, paged_scatter

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def with_nan_payloads(view):
    # odd NaN payloads and signed infinities: bits must survive untouched
    ints = view.view({2: torch.int16, 4: torch.int32}[view.element_size()])
    ints[0, 0, 0, 0, :3] = torch.tensor([0x7F81, -0x0001, 0x7C01] if view.element_size() == 2 else
                                        [0x7F800001, -0x00000001, 0x7FC12345], dtype=ints.dtype)
    view[0, 1, 0, 0, 3] = float("-inf")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", LAYOUTS)
def test_round_trip_bit_exact(kind, dtype):
    _, raw, view = make_paged(kind, nb=5, t=4, h=2, d=64, dtype=dtype)
    with_nan_payloads(view)
    ids = torch.tensor([4, 0, 2])  # 4 is the last block of the cache
    nbytes = 2 * 4 * 2 * 64 * view.element_size()
    got = torch.zeros(3, nbytes, dtype=torch.uint8, device=DEV)
    paged_gather(view.to(DEV), ids.to(DEV), got)
    want = torch.zeros(3, nbytes, dtype=torch.uint8)
    ref.raw_gather(view, ids, want)
    assert torch.equal(got.cpu(), want)
    # the row is the block's [2, T, H, D] values, contiguous
    assert torch.equal(want[1], view[0].contiguous().view(torch.uint8).reshape(-1))

    _, raw2, view2 = make_paged(kind, nb=5, t=4, h=2, d=64, dtype=dtype, seed=3)
    raw2 = raw2.to(DEV)
    paged_scatter(got, raw2.as_strided(view2.shape, view2.stride(), view2.storage_offset()), ids.to(DEV))
    back = raw2.cpu().as_strided(view2.shape, view2.stride(), view2.storage_offset())
    assert torch.equal(back[[4, 0, 2]].view(torch.uint8), view[[4, 0, 2]].view(torch.uint8))
    assert torch.equal(back[[1, 3]].view(torch.uint8), view2[[1, 3]].view(torch.uint8))


@pytest.mark.parametrize("d", [80, 128, 256])
def test_head_dims_and_strided_rows(d):
    _, _, view = make_paged("2_nb", nb=3, t=2, h=2, d=d, dtype=torch.float16)
    nbytes = 2 * 2 * 2 * d * 2
    slab = torch.zeros(2, 2 * nbytes, dtype=torch.uint8, device=DEV)
    paged_gather(view.to(DEV), torch.tensor([2, 1], device=DEV), slab[:, nbytes:])
    want = torch.zeros(2, nbytes, dtype=torch.uint8)
    ref.raw_gather(view, torch.tensor([2, 1]), want)
    assert torch.equal(slab[:, nbytes:].cpu(), want) and (slab[:, :nbytes] == 0).all()


def test_empty_and_misaligned():
    _, _, view = make_paged("nb_2", nb=2, t=4, h=2, d=64, dtype=torch.float32)
    view = view.to(DEV)
    paged_gather(view, torch.empty(0, dtype=torch.long, device=DEV), torch.empty(0, 4096, dtype=torch.uint8, device=DEV))
    bad = torch.zeros(1, 4098, dtype=torch.uint8, device=DEV)[:, 2:]
    with pytest.raises(ValueError, match="aligned"):
        paged_gather(view, torch.tensor([0], device=DEV), bad)
