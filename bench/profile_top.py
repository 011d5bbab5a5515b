"""``python -m bench.profile_top FILE [N]``: the functions a py-spy raw profile (collapsed
stacks, as ``bench.workload --py-spy`` writes) spent its samples in: the top N by own
time and by time including callees, as shares of all samples."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path


def top(path: Path, count: int) -> str:
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, samples = line.rpartition(" ")
        if not stack or not samples.isdigit():
            continue
        weight = int(samples)
        total += weight
        frames = stack.split(";")
        own[frames[-1]] += weight
        for frame in set(frames):
            inclusive[frame] += weight
    if not total:
        return f"{path}: no samples"
    lines = [f"{path}: {total} samples"]
    for title, counter in (("own", own), ("inclusive", inclusive)):
        lines.append(f"-- {title}")
        lines += [f"{n / total:6.1%}  {frame}" for frame, n in counter.most_common(count)]
    return "\n".join(lines)


if __name__ == "__main__":
    print(top(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 30))
