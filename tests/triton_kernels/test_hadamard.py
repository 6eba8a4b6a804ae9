import pytest
import torch
from paged_cases import triton_mode

from kvplug.codec_reference import hadamard, hadamard_block

with triton_mode() as DEV:  # TRITON_INTERPRET=1 unless set: kernels run on CPU
    from kvplug.triton_kernels.hadamard import hadamard_transform


def test_block_sizes():
    assert [hadamard_block(d) for d in (32, 64, 80, 96, 128, 256, 512)] == [32, 64, 16, 32, 128, 256, 256]


@pytest.mark.parametrize("d", [64, 80, 96, 128, 256, 512])
def test_orthonormal_and_self_inverse(d):
    eye = torch.eye(d, device=DEV)
    h = hadamard_transform(eye).double()  # row i = H e_i, so this is H (symmetric)
    assert torch.allclose(h @ h.T, torch.eye(d, dtype=torch.float64, device=DEV), atol=1e-6)
    assert torch.allclose(h, h.T)
    x = torch.randn(33, d, device=DEV)
    assert torch.allclose(hadamard_transform(hadamard_transform(x)), x, atol=1e-5)
    assert torch.allclose(x.norm(dim=-1), hadamard_transform(x).norm(dim=-1), rtol=1e-5)


def test_block_diagonal():
    h = hadamard_transform(torch.eye(80, device=DEV))  # 80 = 5 blocks of 16
    off = h.clone()
    for b in range(5):
        off[16 * b : 16 * b + 16, 16 * b : 16 * b + 16] = 0
    assert off.abs().max() == 0
    assert torch.allclose(h[:16, :16].abs(), torch.full((16, 16), 0.25, device=DEV))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 80, 128])
def test_matches_reference_exactly(d, dtype):
    x = torch.randn(2, 7, d).to(dtype)
    y = hadamard_transform(x.to(DEV)).cpu()
    if dtype == torch.bfloat16:  # the interpreter's bf16 cast truncates: compare the fp32 math
        y = hadamard_transform(x.float().to(DEV)).cpu()
        assert torch.equal(y, hadamard(x.float()))
    else:
        assert torch.equal(y, hadamard(x))


def test_explicit_block_and_empty():
    x = torch.randn(5, 64, device=DEV)
    assert torch.equal(hadamard_transform(x, 16).cpu(), hadamard(x.cpu(), 16))
    assert hadamard_transform(torch.empty(0, 64, device=DEV)).shape == (0, 64)
    with pytest.raises(ValueError):
        hadamard_transform(x, 24)
