"""Command line: ``python -m builder {build,serve,openai,ask,bench,plan,publish}`` (also installed as ``mmtb``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from builder.errors import BuildError
from builder.runtime.contract import MESSAGES_INPUT, SAMPLING_INPUTS, SYSTEM_PROMPT_INPUT
from builder.targets import TARGETS, target_for

if TYPE_CHECKING:
    from builder.spec import BuildSpec

DEFAULT_SPEC = Path("specs/tiny.yaml")
DEFAULT_OUTPUT = Path("model_repository")
DEFAULT_CACHE = Path(".build_cache")


def _overrides(pairs: list[str]) -> dict[str, object]:
    result: dict[str, object] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise BuildError(f"--set {pair!r}: expected KEY=VALUE, e.g. --set components.llm.precision=int8")
        result[key] = yaml.safe_load(value)  # "8" -> 8, "true" -> True, as in the spec file
    return result


def _checkpoint_overrides(checkpoint: Path | None) -> dict[str, Any]:
    """``--checkpoint DIR``: the spec's other settings apply; components and sizes come from the checkpoint."""
    if checkpoint is None:
        return {}
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", checkpoint.resolve().name)[:64] or "checkpoint"
    return {"source.preset": None, "source.checkpoint": str(checkpoint), "name": name}


def _load_spec(spec: Path | None, checkpoint: Path | None, overrides: dict[str, Any]) -> "BuildSpec":
    """``--spec``, else: for ``--checkpoint`` every key's default (limits follow the checkpoint), for the preset
    ``specs/tiny.yaml``."""
    from builder.spec import load_spec

    path = spec if spec is not None or checkpoint is not None else DEFAULT_SPEC
    loaded = load_spec(path, {**overrides, **_checkpoint_overrides(checkpoint)})
    target_for(loaded)  # the rules that depend on the target
    return loaded


def cmd_build(args: argparse.Namespace) -> int:
    overrides = _overrides(args.set)
    if args.target:
        overrides["target"] = args.target
    spec = _load_spec(args.spec, args.checkpoint, overrides)  # before importing torch: a bad spec is reported at once
    from builder.build import build

    result = build(spec, args.output, args.cache, progress=not args.quiet)
    print(result.summary())
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from builder.serve.tritonserver import TritonServer

    if not (args.repository / "manifest.json").is_file():
        raise BuildError(f"{args.repository} holds no built repository: run `make engines` first")
    server = TritonServer(args.repository, host=args.host, grpc_port=args.grpc_port, http_port=args.http_port,
                          metrics_port=args.metrics_port, log_path=args.log)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops the server like Ctrl-C does
    with server, _openai_front(args, server.grpc_url) as front:
        print(f"tritonserver ready: gRPC {server.grpc_url}, HTTP {server.host}:{server.http_port} "
              f"(log: {server.log_path})" + (f"; OpenAI API at http://{args.host}:{args.openai_port}/v1" if front else "")
              + "; Ctrl-C stops it", flush=True)
        try:
            while server.running and (front is None or front.poll() is None):
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    print("tritonserver stopped")
    return 0


@contextlib.contextmanager
def _openai_front(args: argparse.Namespace, triton_url: str) -> Iterator[subprocess.Popen[bytes] | None]:
    """``serve``'s OpenAI-compatible front (``openai``) beside tritonserver, unless ``--openai-port 0``."""
    if not args.openai_port:
        yield None
        return
    command = [sys.executable, "-m", "builder", "openai", "--triton", triton_url, "--host", args.host,
               "--port", str(args.openai_port), "--repository", str(args.repository)]
    front = subprocess.Popen(command)  # its API key, if any, from MMTB_OPENAI_API_KEY in the environment
    try:
        yield front
    finally:
        front.terminate()
        front.wait(timeout=15)


def cmd_openai(args: argparse.Namespace) -> int:
    import uvicorn

    from builder.serve.openai import FrontSettings, create_app, served_model_name
    from builder.serve.openai.chat_request import ImageSource

    if args.model_name is None and args.repository is None:
        raise BuildError("openai: give --model-name NAME or --repository DIR (the name it was built under)")
    settings = FrontSettings(
        triton_url=args.triton, model_name=args.model_name or served_model_name(args.repository),
        api_key=args.api_key or os.environ.get("MMTB_OPENAI_API_KEY") or None,
        images=ImageSource(frozenset(args.allow_image_host), max_bytes=int(args.max_body_mb * (1 << 20))),
        max_body_bytes=int(args.max_body_mb * (1 << 20)), timeout_s=args.timeout, retry_after_s=args.retry_after,
    )
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="warning")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from builder.serve.client import Request, ask, ask_stream

    if (args.prompt is None) == (args.messages is None):
        raise BuildError("ask: give a prompt or --messages FILE (a conversation), not both")
    try:
        messages = json.loads(args.messages.read_text()) if args.messages is not None else None
        request = Request(
            prompt=args.prompt, images=tuple(p.read_bytes() for p in args.image),
            audio=tuple(p.read_bytes() for p in args.audio), system_prompt=args.system_prompt, messages=messages,
            **{t.name: getattr(args, t.name) for t in SAMPLING_INPUTS},
        )
    except OSError as exc:
        raise BuildError(f"cannot read {exc.filename}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise BuildError(f"--messages {args.messages}: not valid JSON ({exc})") from None
    try:
        with grpcclient.InferenceServerClient(args.url) as client:
            if args.stream:
                count = 0
                for delta, ids in ask_stream(client, request):
                    print(delta, end="", flush=True)
                    count += len(ids)
                print(f"\n[{count} tokens streamed]")
            else:
                answer = ask(client, request)
                print(answer.text)
                print(f"[{len(answer.token_ids)} tokens: {answer.token_ids}]")
    except InferenceServerException as exc:
        raise BuildError(f"server error: {exc.message()}") from None
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    import dataclasses

    from builder.bench.run import FULL, QUICK, run_bench
    from builder.build import build

    spec = _load_spec(args.spec, args.checkpoint, {})
    settings = QUICK if args.quick else FULL
    if args.concurrency:
        settings = dataclasses.replace(settings, concurrency=tuple(int(c) for c in args.concurrency.split(",")))
    name = args.name or (f"{spec.name}-quick" if args.quick else spec.name)
    command = (f"python -m builder bench{' --quick' if args.quick else ''}" + (f" --spec {args.spec}" if args.spec else "")
               + f" --repository {args.repository}"
               + (f" --checkpoint {args.checkpoint}" if args.checkpoint else "")
               + (f" --concurrency {args.concurrency}" if args.concurrency else ""))
    built = build(spec, args.repository, args.cache, progress=False)  # up to date: a no-op
    print(built.summary(), flush=True)
    summary = run_bench(built.spec, args.repository, args.cache, args.results / name, settings, command)
    print(summary.read_text().split("\n\n")[1])
    print(f"report: {summary}")
    return 0


def _with_the_servers_allocator() -> None:
    """The bench's baselines (in-process, HF eager) run in this process: it restarts itself with the allocator
    setting the server gets, so a baseline is never slower for a setting only the server had."""
    from builder.serve.tritonserver import serving_environment

    env = serving_environment(os.environ)
    if env != dict(os.environ):
        os.execve(sys.executable, [sys.executable, "-m", "builder", *sys.argv[1:]], env)


def cmd_plan(args: argparse.Namespace) -> int:
    from builder.sizing import GPUS, Gpu, read_size, report

    if args.gpu_memory_gib and args.gpu_bandwidth_gbs:
        gpu = Gpu("custom", args.gpu_memory_gib, args.gpu_bandwidth_gbs)
    elif args.gpu.lower() in GPUS:
        gpu = GPUS[args.gpu.lower()]
    else:
        raise BuildError(f"--gpu {args.gpu}: not in the table ({', '.join(g.name for g in GPUS.values())}); "
                         "give --gpu-memory-gib and --gpu-bandwidth-gbs instead")
    print(report(read_size(args.checkpoint), gpu, args.context, args.gpus))
    print(_served_limits(args.checkpoint))
    return 0


def _served_limits(checkpoint: Path) -> str:
    """The limits ``make engines CHECKPOINT=dir`` would serve with, from the checkpoint's facts (no weight loaded)."""
    from builder.source.checkpoint import read_facts
    from builder.source.limits import checkpoint_limits, describe

    try:
        facts = read_facts(checkpoint)
    except BuildError as exc:  # e.g. headers and config only: the tokenizer and processor files decide the media cost
        return f"served limits: decided by the build ({exc})"
    limits = checkpoint_limits(_load_spec(None, checkpoint, {}), facts).limits
    return f"served {describe(limits, facts)} (make engines CHECKPOINT=dir)"


def cmd_publish(args: argparse.Namespace) -> int:
    from builder.storage.s3 import publish

    print(publish(args.repository, args.url, args.endpoint_url).summary())
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="mmtb",
        description="Build a multimodal LLM (image + audio + text in, text out) into a Triton model repository, "
        "serve it, and ask it questions. Start with `build`, then `serve`, then `ask` in another shell.",
    )
    top.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
    sub = top.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="export, check and package the model into a Triton repository",
                       description="Runs source -> export (checked against PyTorch) -> compile -> repository. "
                       "Stages are cached: an unchanged build does nothing. The repository is replaced "
                       "atomically, and only when every check passed.")
    b.add_argument("--spec", type=Path, help=f"build spec YAML (default: {DEFAULT_SPEC}; with --checkpoint, every key's "
                   "default, the request limits following the checkpoint)")
    b.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help=f"repository directory (default: {DEFAULT_OUTPUT})")
    b.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"stage cache (default: {DEFAULT_CACHE})")
    b.add_argument("--checkpoint", type=Path, metavar="DIR",
                   help="build this Hugging Face checkpoint directory (save_pretrained layout, safetensors) "
                   "instead of the spec's source; the spec's other settings still apply")
    b.add_argument("--target", choices=list(TARGETS), help="override the spec's target: "
                   + "; ".join(f"{t.name}: {t.summary}" for t in TARGETS.values()))
    b.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec key, e.g. --set components.audio.enabled=false (repeatable)")
    b.add_argument("--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_build)

    s = sub.add_parser("serve", help="run tritonserver on the repository (localhost by default)")
    s.add_argument("--repository", type=Path, default=DEFAULT_OUTPUT)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, localhost only)")
    s.add_argument("--grpc-port", type=int, default=8001)
    s.add_argument("--http-port", type=int, default=8000)
    s.add_argument("--metrics-port", type=int, default=8002)
    s.add_argument("--log", type=Path, default=Path("tritonserver.log"), help="server log file")
    s.add_argument("--openai-port", type=int, default=9000, metavar="PORT",
                   help="port of the OpenAI-compatible API started beside it (the `openai` command; default 9000, 0: none)")
    s.set_defaults(func=cmd_serve)

    o = sub.add_parser("openai", help="an OpenAI-compatible HTTP API (chat completions with images and audio) in front "
                       "of a running tritonserver",
                       description="Serves POST /v1/chat/completions (messages with text, image_url and input_audio "
                       "parts; streaming as server-sent events), GET /v1/models, GET /health (ready when Triton's "
                       "ensembles are) and GET /metrics (Prometheus), calling the repository's ensembles over gRPC. "
                       "Use it with any OpenAI client: base_url http://HOST:PORT/v1.")
    o.add_argument("--triton", default="127.0.0.1:8001", metavar="HOST:PORT",
                   help="gRPC address of the tritonserver (default: 127.0.0.1:8001, as `serve` starts it)")
    o.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, localhost only)")
    o.add_argument("--port", type=int, default=9000, help="HTTP port (default: 9000)")
    o.add_argument("--model-name", metavar="NAME", help="the model's name in the API (default: the name --repository was built under)")
    o.add_argument("--repository", type=Path, metavar="DIR", help="the built repository Triton serves, to read its name from")
    o.add_argument("--api-key", metavar="KEY", help="require `Authorization: Bearer KEY` on /v1 (default: $MMTB_OPENAI_API_KEY; "
                   "neither: no key, so bind to localhost or keep the port private)")
    o.add_argument("--allow-image-host", action="append", default=[], metavar="HOST",
                   help="also fetch image_url parts from http(s)://HOST/... (repeatable; default: data: URLs only)")
    o.add_argument("--max-body-mb", type=float, default=20, metavar="MB", help="largest request body, images and audio included "
                   "(default 20 MB; larger: 413)")
    o.add_argument("--timeout", type=float, default=300, metavar="SECONDS", help="seconds an answer may take (default 300)")
    o.add_argument("--retry-after", type=int, default=1, metavar="SECONDS",
                   help="seconds a 503 (the server's KV budget is full) tells clients to wait (default 1)")
    o.set_defaults(func=cmd_openai)

    a = sub.add_parser("ask", help="send a prompt (with images/audio) to a running server")
    a.add_argument("prompt", nargs="?", help="the user's message (or give --messages)")
    a.add_argument("--image", type=Path, action="append", default=[], help="PNG/JPEG file (repeatable)")
    a.add_argument("--audio", type=Path, action="append", default=[], help="WAV file (repeatable)")
    a.add_argument("--url", default="127.0.0.1:8001", help="gRPC address of the server")
    a.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    a.add_argument("--system-prompt", help=SYSTEM_PROMPT_INPUT.help)
    a.add_argument("--messages", type=Path, metavar="FILE", help="a JSON file with " + MESSAGES_INPUT.help
                   + "; --image/--audio give the files the parts name, in order")
    for sampling in SAMPLING_INPUTS:  # the client contract's table: a new input shows up here
        a.add_argument(f"--{sampling.name.replace('_', '-')}", type=sampling.scalar_type, help=sampling.help)
    a.set_defaults(func=cmd_ask)

    m = sub.add_parser("bench", help="perf_analyzer against the served repository, with baselines, plots and a report",
                       description="Builds if needed, measures in-process and Hugging Face eager baselines, serves the "
                       "repository and runs perf_analyzer (gRPC) over a concurrency sweep; writes CSVs, summary.md and "
                       "plots into RESULTS/NAME/.")
    m.add_argument("--quick", action="store_true", help="a smoke run of a few minutes (short windows, concurrency 1, 2, 8)")
    m.add_argument("--name", help="results directory name (default: the spec name, + '-quick' with --quick)")
    m.add_argument("--repository", type=Path, default=DEFAULT_OUTPUT)
    m.add_argument("--spec", type=Path, help="the spec the repository was built with (default: as `build`)")
    m.add_argument("--checkpoint", type=Path, metavar="DIR", help="the checkpoint `build --checkpoint` built (default: "
                   "the spec's source)")
    m.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    m.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    m.add_argument("--concurrency", help="comma-separated concurrency sweep, e.g. 1,2 (default: 1,2,4,8,16; quick 1,2,8)")
    m.set_defaults(func=cmd_bench)

    p = sub.add_parser("plan", help="how much GPU a checkpoint needs: weights, KV cache, sequences that fit, speed bound",
                       description="Reads config.json and the safetensors headers (no weights are loaded) and prints, per "
                       "precision, the weight memory, what is left for the KV cache, how many sequences of --context "
                       "tokens fit, the batch-1 decode bound from memory bandwidth, and a recommended spec.")
    p.add_argument("checkpoint", type=Path, help="a Hugging Face checkpoint directory (config.json + *.safetensors)")
    p.add_argument("--gpu", default="L40S", help="L4, A10, RTX4090, A100-40GB, L40S, RTX6000Ada, A100-80GB, H100 (default L40S)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs, each serving a whole copy (no tensor parallelism; default 1)")
    p.add_argument("--context", type=int, default=8192, help="tokens per sequence, prompt + answer (default 8192)")
    p.add_argument("--gpu-memory-gib", type=float, help="any other GPU: its memory (GiB) ...")
    p.add_argument("--gpu-bandwidth-gbs", type=float, help="... and its memory bandwidth (GB/s)")
    p.set_defaults(func=cmd_plan)

    u = sub.add_parser("publish", help="upload a built repository to S3 as an immutable, verified version",
                       description="Uploads the repository to s3://bucket/prefix/versions/<version>/ (the version is a "
                       "digest of every file, so republishing the same build uploads nothing), verifies every object "
                       "(listing, size, sha256), then points s3://bucket/prefix/current.json at it. A killed upload is "
                       "never pointed at; rerun to finish it. Credentials from the usual AWS variables "
                       "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION).")
    u.add_argument("url", help="s3://bucket/prefix")
    u.add_argument("--repository", type=Path, default=DEFAULT_OUTPUT, help="the built repository (default: model_repository)")
    u.add_argument("--endpoint-url", help="an S3-compatible store other than AWS, e.g. http://minio:9000")
    u.set_defaults(func=cmd_publish)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if argv is None and args.func is cmd_bench:
        _with_the_servers_allocator()
    try:
        return args.func(args)
    except BuildError as exc:
        if args.verbose:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a bug, still one line; --verbose shows the traceback
        if args.verbose:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        print(f"error: internal error: {type(exc).__name__}: {first}; rerun with --verbose", file=sys.stderr)
        return 1
