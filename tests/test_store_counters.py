from kvplug.blocks import BlockRef, Hit
from kvplug.store_counters import StoreCounters


def test_a_lookup_counts_per_tier_in_blocks_and_tokens():
    c = StoreCounters(block_tokens=4, ssd=True)
    # 10 tokens asked (3 blocks); hit: one full block in CPU, then 2 tokens of a block on SSD
    c.count_lookup(10, Hit(6, [BlockRef(b"a", 4, "cpu", 0), BlockRef(b"b", 2, "ssd", None)]))
    report = StoreCounters.report(c, {}, {}, cpu_blocks=1, block_bytes=100, pinned=0, writing=0)
    assert report["cpu"] == {"hit_blocks": 1, "hit_tokens": 4, "miss_blocks": 2, "miss_tokens": 6,
                                  "blocks": 1, "bytes": 100, "pinned_blocks": 0}
    assert report["ssd"] == {"hit_blocks": 1, "hit_tokens": 2, "miss_blocks": 1, "miss_tokens": 4}
    assert report["store"]["lookups"] == 1 and report["store"]["hit_tokens"] == 6


def test_no_ssd_section_without_an_ssd_tier():
    c = StoreCounters(block_tokens=4, ssd=False)
    c.count_lookup(8, Hit(0, []))
    assert "ssd" not in StoreCounters.report(c, {}, None, cpu_blocks=0, block_bytes=1, pinned=0, writing=0)
    assert c["ssd_miss_blocks"] == 0
