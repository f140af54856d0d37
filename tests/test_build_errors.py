"""Bad builds through the real CLI: one readable line on stderr, a non-zero exit, and the previous
repository byte-for-byte as it was.

Checkpoint cases break a copy of the tiny preset's checkpoint (a real ``save_pretrained`` directory).
"""

from __future__ import annotations

import json
import pickle
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from builder.cache import StageCache
from builder.families import FAMILIES
from builder.source.resolve import resolve_source
from tests.conftest import CACHE, REPOSITORY_CHANGE, run_cli, tree_digest


def _edit_config(**changes: object) -> Callable[[Path], None]:
    def edit(checkpoint: Path) -> None:
        path = checkpoint / "config.json"
        config = json.loads(path.read_text())
        for dotted, value in changes.items():
            *parents, leaf = dotted.split("__")
            node = config
            for part in parents:
                node = node[part]
            node[leaf] = value
        path.write_text(json.dumps(config))
    return edit


def _empty(checkpoint: Path) -> None:
    for path in checkpoint.iterdir():
        path.unlink()


def _pickle_only(checkpoint: Path) -> None:
    (checkpoint / "model.safetensors").rename(checkpoint / "pytorch_model.bin")


def _truncate_weights(checkpoint: Path) -> None:
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _remove(name: str) -> Callable[[Path], None]:
    return lambda checkpoint: (checkpoint / name).unlink()


def _write(name: str, text: str) -> Callable[[Path], None]:
    return lambda checkpoint: (checkpoint / name).write_text(text)


@dataclass(frozen=True)
class BadBuild:
    spec: str  # the spec file's text; {checkpoint} is a broken copy of the tiny checkpoint
    message: str  # must appear in the one error line
    args: tuple[str, ...] = ()
    breaks: Callable[[Path], None] | None = None  # what is broken in the checkpoint copy


CHECKPOINT_SPEC = "name: broken\nsource: {{preset: null, checkpoint: '{checkpoint}'}}\n"
CASES: dict[str, BadBuild] = {
    # The spec.
    "unknown_key": BadBuild("nmae: tiny\n", "nmae: unknown key (did you mean 'name'?)"),
    "mistyped_nested_key": BadBuild("limits:\n  max_imagse: 4\n", "limits.max_imagse: unknown key (did you mean 'max_images'?)"),
    "no_source": BadBuild("source: {preset: null}\n", "source: give exactly one of 'preset' or 'checkpoint'"),
    "word_for_a_number": BadBuild("limits: {max_images: four}\n", "limits.max_images: expected a whole number, got 'four'"),
    "string_for_a_bool": BadBuild("components: {vision: {enabled: 'yes'}}\n", "components.vision.enabled: expected true or false, got 'yes'"),
    "unknown_precision": BadBuild("components: {llm: {precision: int2}}\n", "components.llm.precision: 'int2' is not one of fp32, fp16, int8, int4"),
    "section_not_a_mapping": BadBuild("limits: 5\n", "limits: expected a mapping, got int"),
    "invalid_yaml": BadBuild("limits: {max_images: 4\n", "line 2, column 1: not valid YAML: expected ',' or '}'"),
    "name_with_a_path": BadBuild("name: ../../etc/passwd\n", "name: '../../etc/passwd' must be 1-64 letters"),
    "prompt_longer_than_context": BadBuild(
        "limits: {max_prompt_tokens: 600, max_context: 512}\n",
        "limits.max_prompt_tokens (600) must be smaller than limits.max_context (512)"),
    "default_over_cap": BadBuild(
        "limits: {max_tokens: 16, default_max_tokens: 32}\n", "limits.default_max_tokens (32) exceeds limits.max_tokens (16)"),
    "zero_limit": BadBuild("limits: {max_images: 0}\n", "limits.max_images: must be greater than 0"),
    "set_without_value": BadBuild("name: tiny\n", "--set 'limits.max_images': expected KEY=VALUE", args=("--set", "limits.max_images")),
    "set_unknown_key": BadBuild("name: tiny\n", "limits.max_image: unknown key (did you mean 'max_images'?)", args=("--set", "limits.max_image=3")),
    # The checkpoint.
    "missing_checkpoint": BadBuild(CHECKPOINT_SPEC.format(checkpoint="/nonexistent/ckpt"), "directory not found: /nonexistent/ckpt"),
    "empty_checkpoint": BadBuild(CHECKPOINT_SPEC, "checkpoint directory is empty", breaks=_empty),
    "pickle_weights_only": BadBuild(
        CHECKPOINT_SPEC, "only pickle weights (pytorch_model.bin), which are never loaded; convert the checkpoint to safetensors",
        breaks=_pickle_only),
    "truncated_safetensors": BadBuild(CHECKPOINT_SPEC, "model.safetensors: not a readable safetensors file", breaks=_truncate_weights),
    "unsupported_architecture": BadBuild(
        CHECKPOINT_SPEC, f"unsupported architecture model_type='llama' (supported: {', '.join(sorted(FAMILIES))})", breaks=_edit_config(model_type="llama")),
    "config_weights_mismatch": BadBuild(
        CHECKPOINT_SPEC, "weights do not match config.json", breaks=_edit_config(text_config__intermediate_size=96)),
    "no_config": BadBuild(CHECKPOINT_SPEC, "no config.json (expected a Hugging Face save_pretrained directory)", breaks=_remove("config.json")),
    "config_not_json": BadBuild(CHECKPOINT_SPEC, "config.json: not valid JSON", breaks=_write("config.json", "{model_type: mistral3")),
    "no_tokenizer": BadBuild(CHECKPOINT_SPEC, "no tokenizer; looked for tokenizer.json and tekken.json", breaks=_remove("tokenizer.json")),
}


@pytest.fixture(scope="module")
def tiny_checkpoint(tiny_spec) -> Path:
    return resolve_source(tiny_spec.source, StageCache(CACHE)).checkpoint


def assert_one_line_error(done: subprocess.CompletedProcess, message: str) -> None:
    assert done.returncode != 0, done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr
    assert "internal error" not in lines[0]


@pytest.mark.parametrize("case", CASES)
def test_bad_build_says_one_line_and_keeps_the_repository(case, published, tiny_checkpoint, tmp_path):
    bad = CASES[case]
    spec_text = bad.spec
    if bad.breaks is not None:
        checkpoint = tmp_path / "checkpoint"
        shutil.copytree(tiny_checkpoint, checkpoint)
        bad.breaks(checkpoint)
        spec_text = bad.spec.format(checkpoint=checkpoint)
    spec = tmp_path / "spec.yaml"
    spec.write_text(spec_text)
    before = tree_digest(published)
    done = run_cli("build", "--quiet", "--spec", str(spec), "--output", str(published), "--cache", str(tmp_path / "cache"), *bad.args)
    assert_one_line_error(done, bad.message)
    assert tree_digest(published) == before


def test_missing_spec_file(published):
    before = tree_digest(published)
    assert_one_line_error(run_cli("build", "--spec", "/nonexistent/spec.yaml", "--output", str(published)),
                          "spec file not found: /nonexistent/spec.yaml")
    assert tree_digest(published) == before


def test_output_under_a_regular_file(tmp_path):
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("a file where a directory should be\n")
    done = run_cli("build", "--quiet", "--output", str(blocker / "model_repository"))
    assert_one_line_error(done, f"{blocker} is a file, not a directory")
    assert blocker.read_text() == "a file where a directory should be\n"


def test_output_is_a_regular_file(tmp_path):
    output = tmp_path / "model_repository"
    output.write_text("not a repository\n")
    done = run_cli("build", "--quiet", "--output", str(output))
    assert_one_line_error(done, f"{output} exists and is not a directory")
    assert output.read_text() == "not a repository\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_repository"]  # no staging directory left


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here ({done.stderr.strip() or done.returncode}): needs root in a privileged container")


@pytest.fixture()
def tmpfs(tmp_path) -> Iterator[Callable[[int], Path]]:
    """``tmpfs(size)`` mounts a tmpfs of ``size`` bytes on a fresh directory; unmounted afterwards."""
    points: list[Path] = []

    def mount(size: int) -> Path:
        point = tmp_path / f"tmpfs{len(points)}"
        point.mkdir()
        _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point))
        points.append(point)
        return point

    yield mount
    for point in points:
        subprocess.run(["umount", "-l", str(point)], check=False)


def test_read_only_output_directory(tmpfs, built_repository):
    disk = tmpfs(8 * 1024 * 1024)
    output = disk / "model_repository"
    shutil.copytree(built_repository, output)
    before = tree_digest(output)
    _mount("-o", "remount,ro", str(disk))
    done = run_cli("build", "--quiet", "--output", str(output), *REPOSITORY_CHANGE)
    assert_one_line_error(done, f"cannot write {output}: read-only file system")
    assert tree_digest(output) == before


def test_full_disk_keeps_the_previous_repository(tmpfs, built_repository):
    """A tmpfs that holds the previous repository but not a second copy: the new one cannot be staged."""
    size = sum(-(-p.stat().st_size // 4096) * 4096 for p in built_repository.rglob("*") if p.is_file())  # tmpfs pages
    disk = tmpfs(size + 256 * 1024)
    output = disk / "model_repository"
    shutil.copytree(built_repository, output)
    before = tree_digest(output)
    done = run_cli("build", "--quiet", "--output", str(output), *REPOSITORY_CHANGE)
    assert_one_line_error(done, f"cannot write the repository next to {output}: No space left on device")
    assert tree_digest(output) == before
    assert sorted(p.name for p in disk.iterdir()) == ["model_repository"]  # the staging directory is gone


def test_unexpected_exception_is_one_line_too(monkeypatch, capsys):
    """A bug (not a BuildError) still ends in one line, and --verbose shows its traceback."""
    from builder import cli

    def crash(*_args: object, **_kwargs: object) -> None:
        raise KeyError("vision_config")

    monkeypatch.setattr("builder.build.build", crash)
    assert cli.main(["build", "--quiet"]) == 1
    assert capsys.readouterr().err == "error: internal error: KeyError: 'vision_config'; rerun with --verbose\n"
    with pytest.raises(KeyError):
        cli.main(["--verbose", "build", "--quiet"])


class _PicklePayload:
    """Unpickling this touches ``marker``: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[Path]]:
        return Path.touch, (self.marker,)


def test_checkpoint_pickles_and_code_are_never_run(tiny_checkpoint, tmp_path):
    """Beside its safetensors, a checkpoint ships a pickle and remote code: neither runs, weights are the safetensors'."""
    from builder.source.checkpoint import load_checkpoint

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, checkpoint)
    marker = tmp_path / "code_ran"
    (checkpoint / "pytorch_model.bin").write_bytes(pickle.dumps(_PicklePayload(marker)))
    for module in ("configuration_evil", "modeling_evil"):
        (checkpoint / f"{module}.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    config = json.loads((checkpoint / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}
    (checkpoint / "config.json").write_text(json.dumps(config))

    loaded = load_checkpoint(checkpoint)
    assert not marker.exists()
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as weights:
        saved = weights.get_tensor("language_model.model.embed_tokens.weight")
    assert torch.equal(loaded.model.get_input_embeddings().weight, saved)


def test_serve_binds_localhost_unless_told_otherwise():
    from builder.cli import parser
    from builder.serve.tritonserver import TritonInstall, TritonServer

    args = parser().parse_args(["serve"])
    assert args.host == "127.0.0.1"
    command = TritonServer(args.repository, host=args.host).command(TritonInstall(Path("tritonserver"), Path("backends")))
    for service in ("grpc", "http", "metrics"):
        assert f"--{service}-address=127.0.0.1" in command
