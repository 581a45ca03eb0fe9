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
