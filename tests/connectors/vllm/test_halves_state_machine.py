"""The connector's scheduler half and worker half(s), driven by a hypothesis state machine
through vLLM's call orders, against a model of what the paged KV cache and the store must hold.

The model plays vLLM (its scheduler as of 0.32, ``vllm/v1/core/sched/scheduler.py``, and its
KV connector mixin, ``vllm/v1/worker/kv_connector_model_runner_mixin.py``) around the two
halves of test_halves.py's ``Engine`` (one worker per tensor-parallel rank):

- requests: prompts over a 4-token alphabet built on two shared stems (block size T=16), or
  follow-ups of earlier requests (their identity, a prefix of their tokens, more), with an
  identity (base model, LoRA adapter A or B whose directory holds a file this test writes and
  rewrites in place, cache salt "x" / "y" / none), some with prompt embeddings (never stored
  nor loaded); ids of released requests are reused;
- a step is scheduled (lookup, allocation with the matched count, fewer, 0 or none at all,
  vLLM prefix-cache sharing of another request's blocks, preemptions of the last running
  request to make room, the blocks freed last reused first), then built
  (``build_connector_meta``), then run on every rank, in lock-step layer by layer: the V1 mixin
  order (start_load, per-layer wait / save, wait_for_save, then get_finished, load errors,
  worker metadata), the speculative-decoding order (results before wait_for_save), a
  full-graph replay (no per-layer hook) or a step without tokens; then vLLM's update: load
  errors truncate the requests that hold a failed block (vLLM's own algorithm), finished
  requests are finished, then ``update_connector_output``, then finished_sending frees blocks;
- aborts between scheduling and building (a planned load), between building and running (a load
  or save sent), mid-save (saves not yet reported), request id reuse, preemption (also all
  running requests by reset_prefix_cache), reset_cache (a new generation of "weights": KV
  computed before is wrong after), LoRA files rewritten in place, injected decode failures of
  chosen blocks on chosen ranks, saves that complete steps after their wait_for_save (the
  worker's async_cpu_saves, CUDA's behaviour, with saves written only when the test lets them).

The fake forward pass writes, at each computed position, layer and rank, a value that is a
function of (identity, generation, token prefix, layer, rank), unless the context it attends to
(every earlier position of the request, read from the paged cache at that layer, on every rank)
is not what it should be: then it writes a "tainted" value, as a model computing over a wrong
KV would. Invariants:

- a load lands the KV of the loading request's identity, generation and prefix by the time the
  layer is waited for, or the block is reported in that step's load errors (exactly the failed
  blocks, on the rank that failed);
- every computed position of a running request holds its value, except blocks vLLM was told
  failed and has not recomputed yet;
- every block visible in the store holds, in every rank's shard, the KV of the tokens and
  identity its key was chained from (never tainted KV, never another identity's);
- the worker releases only finished requests none of whose saves is being written, reports
  every job once per rank, saves only after they are written; the scheduler sends one load per
  request vLLM counts external tokens for, exactly into the blocks vLLM allocated;
- when every request is finished and released: no job, no pin, no slot being stored or leaked,
  no request state; finished requests are released within a few steps without tokens.

Shrinking a failure takes minutes: it is off unless KVPLUG_SM_SHRINK=1.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

from hypothesis import HealthCheck, Phase, settings
from hypothesis.stateful import RuleBasedStateMachine

from kvplug.keys import block_key, tokens_array
from halves_checks import Invariants
from halves_requests import RequestRules
from halves_steps import StepRules
from halves_world import GARBAGE
from test_halves import NAMES, Engine


class HalvesMachine(RequestRules, StepRules, Invariants, RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.e = None
        self.built = None


TestHalvesStateMachine = HalvesMachine.TestCase
# Shrinking a failure takes minutes (hypothesis stops after five): opt in with KVPLUG_SM_SHRINK=1.
# Unshrunk, a failure still says what went wrong, and the database replays it on the next run.
TestHalvesStateMachine.settings = settings(
    max_examples=50, stateful_step_count=50, deadline=None,
    phases=list(Phase) if os.environ.get("KVPLUG_SM_SHRINK") else [Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


# -- what the machine found, as plain cases ------------------------------------------------------


def test_a_request_preempted_by_reset_prefix_cache_is_loaded_when_scheduled_again(tmp_path):
    """vLLM's reset_prefix_cache(reset_running_requests=True) preempts every running request outside
    schedule(), so the next schedule() may schedule one again, with a kvplug hit, in the step whose
    preempted_req_ids names it: vLLM counts the hit as loaded in that step."""
    e = Engine(tmp_path)
    try:
        a = e.request("a", list(range(100, 148)))  # 3 full blocks
        e.schedule(a)
        e.step({a: 48})
        a.num_computed_tokens = 0                   # preempted: its blocks freed
        e.blocks["a"] = [20, 21, 22]
        n, _ = e.sched.get_num_new_matched_tokens(a, 0)
        assert n == 47
        e.sched.update_state_after_alloc(a, SimpleNamespace(get_block_ids=lambda: ([20, 21, 22],)), n)
        meta = e.sched.build_connector_meta(SimpleNamespace(
            num_scheduled_tokens={"a": 1}, total_num_scheduled_tokens=1, kv_connector_block_state=None,
            preempted_req_ids={"a"}))
        assert [(job.req_id, job.block_ids) for job in meta.loads] == [("a", [20, 21, 22])]
    finally:
        e.close()


def test_a_request_finished_with_its_load_planned_stores_nothing_it_did_not_load(tmp_path):
    """request_finished after update_state_after_alloc and before build_connector_meta (a load
    planned, not sent) drops the load: the tokens vLLM counted as loaded are in no block."""
    e = Engine(tmp_path)
    try:
        tokens = list(range(100, 140))
        a = e.request("a", tokens)
        e.schedule(a)
        e.step({a: 40})
        b = e.request("b", tokens[:10] + [7] * 10)  # shares 10 tokens of a's block 0
        for name in NAMES:
            e.kv[name][e.blocks["b"]] = GARBAGE       # what b's fresh blocks hold: not its KV
        assert e.schedule(b) == 10
        key = block_key(e.sched._reqs["b"].root, tokens_array(tokens[:10]))
        e.sched.request_finished(b, e.blocks["b"])
        e.step({})
        block = e.sched.store._resident.get(key)
        assert block is None or not block.visible, "b's block 0, never loaded, is stored as its first 10 tokens"
    finally:
        e.close()
