"""Atomic publish: a finished staging directory replaces ``model_repository/`` in one step.

On Linux the two directories are swapped with ``renameat2(RENAME_EXCHANGE)``, so at every instant
the path holds either the whole old repository or the whole new one; a build killed at any point
leaves the last good repository in place. Leftover staging directories are removed next time.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import tempfile
from contextlib import contextmanager
from collections.abc import Iterator
from pathlib import Path

from builder.errors import BuildError

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def staging_prefix(output: Path) -> str:
    return f".{output.name}.staging-"


@contextmanager
def staging_directory(output: Path) -> Iterator[Path]:
    """A fresh directory beside ``output`` (same filesystem, so the swap is a rename); removed on failure."""
    output = output.resolve()
    parent = output.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        for stale in parent.glob(staging_prefix(output) + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=staging_prefix(output), dir=parent))
    except OSError as exc:
        raise BuildError(f"cannot write the repository next to {output}: {exc.strerror or exc}") from None
    try:
        yield staging
    except OSError as exc:  # e.g. a full disk: the previous repository stays as it was
        shutil.rmtree(staging, ignore_errors=True)
        where = f" ({exc.filename})" if exc.filename else ""
        raise BuildError(f"cannot write the repository next to {output}: {exc.strerror or exc}{where}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def publish(staging: Path, output: Path) -> None:
    output = output.resolve()
    if not output.exists():
        os.rename(staging, output)
        return
    if not output.is_dir():
        raise BuildError(f"{output} exists and is not a directory")
    if _exchange(staging, output):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the previous repository
        return
    # No renameat2 (not Linux, or an old kernel/filesystem): two renames, a moment without a repository.
    previous = staging.with_name(staging.name + "-previous")
    os.rename(output, previous)
    os.rename(staging, output)
    shutil.rmtree(previous, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    result = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    return result == 0
