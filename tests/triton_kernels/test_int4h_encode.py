import pytest
import torch
from paged_cases import LAYOUTS, encode_both as _encode_both, make_paged, triton_mode

from kvplug import codec_reference as ref

with triton_mode() as DEV:  # TRITON_INTERPRET=1 unless set: kernels run on CPU
    from kvplug.triton_kernels.int4h_encode import int4h_encode


def encode_both(view, ids, group=0):
    return _encode_both(ref.int4h_layer_bytes, ref.int4h_encode, int4h_encode, DEV, view, ids, group)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bytes_match_reference_every_layout(layout):
    _, _, view = make_paged(layout, nb=5, t=4, h=2, d=64)
    got, want = encode_both(view, [4, 0, 2])  # 4 is the last block of the cache
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("d,group", [(64, 0), (80, 0), (80, 16), (96, 32), (128, 0), (128, 32), (256, 0)])
def test_bytes_match_reference_head_dims(d, group, dtype):
    _, _, view = make_paged("nb_2", nb=3, t=2, h=2, d=d, dtype=dtype, seed=d + group)
    got, want = encode_both(view, [2, 1], group)
    assert torch.equal(got, want)


def test_real_model_tile_shape():
    _, _, view = make_paged("nb_2", nb=2, t=16, h=8, d=128)
    got, want = encode_both(view, [1])
    assert torch.equal(got, want)


def test_outliers_constant_rows_and_fp16_range():
    _, _, view = make_paged("nb_2", nb=2, t=4, h=2, d=64, dtype=torch.float32)
    view[0, 0, 0, 0] = 0.0  # constant group: scale 0
    view[0, 0, 1, 0, 5] = 40.0  # outlier channel
    view[0, 1, 2, 1] = 1e6  # beyond fp16: zero and scale saturate
    got, want = encode_both(view, [0])
    assert torch.equal(got, want)


def test_non_finite_defined_codes():
    _, _, view = make_paged("nb_2", nb=2, t=4, h=2, d=64, dtype=torch.float32)
    view[1, 0, 0, 0, 3] = float("nan")
    view[1, 1, 3, 1, 7] = float("-inf")
    got, want = encode_both(view, [1, 0])
    assert torch.equal(got, want)
    rows, meta = 2 * 4 * 2, got[0, 2 * 4 * 2 * 32 :].view(torch.int16)
    scales, zeros = meta[:rows], meta[rows:]
    bad = [0, rows - 1]  # (K, t0, h0) and (V, t3, h1)
    assert (scales[bad] == ref.NAN16_BITS).all() and (zeros[bad] == ref.NAN16_BITS).all()
    assert (got[0, : rows * 32].view(rows, 32)[bad] == 0).all()
    assert torch.isfinite(scales[1:-1].view(torch.float16)).all()


def test_empty_block_list_writes_nothing():
    _, _, view = make_paged("nb_2", nb=2, t=4, h=2, d=64)
    out = torch.empty(0, ref.int4h_layer_bytes(4, 2, 64, 0), dtype=torch.uint8, device=DEV)
    int4h_encode(view.to(DEV), torch.empty(0, dtype=torch.long, device=DEV), out)


def test_strided_output_rows():
    # rows of a larger slab, as the connector passes them: row stride > layer_bytes
    _, _, view = make_paged("2_nb", nb=4, t=4, h=2, d=64)
    nbytes = ref.int4h_layer_bytes(4, 2, 64, 0)
    slab = torch.full((3, 3 * nbytes), 7, dtype=torch.uint8, device=DEV)
    out = slab[:, nbytes : 2 * nbytes]
    int4h_encode(view.to(DEV), torch.tensor([3, 1, 0], device=DEV), out)
    _, want = encode_both(view, [3, 1, 0])
    assert torch.equal(out.cpu(), want)
    assert (slab[:, :nbytes] == 7).all() and (slab[:, 2 * nbytes :] == 7).all()
