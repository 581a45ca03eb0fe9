"""A bounded loopback load test of `ard serve`: N concurrent clients for S seconds, then a second phase with a
share of malformed requests; the service is started here on 127.0.0.1 and stopped at the end.

Reports per phase: requests/s, p50/p99 latency of the answered (200) requests, the count of 5xx other than
503 (goal 0) and of 503s (the bounded queue's refusals: a client waits Retry-After, then sends its next
request), and each malformed kind's status codes (each must be a 4xx, or a 503 when the queue is full:
a malformed image that only decoding reveals, a truncated PNG, is checked behind the queue);
and the service's resident memory at start, after a warm-up, and after each phase (goal: growth under 10%
from the warm-up to the end).

Run (after `make run` and `ard index build`):
  PYTHONPATH=src .venv/bin/python bench/bench_serve_load.py --model models/export --index models/index --data data
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path

import httpx
import pandas as pd
import psutil
import yaml


def malformed_kinds(good: dict) -> dict[str, callable]:
    """name -> a function returning (files, data) of a malformed request built from a good one."""
    from PIL import Image

    img = good["image"]

    def png_of(im) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", (30000).to_bytes(4, "big") * 2 + bytes([8, 0, 0, 0, 0])) + chunk(b"IEND", b"")
    form = {k: good[k] for k in ("box", "prompt", "phrase")}
    return {
        "not an image": lambda: ({"image": ("x.png", b"GIF89a? no, plain text", "image/png")}, form),
        "truncated png": lambda: ({"image": ("x.png", img[: len(img) // 2], "image/png")}, form),
        "zero bytes": lambda: ({"image": ("x.png", b"", "image/png")}, form),
        "decompression bomb": lambda: ({"image": ("x.png", bomb, "image/png")}, form),
        "1x1 box outside": lambda: ({"image": ("x.png", png_of(Image.new("RGB", (1, 1))), "image/png")}, {**form, "box": "0,0,5,5"}),
        "box without area": lambda: ({"image": ("x.png", img, "image/png")}, {**form, "box": "10,10,10,20"}),
        "phrase not in prompt": lambda: ({"image": ("x.png", img, "image/png")}, {**form, "phrase": "V* dragon"}),
        "control character": lambda: ({"image": ("x.png", img, "image/png")}, {**form, "prompt": form["prompt"] + "\x1b[2J"}),
        "right-to-left": lambda: ({"image": ("x.png", img, "image/png")}, {**form, "prompt": form["prompt"] + " \u05e9\u05dc\u05d5\u05dd"}),
        "unknown candidates": lambda: ({"image": ("x.png", img, "image/png")}, {**form, "candidates": "nope-1,nope-2"}),
        "top_k too large": lambda: ({"image": ("x.png", img, "image/png")}, {**form, "top_k": "100000"}),
        "empty prompt": lambda: ({"image": ("x.png", img, "image/png")}, {**form, "prompt": ""}),
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_phase(url: str, goods: list[dict], bad: dict, clients: int, seconds: float, bad_share: float, seed: int) -> dict:
    deadline = time.perf_counter() + seconds
    records: list[tuple[str, int, float]] = []
    lock = threading.Lock()

    def client(k: int):
        rng = random.Random(seed * 100 + k)
        names = sorted(bad)
        with httpx.Client(base_url=url, timeout=120) as c:
            while time.perf_counter() < deadline:
                if rng.random() < bad_share:
                    kind = rng.choice(names)
                    files, data = bad[kind]()
                else:
                    kind = "valid"
                    g = rng.choice(goods)
                    files = {"image": ("q.png", g["image"], "image/png")}
                    data = {k: g[k] for k in ("box", "prompt", "phrase")}
                t = time.perf_counter()
                retry = 0.0
                try:
                    r = c.post("/attribute", files=files, data=data)
                    status = r.status_code
                    if status == 503:
                        retry = float(r.headers.get("Retry-After", "1"))
                except httpx.HTTPError:
                    status = -1  # no answer at all
                with lock:
                    records.append((kind, status, time.perf_counter() - t))
                if retry:  # a well-behaved client waits as told
                    time.sleep(max(0.0, min(retry, deadline - time.perf_counter())))

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = sorted(lat for kind, s, lat in records if s == 200)
    by_kind: dict[str, dict[str, int]] = {}
    for kind, s, _ in records:
        by_kind.setdefault(kind, {}).setdefault(str(s), 0)
        by_kind[kind][str(s)] += 1
    q = statistics.quantiles(ok, n=100) if len(ok) >= 2 else [float("nan")] * 99
    return {
        "requests": len(records), "seconds": round(wall, 1), "requests_per_s": round(len(records) / wall, 2),
        "answered_200": len(ok), "p50_ms": round(q[49] * 1e3, 1), "p99_ms": round(q[98] * 1e3, 1),
        "status_5xx": sum(1 for _, s, _ in records if s >= 500 and s != 503), "status_503": sum(1 for _, s, _ in records if s == 503),
        "no_answer": sum(1 for _, s, _ in records if s < 0),
        "malformed_not_4xx": sum(1 for kind, s, _ in records if kind != "valid" and not 400 <= s < 500 and s != 503),
        "malformed_503": sum(1 for kind, s, _ in records if kind != "valid" and s == 503),
        "by_kind": by_kind,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="export folder or models:/name@alias")
    ap.add_argument("--index", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=Path("data"), help="the pipeline's data: test queries are sent")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--malformed-share", type=float, default=0.2)
    ap.add_argument("--workers", type=int, default=1, help="serve.workers")
    ap.add_argument("--queue-size", type=int, default=8, help="serve.queue_size")
    ap.add_argument("--shortlist", type=int, default=50, help="serve.shortlist")
    ap.add_argument("--json", type=Path, default=Path("bench/out/serve_load.json"))
    args = ap.parse_args()

    tuples = pd.read_parquet(args.data / "tuples" / "tuples.parquet")
    test = tuples[tuples["split"] == "test"].sort_values("tuple_id").head(32)
    goods = [{"image": (args.data / q["query_image"]).read_bytes(), "box": ",".join(f"{v:g}" for v in q["query_box"]),
              "prompt": q["prompt"], "phrase": q["concept_phrase"]} for _, q in test.iterrows()]
    bad = malformed_kinds(goods[0])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    tmp = Path(tempfile.mkdtemp(prefix="ard-load-"))
    params = tmp / "params.yaml"
    params.write_text(yaml.safe_dump({"serve": {"workers": args.workers, "queue_size": args.queue_size, "shortlist": args.shortlist}}))
    env = {**os.environ, "ARD_SERVE_TOKEN": ""}
    model = args.model if str(args.model).startswith("models:/") else str(Path(args.model).absolute())
    cmd = [sys.executable, "-m", "ardetect.cli", "serve", "--model", model, "--index", str(args.index.absolute()), "--port", str(port),
           "--params", str(params)]
    log = open(tmp / "serve.log", "w")
    server = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the service did not start: {(tmp / 'serve.log').read_text()[-2000:]}")
            time.sleep(0.3)
        proc = psutil.Process(server.pid)
        rss = {"start": proc.memory_info().rss}
        model = httpx.get(url + "/model").json()
        for g in goods[:4]:  # warm-up
            httpx.post(url + "/attribute", files={"image": ("q.png", g["image"], "image/png")},
                       data={k: g[k] for k in ("box", "prompt", "phrase")}, timeout=120).raise_for_status()
        rss["after_warmup"] = proc.memory_info().rss
        print(f"service {url}: {model['source']} on {sorted(set(model['providers'].values()))}, index of {model['index_size']} images, "
              f"shortlist {model['shortlist']}, workers {args.workers}, queue {args.queue_size}; {args.clients} clients x {args.seconds:g} s a phase")
        valid = run_phase(url, goods, bad, args.clients, args.seconds, 0.0, 1)
        rss["after_valid"] = proc.memory_info().rss
        mixed = run_phase(url, goods, bad, args.clients, args.seconds, args.malformed_share, 2)
        rss["after_mixed"] = proc.memory_info().rss
        healthy = httpx.get(url + "/health").status_code
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    growth = (rss["after_mixed"] - rss["after_warmup"]) / rss["after_warmup"]
    print("\n| phase | requests | req/s | 200 | p50 ms | p99 ms | 5xx other than 503 | 503 | malformed: 4xx / 503 / other |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for name, p in (("valid only", valid), (f"{args.malformed_share:.0%} malformed", mixed)):
        bad_n = sum(n for kind, codes in p["by_kind"].items() if kind != "valid" for n in codes.values())
        print(f"| {name} | {p['requests']} | {p['requests_per_s']} | {p['answered_200']} | {p['p50_ms']} | {p['p99_ms']} | "
              f"{p['status_5xx']} | {p['status_503']} | {bad_n - p['malformed_503'] - p['malformed_not_4xx']} / {p['malformed_503']} / "
              f"{p['malformed_not_4xx']} |")
    mib = {k: round(v / 2**20, 1) for k, v in rss.items()}
    print(f"\nresident memory (MiB): {mib}; growth from warm-up to the end {growth:+.1%} (goal < 10%); /health after: {healthy}")
    print("malformed kinds -> status codes:", json.dumps({k: v for k, v in mixed["by_kind"].items() if k != "valid"}))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"valid": valid, "mixed": mixed, "rss_mib": mib, "rss_growth": growth, "health_after": healthy,
                                     "clients": args.clients, "seconds": args.seconds, "workers": args.workers,
                                     "queue_size": args.queue_size, "model": model}, indent=2) + "\n")


if __name__ == "__main__":
    main()
