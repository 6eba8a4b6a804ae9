"""Drive an OpenAI-compatible server with a workload, streaming, at a fixed concurrency.

Each request is a streamed /v1/completions call with a token-id prompt,
greedy, ``ignore_eos`` (every configuration generates the same number of
tokens). Per request: TTFT (send to first streamed token), every inter-token
gap (between consecutive streamed chunks: one token each, as vLLM streams by
default), TPOT ((last token - first token) / (tokens - 1)), end-to-end time, and
vLLM's usage (prompt tokens, cached tokens: vLLM's prefix cache plus any
connector's hit). A request whose ``after`` has not finished waits for it
(and its think time) before it takes one of the ``concurrency`` slots.

A stuck server never hangs the bench: a request without its whole answer
within ``request_timeout_s`` of being sent fails (said in its ``error``),
and the run stops at ``deadline_s``: every request not finished by then is a
result whose error says so.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Callable

from kvplug.bench.workloads import Request


async def _one(client, url: str, model: str, req: Request, timeout_s: float) -> dict:
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    out = {"id": req.id, "session": req.session, "turn": req.turn, "prompt_tokens_sent": len(req.prompt)}
    times: list[float] = []
    usage = None
    t0 = time.perf_counter()
    out["start_s"] = t0
    try:
        async with asyncio.timeout(timeout_s), client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                out["error"] = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:500]}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                    times.append(time.perf_counter())
                if chunk.get("usage"):
                    usage = chunk["usage"]
    except TimeoutError:
        out["error"] = f"request timeout: no complete answer within {timeout_s:g} s"
        return out
    except Exception as e:  # noqa: BLE001 - a failed request is a result
        out["error"] = f"{type(e).__name__}: {e}"
        return out
    end = time.perf_counter()
    if not times:
        out["error"] = "no token streamed"
        return out
    tokens = (usage or {}).get("completion_tokens") or len(times)
    details = (usage or {}).get("prompt_tokens_details") or {}
    out.update(ttft_s=times[0] - t0, e2e_s=end - t0,
               tpot_s=(times[-1] - times[0]) / (tokens - 1) if tokens > 1 else 0.0,
               itl_gaps_s=[round(b - a, 6) for a, b in zip(times, times[1:])],
               output_tokens=tokens, prompt_tokens=(usage or {}).get("prompt_tokens"),
               cached_tokens=details.get("cached_tokens"))
    return out


async def _drive(url: str, model: str, requests: list[Request], concurrency: int,
                 on_done: Callable[[dict], None], request_timeout_s: float, deadline_s: float) -> list[dict]:
    import httpx

    slots = asyncio.Semaphore(concurrency)
    finished = {r.id: asyncio.Event() for r in requests}
    results: list[dict] = []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(request_timeout_s, connect=30), limits=limits) as client:
        async def run(req: Request):
            if req.after is not None:
                await finished[req.after].wait()
                if req.think_s:
                    await asyncio.sleep(req.think_s)
            async with slots:
                res = await _one(client, url, model, req, request_timeout_s)
            results.append(res)
            finished[req.id].set()
            on_done(res)

        tasks = [asyncio.create_task(run(r)) for r in requests]
        _, late = await asyncio.wait(tasks, timeout=deadline_s)
        for t in late:
            t.cancel()
        await asyncio.gather(*late, return_exceptions=True)
    done = {r["id"] for r in results}
    for req in requests:
        if req.id not in done:
            results.append({"id": req.id, "session": req.session, "turn": req.turn, "start_s": None,
                            "prompt_tokens_sent": len(req.prompt),
                            "error": f"run deadline: not finished within the run's {deadline_s:g} s"})
    return results


def drive(url: str, model: str, requests: list[Request], concurrency: int,
          on_done: Callable[[dict], None] = lambda r: None, request_timeout_s: float = 600,
          deadline_s: float = 3600) -> tuple[list[dict], float]:
    """(per-request results in completion order, those the deadline cut off last; wall seconds)."""
    t0 = time.perf_counter()
    results = asyncio.run(_drive(url, model, requests, concurrency, on_done, request_timeout_s, deadline_s))
    wall = time.perf_counter() - t0
    for r in results:
        if r["start_s"] is not None:
            r["start_s"] -= t0
    return results, wall
