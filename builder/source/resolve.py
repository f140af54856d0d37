"""The source stage: turns ``spec.source`` into a checkpoint directory and a fingerprint of it."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

from builder.cache import Stage, StageCache
from builder.errors import BuildError
from builder.spec import SourceSpec


@dataclass(frozen=True)
class ResolvedSource:
    checkpoint: Path
    fingerprint: str  # changes whenever the checkpoint's content may have changed
    cached: bool


PRESET = Stage("source", ("source",))  # a preset's checkpoint, written from its seed


def resolve_source(source: SourceSpec, cache: StageCache) -> ResolvedSource:
    if source.checkpoint is not None:
        directory = Path(source.checkpoint).expanduser()
        if not directory.is_dir():
            raise BuildError(f"source.checkpoint: directory not found: {directory}")
        return ResolvedSource(directory, checkpoint_fingerprint(directory), cached=True)

    assert source.preset is not None
    key = PRESET.key(asdict(source))
    found = PRESET.lookup(cache, source.preset, key)
    if found is not None:
        return ResolvedSource(found, key, cached=True)
    from builder.source.tiny import write_preset_checkpoint  # torch/transformers only when it is written

    written = PRESET.run(cache, source.preset, key, lambda tmp: write_preset_checkpoint(tmp, source.preset, seed=source.seed))
    return ResolvedSource(written, key, cached=False)


def checkpoint_fingerprint(directory: Path) -> str:
    """Small files by content, large weight files by name, size and modification time.

    Hashing tens of gigabytes of weights on every build would take minutes; any copy, conversion
    or download changes size or mtime.
    """
    digest = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        stat = path.stat()
        digest.update(path.relative_to(directory).as_posix().encode())
        if stat.st_size < 1_000_000:
            digest.update(path.read_bytes())
        else:
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]
