"""Builds killed with SIGKILL keep the last good repository, and the next build resumes.

Each kill point is found by watching the build's own directories: a stage writes its cache entry into
a hidden temporary directory renamed into place when complete, and the repository is assembled in a
hidden staging directory beside the output.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import CACHE, REPOSITORY_CHANGE, ROOT, run_cli, tree_digest

STAGING = ".model_repository.staging-*"


def start_build(output: Path, cache: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "builder", "build", "--quiet", "--output", str(output), "--cache", str(cache), *REPOSITORY_CHANGE],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


def kill_when(build: subprocess.Popen, ready: Callable[[], bool], timeout: float = 240) -> None:
    """SIGKILL the build (its whole process group) as soon as ``ready()``; fails if it ends first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if build.poll() is not None:
            pytest.fail(f"the build ended (exit {build.returncode}) before the kill point:\n{build.stdout.read()}")
        if time.monotonic() > deadline:
            os.killpg(build.pid, signal.SIGKILL)
            pytest.fail("the kill point was not reached in time")
        time.sleep(0.01)
    os.killpg(build.pid, signal.SIGKILL)
    build.wait()
    build.stdout.close()


def exists(directory: Path, pattern: str) -> Callable[[], bool]:
    return lambda: directory.is_dir() and any(directory.glob(pattern))


@pytest.fixture()
def last_good(built_repository, tmp_path) -> tuple[Path, str]:
    """A published repository in tmp_path and its digest."""
    output = tmp_path / "out" / "model_repository"
    shutil.copytree(built_repository, output)
    return output, tree_digest(output)


def test_killed_at_each_stage_keeps_the_repository_and_resumes(last_good, tmp_path):
    """A fresh cache, so that every stage has real work; killed in the source stage, in the first
    export, after it, then a build that completes reusing what had finished."""
    output, digest = last_good
    cache = tmp_path / "cache"
    kill_points = [
        exists(cache / "source", ".tiny-*"),  # writing the tiny checkpoint
        exists(cache / "export", ".vision_encoder-*"),  # source done; exporting the first graph
        exists(cache / "export", "vision_encoder-*"),  # the first graph finished; exporting the next
    ]
    for ready in kill_points:
        kill_when(start_build(output, cache), ready)
        assert tree_digest(output) == digest
    assert len(list((cache / "source").glob("tiny-*"))) == 1  # finished entries only under their final name

    done = run_cli("build", "--quiet", "--output", str(output), "--cache", str(cache), *REPOSITORY_CHANGE)
    assert done.returncode == 0, done.stderr
    summary = done.stdout.strip().splitlines()[-1]
    assert "rebuilt audio_encoder, llm; reused vision_encoder" in summary, summary
    assert tree_digest(output) != digest
    assert json.loads((output / "manifest.json").read_text())["spec"]["triton"]["max_queue_delay_us"] == 1999
    assert not list(output.parent.glob(STAGING))


def test_killed_while_publishing_keeps_the_repository(last_good):
    """Everything cached: the build goes straight to assembling the staging directory, and is killed there."""
    output, digest = last_good
    kill_when(start_build(output, CACHE), exists(output.parent, STAGING))
    assert tree_digest(output) == digest

    done = run_cli("build", "--quiet", "--output", str(output), *REPOSITORY_CHANGE)
    assert done.returncode == 0, done.stderr
    assert "rebuilt nothing; reused vision_encoder, audio_encoder, llm" in done.stdout
    assert tree_digest(output) != digest
    assert not list(output.parent.glob(STAGING))  # the killed build's staging directory was cleared
