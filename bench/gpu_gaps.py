"""Where a GPU waits: the idle gaps of a torch.profiler Chrome trace, charged to what the CPU was doing.

A layer's wall time minus the GPU's busy time is time the GPU had nothing queued: the CPU was copying
between pageable memory and the device, waiting on a synchronisation and then launching again, or running
Python. For every gap between the GPU's kernels and copies (at least ``--min_us``), the CPU thread that
launched the most operators is looked up at the gap's middle; its innermost operator there and its innermost
named range (``quark.*``, ``awq.*``, ``gptq.*``) get the gap's time.

    python bench/gpu_gaps.py trace.json            # bench_speed.py --profile writes <run>.trace.json on a GPU
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
from collections import defaultdict
from pathlib import Path

GPU_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
CPU_CATEGORIES = {"cpu_op", "user_annotation"}


def _busy_intervals(events: list[dict]) -> list[tuple[float, float]]:
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in events
                   if e.get("cat") in GPU_CATEGORIES and e.get("ph") == "X")
    merged: list[tuple[float, float]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def gap_summary(trace: dict, min_us: float = 20.0, top: int = 25) -> str:
    """A table of the GPU's idle time between its first and last activity, by CPU operator and named range."""
    events = [e for e in trace.get("traceEvents", []) if isinstance(e, dict)]
    busy = _busy_intervals(events)
    if not busy:
        return "no GPU activity in the trace\n"
    cpu = [e for e in events if e.get("cat") in CPU_CATEGORIES and e.get("ph") == "X"]
    counts: dict[object, int] = defaultdict(int)
    for e in cpu:
        counts[e.get("tid")] += 1
    main = max(counts, key=counts.get) if counts else None
    spans = sorted(((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0)), e.get("name", "?"),
                     e.get("cat") == "user_annotation") for e in cpu if e.get("tid") == main),
                   key=lambda s: (s[0], -s[1]))
    parent: list[int] = []
    stack: list[int] = []
    for k, (_, end, _, _) in enumerate(spans):  # one thread's ranges nest: each one's enclosing range
        while stack and spans[stack[-1]][1] < end:
            stack.pop()
        parent.append(stack[-1] if stack else -1)
        stack.append(k)
    starts = [s[0] for s in spans]

    def chain(t: float) -> list[int]:
        k = bisect.bisect_right(starts, t) - 1
        while k >= 0 and spans[k][1] < t:
            k = parent[k]
        out = []
        while k >= 0:
            out.append(k)
            k = parent[k]
        return out  # innermost first

    layer_spans = [k for k, sp in enumerate(spans) if sp[3] and sp[2] == "quark.layer"]
    ordinal = {k: i for i, k in enumerate(layer_spans)}  # the runner's decoder layers, in order
    by_op: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    steady: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    per_layer: dict[int, float] = defaultdict(float)
    total, n = 0.0, 0
    for (_, end), (start, _) in itertools.pairwise(busy):
        gap = start - end
        if gap < min_us:
            continue
        found = chain((start + end) / 2)
        inner = spans[found[0]][2] if found else "(no CPU range)"
        named = [spans[k][2] for k in found if spans[k][3] and spans[k][2].startswith(("awq.", "gptq.", "quark."))]
        key = (inner, named[0] if named else "-")
        by_op[key][0] += gap
        by_op[key][1] += 1
        layer = next((ordinal[k] for k in reversed(found) if k in ordinal), None)
        if layer is not None:
            per_layer[layer] += gap
            if layer > 0:
                steady[key][0] += gap
                steady[key][1] += 1
        total += gap
        n += 1
    window = busy[-1][1] - busy[0][0]
    lines = [f"GPU window {window / 1e6:.3f} s, busy {sum(b - a for a, b in busy) / 1e6:.3f} s, "
             f"{n} gaps >= {min_us:g} us: {total / 1e6:.3f} s"]
    if per_layer:
        lines.append("idle seconds per decoder layer (quark.layer ranges, in order): "
                     + ", ".join(f"{per_layer[i] / 1e6:.3f}" for i in range(len(layer_spans))))
    lines += _table(by_op, top)
    if steady:
        lines += ["", "the decoder layers after the first:", *_table(steady, top)]
    return "\n".join(lines) + "\n"


def _table(rows: dict[tuple[str, str], list[float]], top: int) -> list[str]:
    lines = [f"{'innermost CPU op during the gap':<48} {'named range':<28} {'gaps':>6} {'seconds':>9}"]
    for (inner, named), (seconds, count) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"{inner[:48]:<48} {named[:28]:<28} {int(count):>6} {seconds / 1e6:>9.4f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path, help="a Chrome trace written by torch.profiler (export_chrome_trace)")
    parser.add_argument("--min_us", type=float, default=20.0, help="shortest gap counted (microseconds)")
    parser.add_argument("--top", type=int, default=25, help="rows shown")
    args = parser.parse_args(argv)
    print(gap_summary(json.loads(args.trace.read_text()), args.min_us, args.top), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
