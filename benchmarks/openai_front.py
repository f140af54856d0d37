"""What the OpenAI-compatible front adds to a request's latency, measured side by side with direct gRPC.

Serves a built repository, starts the front as users do (``python -m builder openai``) in front of it, and sends
the same requests both ways at each concurrency: straight to ``ensemble`` with tritonclient's gRPC client, and to
``POST /v1/chat/completions`` with the official ``openai`` client (the image as a ``data:`` URL). Each round runs
every request of a path at the concurrency; paths alternate for --rounds rounds, so both see the same machine load.
Both paths must return the same text. The front's target (issue 28): at most 10% on the median latency.

    python benchmarks/openai_front.py                     # model_repository/, concurrency 1 and 8, 3 rounds

Writes openai_front.csv (every request's latency) into benchmarks/results/openai_front/ (or --output) and prints
the medians and their ratio per concurrency.
"""

from __future__ import annotations

import argparse
import base64
import csv
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import openai
import tritonclient.grpc as grpcclient

from builder.bench.report import machine
from builder.serve.client import Request, ask
from builder.serve.openai import served_model_name
from builder.serve.tritonserver import TritonServer

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 16
PROMPTS = ["Describe the picture in a few words.", "What colours do you see?", "Tell me a short story about it.",
           "Is there anything round in it?"]


@dataclass(frozen=True)
class Sample:
    path: str  # grpc | openai
    concurrency: int
    round: int
    seconds: float


def picture() -> bytes:
    """The first calibration photo, as a client would send a PNG or JPEG file."""
    return sorted((ROOT / "data" / "calibration" / "images").glob("*.*g"))[0].read_bytes()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_front(server: TritonServer, repository: Path, port: int) -> subprocess.Popen:
    front = subprocess.Popen([sys.executable, "-m", "builder", "openai", "--triton", server.grpc_url, "--port", str(port),
                              "--repository", str(repository)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                if reply.status == 200:
                    return front
        except OSError:
            if front.poll() is not None:
                raise SystemExit(f"the front exited: {front.stderr.read().decode()[-2000:]}") from None
        time.sleep(0.2)
    front.kill()
    raise SystemExit("the front did not become healthy within 60 s")


def timed(call, arguments: list, concurrency: int) -> tuple[list[float], list[str]]:
    def one(argument) -> tuple[float, str]:
        started = time.perf_counter()
        text = call(argument)
        return time.perf_counter() - started, text

    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, arguments))
    return [seconds for seconds, _ in results], [text for _, text in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, default=ROOT / "model_repository")
    parser.add_argument("--concurrency", default="1,8", help="comma-separated (default 1,8)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=24, help="requests per path, round and concurrency")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "openai_front")
    args = parser.parse_args()
    image = picture()
    data_url = "data:image/jpeg;base64," + base64.b64encode(image).decode()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    model = served_model_name(args.repository)
    samples: list[Sample] = []
    port = free_port()
    with TritonServer(args.repository, log_path=args.output / "tritonserver.log") as server:
        front = start_front(server, args.repository, port)
        try:
            chat = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
            local = threading.local()  # one gRPC client per worker thread, as one per client process

            def direct(prompt: str) -> str:
                if not hasattr(local, "client"):
                    local.client = grpcclient.InferenceServerClient(server.grpc_url)
                return ask(local.client, Request(prompt, images=(image,), max_tokens=NEW_TOKENS)).text

            def through_front(prompt: str) -> str:
                reply = chat.chat.completions.create(model=model, max_tokens=NEW_TOKENS, messages=[{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": data_url}}, {"type": "text", "text": prompt}]}])
                return reply.choices[0].message.content

            expected = timed(direct, prompts, 1)[1]  # also warms both paths
            if timed(through_front, prompts, 1)[1] != expected:
                raise SystemExit("the front's answers differ from the direct gRPC ones")
            for concurrency in map(int, args.concurrency.split(",")):
                for round_ in range(args.rounds):
                    paths = [("grpc", direct), ("openai", through_front)]
                    for path, call in paths if round_ % 2 == 0 else paths[::-1]:
                        seconds, texts = timed(call, prompts, concurrency)
                        if texts != expected:
                            raise SystemExit(f"{path} at concurrency {concurrency} answered differently than alone")
                        samples += [Sample(path, concurrency, round_, s) for s in seconds]
        finally:
            front.terminate()
            front.wait(timeout=30)
    args.output.mkdir(parents=True, exist_ok=True)
    with (args.output / "openai_front.csv").open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["path", "concurrency", "round", "seconds"])
        writer.writerows([s.path, s.concurrency, s.round, f"{s.seconds:.6f}"] for s in samples)
    host = machine()
    print(f"{host['CPU']} (load {host['load average at start']}); {args.repository} ({model}); {args.requests} requests "
          f"per path x {args.rounds} rounds, {NEW_TOKENS} new tokens, text + one image")
    print("| concurrency | gRPC p50 ms | front p50 ms | front / gRPC | target |")
    print("|---:|---:|---:|---:|---|")
    for concurrency in map(int, args.concurrency.split(",")):
        p50 = {path: statistics.median(s.seconds for s in samples if s.path == path and s.concurrency == concurrency)
               for path in ("grpc", "openai")}
        ratio = p50["openai"] / p50["grpc"]
        print(f"| {concurrency} | {p50['grpc'] * 1e3:.1f} | {p50['openai'] * 1e3:.1f} | {ratio:.3f} | "
              f"{'met' if ratio <= 1.10 else f'missed (+{(ratio - 1) * 100:.0f}%, target +10%)'} |")
    print(f"samples: {args.output / 'openai_front.csv'}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
