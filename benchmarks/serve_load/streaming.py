"""Two more workloads for the serve load test (run.py imports them).

``openai_level``: clients speak the OpenAI API, streamed (``POST /v1/chat/completions``, ``stream: true``), each
a stream of patients playing held-out conversations (the client keeps the conversation: the messages so far
and the replies it got). Measured: time to first token (the first chunk with text) and to the last, p50/p95.

``burst``: N clients each send one message at the same moment (every tenth an emergency). Checked: every
request accepted is answered (200), a refusal (503) happens only when the server's expected wait passed its
request timeout (the 503 body says both), and no emergency is refused.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter

import httpx

from lora_med.data import percentile

EMERGENCIES = [
    "mi papá se desmayó y no despierta",
    "me duele mucho el pecho y me cuesta respirar",
    "mi hijo se trago lavandina",
    "mi esposa no puede respirar",
]


def _pcts(values: list[float], prefix: str) -> dict:
    return {f"{prefix}{q}_ms": round(percentile(values, q), 1) if values else None for q in (50, 95)}


async def openai_level(url: str, model: str, clients: int, max_requests: int, max_s: float, convs, tag: str) -> dict:
    results: list[dict] = []
    sent = 0
    deadline = time.perf_counter() + max_s

    async def one(client: httpx.AsyncClient, messages: list[dict], user: str) -> str | None:
        t = time.perf_counter()
        first, text, status = None, [], None
        try:
            body = {"model": model, "messages": messages, "stream": True, "user": user}
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                status = str(r.status_code)
                if r.status_code == 200:
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        piece = (chunk.get("choices") or [{}])[0].get("delta", {}).get("content")
                        if piece:
                            first = first or time.perf_counter()
                            text.append(piece)
                else:
                    await r.aread()
        except httpx.HTTPError as e:
            status = type(e).__name__
        end = time.perf_counter()
        results.append(
            {
                "kind": status,
                "ttft_ms": 1000 * ((first or end) - t),
                "ms": 1000 * (end - t),
                "chars": len("".join(text)),
            }
        )
        return "".join(text) if status == "200" else None

    async def client_loop(i: int, client: httpx.AsyncClient) -> None:
        nonlocal sent
        for n in itertools.count():
            user = f"+591{tag}{i:03d}{n:05d}"
            messages: list[dict] = []
            for text in convs[(i + n) % len(convs)]:
                if sent >= max_requests or time.perf_counter() >= deadline:
                    return
                sent += 1
                messages.append({"role": "user", "content": text})
                reply = await one(client, messages, user)
                if reply is None:
                    break
                messages.append({"role": "assistant", "content": reply})

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(120.0)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if r["kind"] == "200"]
    return {
        "clients": clients,
        "requests": len(results),
        "answered_200": len(ok),
        "duration_s": round(wall, 2),
        "throughput_rps": round(len(ok) / wall, 2) if wall else 0.0,
        **_pcts([r["ttft_ms"] for r in ok], "ttft_p"),
        **_pcts([r["ms"] for r in ok], "p"),
        "p99_ms": round(percentile([r["ms"] for r in ok], 99), 1) if ok else None,
        "max_ms": round(max(r["ms"] for r in ok), 1) if ok else None,
        "errors": dict(Counter(r["kind"] for r in results if r["kind"] != "200")),
        "mean_batch": None,
    }


async def burst(url: str, n: int, convs) -> dict:
    """``n`` clients, one /chat/ message each, all at once; every tenth an emergency."""
    first_turns = [c[0] for c in convs]

    async def send(client: httpx.AsyncClient, i: int) -> dict:
        urgent = i % 10 == 9
        text = EMERGENCIES[i % len(EMERGENCIES)] if urgent else first_turns[i % len(first_turns)]
        t = time.perf_counter()
        try:
            r = await client.post("/chat/", json={"user_id": f"+5919{i:08d}", "message": text})
            body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
            return {"urgent": urgent, "kind": str(r.status_code), "ms": 1000 * (time.perf_counter() - t), "body": body}
        except httpx.HTTPError as e:
            return {"urgent": urgent, "kind": type(e).__name__, "ms": 1000 * (time.perf_counter() - t), "body": {}}

    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=httpx.Timeout(120.0)) as client:
        t0 = time.perf_counter()
        out = await asyncio.gather(*(send(client, i) for i in range(n)))
        wall = time.perf_counter() - t0
    refused = [r for r in out if r["kind"] == "503"]
    accepted = [r for r in out if r["kind"] != "503"]
    past = [
        r for r in refused if r["body"].get("expected_wait_s", 0) > r["body"].get("request_timeout_s", float("inf"))
    ]
    lat = [r["ms"] for r in out if r["kind"] == "200"]
    return {
        "clients": n,
        "emergencies": sum(r["urgent"] for r in out),
        "emergencies_refused": sum(r["urgent"] and r["kind"] != "200" for r in out),
        "accepted": len(accepted),
        "accepted_answered_200": sum(r["kind"] == "200" for r in accepted),
        "refused_503": len(refused),
        "refused_past_the_bound": len(past),
        "refused_expected_wait_s": sorted(r["body"].get("expected_wait_s") for r in refused)[:3],
        "outcomes": dict(Counter(r["kind"] for r in out)),
        "duration_s": round(wall, 2),
        "p50_ms": round(percentile(lat, 50), 1) if lat else None,
        "p95_ms": round(percentile(lat, 95), 1) if lat else None,
        "max_ms": round(max(lat), 1) if lat else None,
        "ok": len(past) == len(refused)
        and all(r["kind"] == "200" for r in accepted)
        and not any(r["urgent"] and r["kind"] != "200" for r in out),
    }
