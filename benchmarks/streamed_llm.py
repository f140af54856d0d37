"""Peak memory, time and disk of writing a checkpoint's LLM graph with the streamed writer, per precision.

Each precision runs in its own child process (its peak resident memory is the writer's alone), against the
checkpoint's BF16 bytes: the targets are at most 0.6x of them for INT4 and 0.85x for INT8::

    python benchmarks/write_large_checkpoint.py /tmp/ckpt --hidden 2048 --layers 22 --vocab 32768
    python benchmarks/streamed_llm.py /tmp/ckpt --precisions int4 int8 fp16

Writes streamed_llm.csv into benchmarks/results/streamed_llm/ (or --output) and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "streamed_llm"


def child(checkpoint: Path, output: Path, precision: str, max_context: int) -> None:
    """Runs in the child process: writes the graph, prints one JSON line with its own peak RSS."""
    from builder.export.streamed.writer import write_streamed_llm
    from builder.quantize.weight_only import NbitsWeights
    from builder.spec import LimitsSpec

    limits = LimitsSpec(max_context=max_context)
    if precision in ("int8", "int4"):  # the ONNX Runtime targets' first rung: MatMulNBits, block 32, int8 compute
        written = write_streamed_llm(checkpoint, output, limits=limits, weights=NbitsWeights(int(precision[3:]), 32))
    else:
        written = write_streamed_llm(checkpoint, output, "float16" if precision == "fp16" else "float32", limits=limits)
    print(json.dumps({"seconds": written.seconds, "data_bytes": written.data_bytes,
                      "graph_bytes": written.path.stat().st_size,
                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def measure(checkpoint: Path, precision: str, work: Path, max_context: int) -> dict[str, object]:
    checkpoint_bytes = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors"))
    output = work / precision
    started = time.perf_counter()
    run = subprocess.run([sys.executable, __file__, str(checkpoint), "--child", precision, "--into", str(output),
                          "--max-context", str(max_context)], cwd=ROOT, capture_output=True, text=True, check=False,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})  # this checkout's builder, not an installed one
    if run.returncode != 0:
        sys.exit(f"{precision}: the writer failed:\n{run.stderr[-3000:]}")
    found = json.loads(run.stdout.strip().splitlines()[-1])
    return {
        "precision": precision, "checkpoint_gb": round(checkpoint_bytes / 1e9, 2),
        "peak_rss_gb": round(found["peak_rss"] / 1e9, 2), "peak_over_checkpoint": round(found["peak_rss"] / checkpoint_bytes, 3),
        "write_s": round(found["seconds"], 1), "process_s": round(time.perf_counter() - started, 1),
        "graph_gb": round((found["data_bytes"] + found["graph_bytes"]) / 1e9, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--precisions", nargs="+", default=["int4", "int8", "fp16"])
    parser.add_argument("--max-context", type=int, default=4096)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--keep", type=Path, help="write the graphs here (default: a temporary directory)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--into", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.checkpoint, args.into, args.child, args.max_context)
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="streamed-llm.", dir=args.keep) as tmp:
        for precision in args.precisions:
            rows.append(measure(args.checkpoint, precision, Path(tmp), args.max_context))
            print(rows[-1], flush=True)
            for leftover in (Path(tmp) / precision).glob("*"):  # disk: one graph at a time
                leftover.unlink()
    args.output.mkdir(parents=True, exist_ok=True)
    with (args.output / "streamed_llm.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
