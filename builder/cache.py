"""Stage outputs cached under a key of their inputs, so an unchanged build does nothing.

Every cached step is a :class:`Stage`: its ``key`` hashes what it was fed (the upstream stage's key, or the
content it reads), its own settings, the versions of the tools that shape its output and the source of the
code that produces it, so no step builds a key by hand; its ``run`` writes an entry into a temporary directory
renamed into place when complete, so a build killed mid-stage never leaves an entry that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from collections.abc import Callable
from pathlib import Path
from typing import Any

_TOOLS = ("torch", "transformers", "onnx", "onnxruntime", "onnxscript")
_PACKAGE_ROOT = Path(__file__).resolve().parent


def tool_versions() -> dict[str, str]:
    versions = {}
    for name in _TOOLS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def code_fingerprint(*subpackages: str) -> str:
    """Hash of the builder source that decides a stage's output (``export``, ``source``...)."""
    digest = hashlib.sha256()
    for sub in subpackages:
        root = _PACKAGE_ROOT / sub
        # Every file, not only *.py: the runtime's requirements.txt travels into the repository too.
        files = sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts) if root.is_dir() \
            else [root.with_suffix(".py")]
        for path in files:
            digest.update(path.relative_to(_PACKAGE_ROOT).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def make_key(*parts: Any) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


@dataclass(frozen=True)
class Stage:
    """One cached step of the build, keyed and written the same way as every other."""

    name: str  # its directory in the cache
    code: tuple[str, ...]  # the builder subpackages (or modules) whose source decides its output

    def key(self, upstream: Any, *settings: Any) -> str:
        """``upstream``: the key (or content hash) of what it is fed; ``settings``: what else decides its output."""
        return make_key(self.name, upstream, settings, code_fingerprint(*self.code), tool_versions())

    def run(self, cache: StageCache, item: str, key: str, write: Callable[[Path], None]) -> Path:
        """The entry of ``item`` under ``key``: the cached one, or the one ``write`` fills now."""
        entry = cache.lookup(self.name, item, key)
        if entry is None:
            with cache.writer(self.name, item, key) as tmp:
                write(tmp)
            entry = cache.entry(self.name, item, key)
        return entry

    def lookup(self, cache: StageCache, item: str, key: str) -> Path | None:
        return cache.lookup(self.name, item, key)


@dataclass(frozen=True)
class StageCache:
    root: Path

    def entry(self, stage: str, name: str, key: str) -> Path:
        return self.root / stage / f"{name}-{key}"

    def lookup(self, stage: str, name: str, key: str) -> Path | None:
        path = self.entry(stage, name, key)
        return path if path.is_dir() else None

    def writer(self, stage: str, name: str, key: str) -> "_EntryWriter":
        return _EntryWriter(self.entry(stage, name, key))


class _EntryWriter:
    """``with cache.writer(...) as tmp:`` fill ``tmp``; it becomes the entry only on success."""

    def __init__(self, final: Path) -> None:
        self.final = final
        self.tmp: Path | None = None

    def __enter__(self) -> Path:
        self.final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.final.name}.", dir=self.final.parent))
        return self.tmp

    def __exit__(self, exc_type: object, *_: object) -> None:
        assert self.tmp is not None
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.final.exists():  # another build finished the same entry first
            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            os.rename(self.tmp, self.final)
