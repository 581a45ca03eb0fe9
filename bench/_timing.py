"""Shared by the CPU benchmarks: mean wall time of a call and the torch thread option."""

from __future__ import annotations

import argparse
import time

import torch


def timed(fn, repeats: int, warmup: int = 1) -> float:
    """Mean seconds of ``fn()`` over ``repeats`` calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def parser_with_threads(doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    return parser


def apply_threads(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)


def timed_interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Median seconds of each ``fns[name]()`` over ``repeats`` rounds, each round calling every function
    once in turn, so that a slow spell of a shared machine hits all of them alike."""
    import statistics

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
