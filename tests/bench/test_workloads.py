"""The serving bench's workloads: seeded, and shaped as specified (kvplug/bench/workloads.py)."""

from __future__ import annotations

import pytest

from kvplug.bench import workloads as w


@pytest.mark.parametrize("name", ["chat", "docqa", "noreuse"])
def test_a_seed_gives_the_same_requests_and_another_seed_others(name):
    a, b, c = w.build(name, 8192, seed=1), w.build(name, 8192, seed=1), w.build(name, 8192, seed=2)
    assert a.requests == b.requests
    assert [r.prompt for r in a.requests] != [r.prompt for r in c.requests]


def test_chat_round_r_starts_with_rounds_before_it():
    chat = w.chat(2048, users=3, rounds=4, system_tokens=50, doc_tokens=150, new_min=100, new_max=250, seed=3)
    by_user: dict[str, list] = {}
    for r in chat.requests:
        by_user.setdefault(r.session, []).append(r)
    assert len(by_user) == 3
    for rounds in by_user.values():
        assert [r.turn for r in rounds] == [0, 1, 2, 3]
        assert rounds[0].after is None
        for prev, cur in zip(rounds, rounds[1:]):
            assert cur.after == prev.id
            assert cur.prompt[:len(prev.prompt)] == prev.prompt       # the whole history ...
            assert 100 <= len(cur.prompt) - len(prev.prompt) <= 250   # ... plus the round's new tokens
        assert 300 <= len(rounds[0].prompt) <= 450                   # system + document + first question
    firsts = [rounds[0].prompt for rounds in by_user.values()]
    assert firsts[0][:50] == firsts[1][:50] == firsts[2][:50]       # the system prompt is shared
    assert firsts[0][50:200] != firsts[1][50:200]                   # each user has a document of their own
    # users interleave: every user's round r before anyone's round r+1
    assert [r.turn for r in chat.requests] == sorted(r.turn for r in chat.requests)


def test_chat_floor_counts_each_new_token_once():
    chat = w.chat(2048, users=2, rounds=3, system_tokens=40, doc_tokens=60, new_min=10, new_max=10)
    # system 40 once; each user's document 60 and 3 x 10 new tokens
    assert chat.prefill_floor() == chat.unique_tokens() == 40 + 2 * (60 + 30)
    assert chat.prompt_tokens == 2 * (110 + 120 + 130)


def test_docqa_asks_every_question_of_every_document_in_a_shuffled_order():
    qa = w.docqa(2048, docs=3, questions=4, doc_tokens=200, seed=5)
    ids = [r.id for r in qa.requests]
    assert sorted(ids) == sorted(f"d{d}-q{q}" for d in range(3) for q in range(4))
    assert ids != sorted(ids, key=lambda i: (int(i[1]), int(i.split("q")[1])))
    for r in qa.requests:
        same = [o for o in qa.requests if o.session == r.session]
        assert all(o.prompt[:200] == r.prompt[:200] for o in same)
    assert all(r.after is None for r in qa.requests)


def test_noreuse_prompts_share_nothing():
    nr = w.noreuse(2048, prompts=10, prompt_tokens=100)
    assert len({r.prompt[0] for r in nr.requests}) == 10
    assert nr.prefill_floor() == nr.prompt_tokens == 1000


def test_an_unknown_workload_is_refused_by_name():
    with pytest.raises(ValueError, match="workload='chats' is not accepted; expected one of chat, docqa, noreuse"):
        w.build("chats", 100)


@pytest.mark.parametrize("argv, named", [(["--workload", "chat", "--docs", "3"], "--docs"),
                                         (["--workload", "noreuse", "--users", "2", "--rounds", "2"],
                                          "--users, --rounds")])
def test_bench_run_refuses_sizes_of_another_workload(argv, named, capsys):
    from kvplug.cli import main

    assert main(["bench", "run", *argv]) == 2  # before any model is built or server started
    out = " ".join(capsys.readouterr().out.split())
    assert f"{named} do(es) not size the" in out and "its sizes are" in out
