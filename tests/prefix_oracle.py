"""Brute-force longest stored prefix: the oracle of the index and store property tests."""


def longest_prefix(stored: dict, query: list[int], root: bytes, block_tokens: int) -> int:
    """Tokens of the longest prefix of ``query`` held by ``stored`` {key: (parent, tokens)}."""
    parent, pos = root, 0
    while True:
        best = 0
        for key, (p, toks) in stored.items():
            if p != parent:
                continue
            lcp = 0
            while lcp < len(toks) and pos + lcp < len(query) and toks[lcp] == query[pos + lcp]:
                lcp += 1
            if lcp == block_tokens == len(toks):
                parent, pos = key, pos + block_tokens
                break
            best = max(best, lcp)
        else:
            return pos + best
