"""Seeded request streams for the serving bench: multi-round chat, long-document QA, no reuse.

A workload is a list of ``Request``s of token ids (sent as token-id prompts
to /v1/completions, so every configuration sees exactly the same tokens) in
the order they are issued; ``after`` names the request that must finish
first (a user's previous round) and ``think_s`` the pause after it.

chat:     U users x R rounds. Round 1 of a user's chat is a system prompt
          (shared by every user) + the user's own document + a question; round
          r is round r-1's prompt + the scripted answer to it + a new question
          (100-250 new tokens a round by default). The answers are scripted,
          not the model's, so the prompts do not depend on what a
          configuration generated. Users interleave.
docqa:    D documents x Q questions each, asked in a shuffled order.
noreuse:  N prompts that share nothing (each starts with its own token):
          what a cache costs when it cannot help.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

FIRST_TOKEN = 16  # ids below are left to the tokenizer's special tokens


@dataclass(frozen=True)
class Request:
    id: str
    session: str            # the user or document
    turn: int               # the round (chat) or question (docqa), from 0
    prompt: list[int] = field(repr=False)
    max_tokens: int = 32
    after: str | None = None  # id of the request that must finish before this one is sent
    think_s: float = 0.0


@dataclass(frozen=True)
class Workload:
    name: str
    params: dict
    requests: list[Request]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt) for r in self.requests)

    def unique_tokens(self) -> int:
        """Tokens in the prefix tree of all prompts: the working set a cache would need to hold."""
        return sum(len(r.prompt) - shared for r, shared in zip(self.requests, self._shared()))

    def prefill_floor(self) -> int:
        """Prompt tokens that must be computed with a perfect cache, at token granularity: each
        prompt's tokens past the longest prefix it shares with an earlier prompt (at least one)."""
        return sum(max(1, len(r.prompt) - shared) for r, shared in zip(self.requests, self._shared()))

    def _shared(self) -> list[int]:
        out, seen = [], []
        for r in self.requests:
            out.append(max((_common(r.prompt, p) for p in seen), default=0))
            seen.append(r.prompt)
        return out

    def describe(self) -> dict:
        return {"name": self.name, "params": self.params, "requests": len(self.requests),
                "prompt_tokens": self.prompt_tokens, "unique_tokens": self.unique_tokens(),
                "prefill_floor_tokens": self.prefill_floor(),
                "max_prompt_tokens": max(len(r.prompt) for r in self.requests)}


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(FIRST_TOKEN, vocab) for _ in range(n)]


def chat(vocab: int, *, users: int = 8, rounds: int = 4, system_tokens: int = 200, doc_tokens: int = 800,
         new_min: int = 100, new_max: int = 250, output_tokens: int = 32, think_s: float = 0.0,
         seed: int = 0) -> Workload:
    params = {k: v for k, v in locals().items() if k != "vocab"}
    rng = random.Random(f"chat-{seed}")
    system = _tokens(rng, system_tokens, vocab)
    histories = {u: system + _tokens(rng, doc_tokens, vocab) for u in range(users)}
    requests = []
    for r in range(rounds):  # users interleave: every user's round r before anyone's round r+1
        for u in range(users):
            new = rng.randint(new_min, new_max)
            answer = _tokens(rng, new // 2, vocab) if r else []  # the scripted answer to round r-1
            histories[u] = histories[u] + answer + _tokens(rng, new - len(answer), vocab)
            requests.append(Request(f"u{u}-r{r}", f"u{u}", r, histories[u], output_tokens,
                                    after=f"u{u}-r{r - 1}" if r else None, think_s=think_s if r else 0.0))
    return Workload("chat", params, requests)


def docqa(vocab: int, *, docs: int = 4, questions: int = 4, doc_tokens: int = 1500, question_min: int = 20,
          question_max: int = 60, output_tokens: int = 32, seed: int = 0) -> Workload:
    params = {k: v for k, v in locals().items() if k != "vocab"}
    rng = random.Random(f"docqa-{seed}")
    documents = [_tokens(rng, doc_tokens, vocab) for _ in range(docs)]
    requests = [Request(f"d{d}-q{q}", f"d{d}", q, documents[d] + _tokens(rng, rng.randint(question_min,
                        question_max), vocab), output_tokens)
                for d in range(docs) for q in range(questions)]
    rng.shuffle(requests)
    return Workload("docqa", params, requests)


def noreuse(vocab: int, *, prompts: int = 16, prompt_tokens: int = 1000, output_tokens: int = 32,
            seed: int = 0) -> Workload:
    params = {k: v for k, v in locals().items() if k != "vocab"}
    rng = random.Random(f"noreuse-{seed}")
    firsts = rng.sample(range(FIRST_TOKEN, vocab), prompts)  # a different first token: nothing shared
    requests = [Request(f"p{i}", f"p{i}", 0, [firsts[i]] + _tokens(rng, prompt_tokens - 1, vocab), output_tokens)
                for i in range(prompts)]
    return Workload("noreuse", params, requests)


WORKLOADS = {"chat": chat, "docqa": docqa, "noreuse": noreuse}


def build(name: str, vocab: int, **sizes) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"workload={name!r} is not accepted; expected one of {', '.join(WORKLOADS)}")
    return WORKLOADS[name](vocab, **{k: v for k, v in sizes.items() if v is not None})


def request_dict(r: Request) -> dict:
    d = asdict(r)
    d["prompt_tokens"] = len(d.pop("prompt"))
    return d
