#!/usr/bin/env python3
"""Load test for `afinar serve`: N concurrent clients send chat completions over loopback for a
fixed time; prints requests served, errors, p50/p99 latency, time to first token and aggregate
completion tokens/s. Any OpenAI-compatible server takes the same load (`--model` names what it
serves), so llama.cpp's server can be measured beside afinar's.

    afinar serve --port 8080 &
    python3 bench/serve_load.py --url http://127.0.0.1:8080 --clients 8 --seconds 60

Standard library only. Each client sends a short streamed chat request (greedy, max_tokens 32, a
prompt chosen per request from a small set), times its first content chunk, and counts
`usage.completion_tokens` from the final usage chunk (`stream_options.include_usage`).
"""
import argparse
import http.client
import json
import statistics
import threading
import time
import urllib.parse

MODEL = "smollm2"

PROMPTS = [
    "Name three colours.",
    "What is the capital of Spain?",
    "Write a short sentence about rain.",
    "Give me a word that rhymes with cat.",
]


def client(url, model, deadline, max_tokens, out, idx):
    u = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)
    i = idx
    while time.time() < deadline:
        body = json.dumps({"model": model, "temperature": 0, "max_tokens": max_tokens,
                           "stream": True, "stream_options": {"include_usage": True},
                           "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]})
        i += 1
        t0 = time.perf_counter()
        try:
            conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            if r.status != 200:
                r.read()
                out["errors"].append(r.status)
                continue
            first, tokens = None, None
            for line in r:
                line = line.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for c in chunk.get("choices") or []:
                    if first is None and (c.get("delta") or {}).get("content"):
                        first = time.perf_counter() - t0
            dt = time.perf_counter() - t0
            if tokens is None:
                out["errors"].append("no usage chunk")
                continue
            out["latencies"].append(dt)
            out["ttft"].append(first if first is not None else dt)
            out["tokens"].append(tokens)
        except Exception as e:  # noqa: BLE001 — every failure is counted, none hidden
            out["errors"].append(repr(e))
            conn = http.client.HTTPConnection(u.hostname, u.port, timeout=600)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--model", default=MODEL, help="the served model's id")
    a = ap.parse_args()
    out = {"latencies": [], "ttft": [], "tokens": [], "errors": []}
    start = time.time()
    deadline = start + a.seconds
    threads = [threading.Thread(target=client, args=(a.url, a.model, deadline, a.max_tokens, out, k))
               for k in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.time() - start
    lat = sorted(out["latencies"])
    q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] if lat else float("nan")
    res = {
        "clients": a.clients, "seconds": round(wall, 1), "requests": len(lat),
        "errors": len(out["errors"]), "error_samples": out["errors"][:5],
        "p50_s": round(q(0.50), 3), "p99_s": round(q(0.99), 3),
        "mean_s": round(statistics.mean(lat), 3) if lat else None,
        "ttft_p50_s": round(statistics.median(out["ttft"]), 3) if lat else None,
        "completion_tokens": sum(out["tokens"]),
        "tokens_per_s": round(sum(out["tokens"]) / wall, 1),
    }
    print("RESULT " + json.dumps(res))


if __name__ == "__main__":
    main()
