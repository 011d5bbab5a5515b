"""``python -m bench.inference_path``: what the inference worker's own bookkeeping costs
a request, without HTTP and without the model.

Each round submits 32 single-row requests to an ``InferenceWorker`` of the demo model
(no tenant, as without keys: one lane), takes them as one batch the way the worker's
loop does, and answers them; no thread, no model run. Prints the best of seven
rounds of 500 in µs a request: deterministic enough to compare checkouts
(``--code DIR`` runs another one's worker, a ``git worktree`` of an earlier commit).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.processes import REPO_ROOT

DEMO = REPO_ROOT / "models" / "demo" / "1" / "model.onnx"
BATCH = 32


async def _measure() -> float:
    import onnxruntime as ort

    from mlgate.workers.inference.batching import InferenceWorker

    session = ort.InferenceSession(str(DEMO), providers=["CPUExecutionProvider"])
    worker = InferenceWorker(session, input_names=["input"], output_names=["probabilities"], model="demo")
    # Taking work, with no task of its own taking it: the rounds below do.
    worker._task = asyncio.get_running_loop().create_future()
    row = np.zeros((1, 128), np.float32)
    deadline = time.monotonic() + 3600

    async def round_trip() -> None:
        for _ in range(BATCH):
            worker.submit(row, deadline)
        batch = await worker._take_batch()
        worker._forming = []
        for item in batch:
            item.future.set_result(None)
            worker._settled(item)

    for _ in range(200):
        await round_trip()
    best = float("inf")
    for _ in range(7):
        started = time.perf_counter()
        for _ in range(500):
            await round_trip()
        best = min(best, (time.perf_counter() - started) / 500 / BATCH)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--code", type=Path, default=None, help="the checkout whose worker runs")
    parser.add_argument("--no-pin", action="store_true", help="do not pin to core 1")
    args = parser.parse_args()
    if args.code is not None:
        # This file run by the other checkout's Python path: its ``mlgate`` imported.
        command = [sys.executable, str(Path(__file__).resolve())]
        if not args.no_pin:
            command = ["taskset", "-c", "1", *command, "--no-pin"]
        env = {**os.environ, "PYTHONPATH": str(args.code)}
        subprocess.run(command, env=env, cwd=args.code, check=True)
        return
    if not args.no_pin:
        os.sched_setaffinity(0, {1})
    print_measure()


def print_measure() -> None:
    print(f"{asyncio.run(_measure()):.2f} µs a request (best of 7 rounds of 500)")


if __name__ == "__main__":
    main()
