"""A checkpoint over 2 GB built in FP16: external data at every stage, peak RAM against the pre-flight estimate.

Writes a BF16 Mistral-3 checkpoint of about 1.2B parameters (a 26-layer, 2048-wide decoder with
grouped-query attention, the preset's small vision tower and tokenizer; HF's default init: the
benchmark is about size, not answers) in 1 GB shards, then runs the build as a user does::

    python -m builder build --checkpoint DIR --set components.*.precision=fp16 ...

in a child process, so its peak resident memory is the build's own. The LLM graph is written in
FP16 straight from the BF16 weights (over protobuf's 2 GB limit: ``model.onnx`` + ``model.onnx.data``)
and checked against PyTorch in FP16. ``--serve`` then starts tritonserver on the repository and
times its load and a first answer.

    python benchmarks/big_checkpoint.py            # about 10-15 minutes on 2 cores, 12 GB of RAM
    python benchmarks/big_checkpoint.py --layers 4 # a quick run under 2 GB (no external data)

Writes big_checkpoint.csv into benchmarks/results/big_checkpoint/ (or --output) and prints a table.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import Mistral3ForConditionalGeneration

from builder.bench.report import machine
from builder.onnx_files import data_files
from builder.source.headers import tensor_bytes
from builder.source.tiny import tiny_config, write_tokenizer_and_processor

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "big_checkpoint"


def write_checkpoint(directory: Path, layers: int) -> Path:
    config = tiny_config()
    del config.audio_config  # vision + text, as published Mistral-3 checkpoints are
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.num_hidden_layers = 2048, 5632, layers
    text.num_attention_heads, text.num_key_value_heads, text.head_dim = 16, 4, 128
    torch.manual_seed(0)
    model = Mistral3ForConditionalGeneration(config).eval()
    model.to(torch.bfloat16).save_pretrained(directory, max_shard_size="1GB")
    write_tokenizer_and_processor(directory, config)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=26, help="decoder layers (26: about 1.2B parameters, 2.4 GB in FP16)")
    parser.add_argument("--serve", action="store_true", help="also serve the repository and time a first answer")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="big-checkpoint.") as tmp:
        work = Path(tmp)
        started = time.perf_counter()
        checkpoint = write_checkpoint(work / "checkpoint", args.layers)
        written = time.perf_counter() - started
        shards = sorted(checkpoint.glob("*.safetensors"))
        parameters = sum(tensor_bytes(s)[0] for s in shards)
        stored = sum(s.stat().st_size for s in shards)
        repository = work / "repo"
        command = [sys.executable, "-m", "builder", "build", "--checkpoint", str(checkpoint), "--output", str(repository),
                   "--cache", str(work / "cache"), "--quiet", "--set", "components.vision.precision=fp16",
                   "--set", "components.llm.precision=fp16", "--set", "export.parity_samples=1"]
        started = time.perf_counter()
        build = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if build.returncode != 0:
            sys.exit(f"build failed:\n{build.stdout}\n{build.stderr}")
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # the build: the largest child
        estimate = float(re.search(r"pre-flight estimate ([\d.]+) GB", build.stdout + build.stderr).group(1)) * 1e9
        llm = repository / "llm" / "1" / "model.onnx"
        external = data_files(llm)
        graph_bytes = sum(f.stat().st_size for f in [llm, *external])
        parity = json.loads((repository / "manifest.json").read_text())["components"]["llm"]["parity"]
        row = {
            "parameters_m": round(parameters / 1e6), "checkpoint_gb": round(stored / 1e9, 2), "shards": len(shards),
            "llm_graph_gb": round(graph_bytes / 1e9, 2), "external_data": bool(external),
            "build_s": round(seconds, 1), "peak_ram_gb": round(peak / 1e9, 2), "preflight_ram_gb": round(estimate / 1e9, 2),
            "llm_parity_cos": round(parity["min_cosine"], 6), "checkpoint_write_s": round(written, 1),
        }
        write_results(row, args.output)  # the build's figures stand even if serving fails
        if args.serve:
            row.update(serve(repository, work))
            write_results(row, args.output)
    print(f"machine: {machine()}")
    print("| " + " | ".join(row) + " |")
    print("|" + "---|" * len(row))
    print("| " + " | ".join(str(v) for v in row.values()) + " |")
    print(f"peak RAM {row['peak_ram_gb']} GB vs pre-flight estimate {row['preflight_ram_gb']} GB "
          f"({row['peak_ram_gb'] / row['preflight_ram_gb']:.0%} of it); results in {args.output}")


def write_results(row: dict, output: Path) -> None:
    output.mkdir(parents=True, exist_ok=True)
    with (output / "big_checkpoint.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)


def serve(repository: Path, work: Path) -> dict[str, float]:
    import tritonclient.grpc as grpcclient

    from builder.serve.client import Request, ask
    from builder.serve.tritonserver import TritonServer

    started = time.perf_counter()
    with TritonServer(repository, log_path=work / "tritonserver.log") as server:
        loaded = time.perf_counter() - started
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            started = time.perf_counter()
            answer = ask(client, Request("Describe a sunny day.", max_tokens=8))
            first = time.perf_counter() - started
    assert len(answer.token_ids) == 8, answer
    return {"server_load_s": round(loaded, 1), "first_answer_8_tokens_s": round(first, 2)}


if __name__ == "__main__":
    main()
