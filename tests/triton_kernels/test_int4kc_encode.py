import pytest
import torch
from paged_cases import LAYOUTS, encode_both as _encode_both, make_paged, triton_mode

from kvplug import codec_int4kc as kc

with triton_mode() as DEV:  # TRITON_INTERPRET=1 unless set: kernels run on CPU
    from kvplug.triton_kernels.int4kc_encode import int4kc_encode


def encode_both(view, ids, group=0):
    return _encode_both(kc.layer_bytes, kc.encode, int4kc_encode, DEV, view, ids, group)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bytes_match_reference_every_layout(layout):
    _, _, view = make_paged(layout, nb=5, t=4, h=2, d=64)
    got, want = encode_both(view, [4, 0, 2])  # 4 is the last block of the cache
    assert torch.equal(got, want)


@pytest.mark.parametrize("t,d,group,dtype", [
    (3, 64, 0, torch.bfloat16), (5, 80, 16, torch.float16), (2, 96, 32, torch.float32),
    (4, 128, 0, torch.float16), (2, 256, 0, torch.bfloat16)])
def test_bytes_match_reference_shapes(t, d, group, dtype):
    _, _, view = make_paged("nb_2", nb=3, t=t, h=2, d=d, dtype=dtype, seed=d + group)
    got, want = encode_both(view, [2, 1], group)
    assert torch.equal(got, want)


def test_channel_tiles_of_a_long_block():
    # 128 tokens: the key kernel splits head_dim into tiles of 32 channels
    _, _, view = make_paged("cpu_packed", nb=2, t=128, h=1, d=64)
    got, want = encode_both(view, [1])
    assert torch.equal(got, want)


def test_offsets_constant_channels_and_fp16_range():
    _, _, view = make_paged("nb_2", nb=2, t=4, h=2, d=64, dtype=torch.float32)
    view[0, 0, :, 0, 3] = 7.0  # constant channel: scale 0
    view[0, 0, :, 1, 5] += 600.0  # a key bias: constant offset
    view[0, 0, 2, 1, 9] = 1e6  # beyond fp16: zero and scale saturate
    got, want = encode_both(view, [0])
    assert torch.equal(got, want)


def test_non_finite_defined_codes():
    _, _, view = make_paged("nb_2", nb=2, t=4, h=2, d=64, dtype=torch.float32)
    view[1, 0, 0, 0, 3] = float("nan")  # K: channel 3 of head 0
    view[1, 0, 3, 1, 7] = float("-inf")  # K: channel 7 of head 1
    view[1, 1, 2, 1, 0] = float("inf")  # V: token 2, head 1
    got, want = encode_both(view, [1, 0])
    assert torch.equal(got, want)
    t, h, d = 4, 2, 64
    kmeta = got[0, t * h * d : t * h * d + 4 * h * d].view(torch.int16)
    bad = [3, d + 7]
    assert (kmeta[bad] == 0x7E00).all() and (kmeta[[h * d + b for b in bad]] == 0x7E00).all()
    assert (kmeta != 0x7E00).sum() == 4 * h * d // 2 - 4
    codes = got[0, : t * h * d // 2].view(t, h, d // 2)
    assert ((codes[:, 0, 1] >> 4) == 0).all() and ((codes[:, 1, 3] >> 4) == 0).all()  # odd channels: high nibble


def test_strided_output_rows():
    _, _, view = make_paged("2_nb", nb=4, t=4, h=2, d=64)
    nbytes = kc.layer_bytes(4, 2, 64, 0)
    slab = torch.full((3, 3 * nbytes), 7, dtype=torch.uint8, device=DEV)
    out = slab[:, nbytes : 2 * nbytes]
    int4kc_encode(view.to(DEV), torch.tensor([3, 1, 0], device=DEV), out)
    _, want = encode_both(view, [3, 1, 0])
    assert torch.equal(out.cpu(), want)
    assert (slab[:, :nbytes] == 7).all() and (slab[:, 2 * nbytes :] == 7).all()
