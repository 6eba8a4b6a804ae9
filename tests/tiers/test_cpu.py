import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kvplug.tiers.base import BackingTier, Tier
from kvplug.tiers.cpu import CPUTier
from kvplug.tiers.slots import slot_stride

BLOCK = 2 * 2 * 4 * 2 * 8 * 2  # 2 layers, K/V, 4 tokens, 2 heads, head 8, bf16 = 512 bytes
STRIDE = slot_stride(BLOCK)


@pytest.fixture(params=["private", "shared"])
def tier(request, tmp_path):
    name = "slab" if request.param == "shared" else None
    t = CPUTier.create(5 * STRIDE + 100, BLOCK, name=name, shm_dir=str(tmp_path))
    yield t
    t.close()
    t.unlink()


def test_geometry_is_whole_aligned_slots(tier):
    assert tier.num_slots == 5
    assert tier.buffer.shape == (5, STRIDE) and tier.buffer.dtype == torch.uint8
    assert tier.buffer.data_ptr() % 4096 == 0 and STRIDE % 4096 == 0
    assert tier.slot_view(3).numel() == STRIDE and tier.slot_view(3).data_ptr() % 4096 == 0
    assert tier.block_view(3).numel() == BLOCK
    assert tier.stats()["capacity_blocks"] == 5
    assert isinstance(tier, Tier) and not isinstance(tier, BackingTier)


def test_allocate_and_free_are_a_free_list(tier):
    slots = [tier.allocate() for _ in range(5)]
    assert sorted(slots) == list(range(5))
    assert tier.allocate() is None and tier.num_free == 0
    tier.free(slots[2])
    assert tier.allocate() == slots[2]
    tier.free(slots[0])
    with pytest.raises(ValueError, match="not allocated"):
        tier.free(slots[0])
    assert tier.stats()["used_slots"] == 4


def test_slots_hold_their_bytes_independently(tier):
    a, b = tier.allocate(), tier.allocate()
    tier.block_view(a).fill_(1)
    tier.block_view(b).copy_(torch.arange(BLOCK, dtype=torch.int64).to(torch.uint8))
    assert bool((tier.block_view(a) == 1).all())
    assert tier.block_view(b)[:4].tolist() == [0, 1, 2, 3]


def test_too_small_capacity_names_the_key():
    with pytest.raises(ValueError, match="cpu_bytes=100"):
        CPUTier.create(100, BLOCK)


def test_shared_slab_is_seen_by_another_process(tmp_path):
    owner = CPUTier.create(4 * STRIDE, BLOCK, name="kv-shared", shm_dir=str(tmp_path))
    slot = owner.allocate()
    owner.block_view(slot).fill_(42)
    child = textwrap.dedent(f"""
        from kvplug.tiers.cpu import CPUTier
        t = CPUTier.attach("kv-shared", {BLOCK}, shm_dir={str(tmp_path)!r})
        assert t.num_slots == 4 and t.allocate() is None
        assert bool((t.block_view({slot}) == 42).all())
        t.block_view({slot})[:3] = 7
        t.close()
    """)
    subprocess.run([sys.executable, "-c", child], check=True)
    assert owner.block_view(slot)[:4].tolist() == [7, 7, 7, 42]
    owner.close()
    owner.unlink()
    assert not os.listdir(tmp_path)


def test_attached_tier_does_not_free(tmp_path):
    with CPUTier.create(2 * STRIDE, BLOCK, name="s", shm_dir=str(tmp_path)) as owner:
        owner.allocate()
        other = CPUTier.attach("s", BLOCK, shm_dir=str(tmp_path))
        with pytest.raises(RuntimeError):
            other.free(0)
        other.close()
    assert not os.listdir(tmp_path)  # the owner's context manager unlinks


def test_attach_rejects_another_geometry(tmp_path):
    with CPUTier.create(3 * STRIDE, BLOCK, name="g", shm_dir=str(tmp_path)):
        with pytest.raises(ValueError, match="expected blocks of 5000"):
            CPUTier.attach("g", 5000, shm_dir=str(tmp_path))


def test_create_never_replaces_an_existing_file(tmp_path):
    (tmp_path / "taken").write_bytes(b"x" * 10)
    with pytest.raises(FileExistsError, match="never replaced"):
        CPUTier.create(2 * STRIDE, BLOCK, name="taken", shm_dir=str(tmp_path))
    assert (tmp_path / "taken").read_bytes() == b"x" * 10


def test_two_engines_with_one_name_prefix_stay_apart(tmp_path):
    # Two engines with the same engine_id on one host: each makes its own slab
    # (random name), and a worker handed one's nonce cannot map the other's.
    a = CPUTier.create(2 * STRIDE, BLOCK, name=CPUTier.unique_name("kvplug-e1"), shm_dir=str(tmp_path))
    b = CPUTier.create(2 * STRIDE, BLOCK, name=CPUTier.unique_name("kvplug-e1"), shm_dir=str(tmp_path))
    assert a.name != b.name and a.nonce != b.nonce
    a.block_view(a.allocate()).fill_(1)
    b.block_view(b.allocate()).fill_(2)
    worker = CPUTier.attach(a.name, BLOCK, shm_dir=str(tmp_path), nonce=a.nonce)
    assert bool((worker.block_view(0) == 1).all())
    with pytest.raises(ValueError, match="another engine instance"):
        CPUTier.attach(b.name, BLOCK, shm_dir=str(tmp_path), nonce=a.nonce)
    worker.unlink()  # an attached tier never removes the owner's file
    assert sorted(os.listdir(tmp_path)) == sorted([a.name, b.name])
    for t in (worker, a, b):
        t.close()
    a.unlink()
    b.unlink()
    assert not os.listdir(tmp_path)


def test_owner_never_unlinks_a_file_that_took_its_name(tmp_path):
    a = CPUTier.create(2 * STRIDE, BLOCK, name="n", shm_dir=str(tmp_path))
    os.unlink(a.path)  # gone (e.g. removed by hand), and the name taken by something else
    (tmp_path / "n").write_bytes(b"y" * 8192)
    a.unlink()
    assert (tmp_path / "n").exists()
    a.close()


def test_attach_refuses_a_file_that_is_not_a_slab(tmp_path):
    (tmp_path / "junk").write_bytes(b"\0" * 8192)
    with pytest.raises(ValueError, match="not a kvplug slab"):
        CPUTier.attach("junk", BLOCK, shm_dir=str(tmp_path))


def test_bad_names_are_rejected(tmp_path):
    for bad in ("", "a/b", ".."):
        with pytest.raises(ValueError, match="plain file name"):
            CPUTier.create(STRIDE, BLOCK, name=bad, shm_dir=str(tmp_path))


def test_views_survive_close(tier):
    view = tier.block_view(0)
    tier.close()
    view.fill_(3)  # the mapping lives as long as a view does
    assert int(view[0]) == 3
    tier.close()  # idempotent


def test_pinned_only_with_cuda_and_asked(tier, tmp_path):
    if not torch.cuda.is_available():
        assert not tier.pinned
    elif tier.path is None:  # anonymous memory can always be pinned
        assert tier.pinned and tier.buffer.is_pinned()
    with CPUTier.create(2 * STRIDE, BLOCK, pin=False) as unpinned:
        assert not unpinned.pinned


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("shm_dir", ["/dev/shm", "tmp"])
def test_pinned_slab_copies_to_and_from_the_gpu(shm_dir, tmp_path):
    shm_dir = str(tmp_path) if shm_dir == "tmp" else shm_dir  # tmp: maybe not tmpfs, so maybe refused
    with CPUTier.create(4 * STRIDE, BLOCK, name=f"kvplug-test-{os.getpid()}", shm_dir=shm_dir) as t:
        a, b = t.allocate(), t.allocate()
        t.block_view(a).copy_(torch.randint(0, 256, (BLOCK,), dtype=torch.uint8))
        on_gpu = t.block_view(a).to("cuda", non_blocking=True)  # a refused pin must not break CUDA
        t.block_view(b).copy_(on_gpu, non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(t.block_view(a), t.block_view(b))
        assert t.pinned == t.buffer.is_pinned()
        if shm_dir == "/dev/shm":
            assert t.pinned
            attached = CPUTier.attach(t.name, BLOCK, shm_dir=shm_dir)
            assert attached.pinned  # each process (each mapping) pins its own
            attached.close()


def test_slabs_of_dead_engines_are_swept_and_live_ones_kept(tmp_path):
    # An engine killed (kill -9) before its workers attached leaves its slab behind.
    child = textwrap.dedent(f"""
        import os
        from kvplug.tiers.cpu import CPUTier
        CPUTier.create({2 * STRIDE}, {BLOCK}, name="kvplug-dead-1", shm_dir={str(tmp_path)!r})
        os.kill(os.getpid(), 9)
    """)
    subprocess.run([sys.executable, "-c", child])
    live = CPUTier.create(2 * STRIDE, BLOCK, name="kvplug-live-1", shm_dir=str(tmp_path))
    (tmp_path / "kvplug-not-a-slab").write_bytes(b"\0" * 8192)  # not ours to judge: kept
    assert CPUTier.sweep_dead(str(tmp_path)) == ["kvplug-dead-1"]
    assert sorted(os.listdir(tmp_path)) == ["kvplug-live-1", "kvplug-not-a-slab"]
    live.close()
    live.unlink()
