"""Load test of `leap-dspy serve`: concurrent clients, latency percentiles, refusals, and silent clients.

    python bench/serve_load.py [--model smollm2-135m] [--clients 4 16 64] [--requests 4] [--max-workers 32]

Starts the server in this process (127.0.0.1, an API key), then for each client count runs that many clients at
once, each sending `--requests` chat completions (16 new tokens) one after another, while `--silent` extra
connections are opened and never send a request. Prints a table: clients, requests, ok, 429 (pool full), other
failures, p50 / p99 latency, requests/s. Below the pool size no request may fail; above it the excess gets 429.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import threading
import time
import urllib.error
import urllib.request


def ask(url: str, key: str, model: str) -> tuple[int, float]:
    body = json.dumps({"model": model, "max_tokens": 16, "messages": [{"role": "user", "content": "Say hi."}]})
    request = urllib.request.Request(url + "/v1/chat/completions", data=body.encode(), method="POST",
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError:
        status = -1
    return status, time.perf_counter() - started


def wave(url: str, key: str, model: str, clients: int, requests: int, silent: int) -> dict[str, float]:
    results: list[tuple[int, float]] = []
    lock = threading.Lock()
    host, port = url.removeprefix("http://").split(":")
    idle = [socket.create_connection((host, int(port))) for _ in range(silent)]  # they never send a request

    def client() -> None:
        for _ in range(requests):
            outcome = ask(url, key, model)
            with lock:
                results.append(outcome)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    for s in idle:
        s.close()
    ok = sorted(latency for status, latency in results if status == 200)
    return {"clients": clients, "requests": len(results), "ok": len(ok),
            "busy": sum(status == 429 for status, _ in results),
            "failed": sum(status not in (200, 429) for status, _ in results),
            "p50": statistics.median(ok) if ok else float("nan"),
            "p99": ok[min(len(ok) - 1, int(0.99 * len(ok)))] if ok else float("nan"),
            "rps": len(ok) / wall}


def main() -> None:
    from leap_dspy.serve import make_server

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--clients", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--requests", type=int, default=4)
    ap.add_argument("--max-workers", type=int, default=32)
    ap.add_argument("--silent", type=int, default=2, help="connections opened that never send a request")
    ap.add_argument("--timeout", type=float, default=5.0, help="the server's socket timeout")
    args = ap.parse_args()
    key = "bench-key"
    server, url = make_server(args.model, api_key=key, max_workers=args.max_workers, timeout_s=args.timeout,
                              max_new_tokens=16)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    print(f"serving {server.served_name} at {url}, pool {args.max_workers}, socket timeout {args.timeout} s, "
          f"{args.silent} silent connections per wave")
    print("| clients | requests | ok | 429 | other failures | p50 (s) | p99 (s) | requests/s |")
    print("|---|---|---|---|---|---|---|---|")
    for clients in args.clients:
        r = wave(url, key, server.served_name, clients, args.requests, args.silent)
        print(f"| {r['clients']} | {r['requests']} | {r['ok']} | {r['busy']} | {r['failed']} | {r['p50']:.2f} | "
              f"{r['p99']:.2f} | {r['rps']:.2f} |", flush=True)
    server.shutdown()
    server.server_close()


if __name__ == "__main__":
    main()
