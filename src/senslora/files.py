"""Reading JSON Lines, and writing files so that a failure never leaves a half-written result
behind."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically (temporary file, fsync, rename)."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


@contextlib.contextmanager
def staged_outputs(out: str | os.PathLike, names: Sequence[str]) -> Iterator[Path]:
    """Yield a staging folder inside ``out``; when the block succeeds, move the files ``names``
    from it into ``out`` together.

    If the block fails, ``out`` is left as it was (a folder created here is removed again). If
    moving fails or is interrupted half-way, the files already moved are taken back and the
    previous versions restored: ``out`` holds either every new file or the old ones.
    """
    out = Path(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=out, prefix=".tmp-") as tmp:
            staging = Path(tmp)
            yield staging
            missing = [name for name in names if not (staging / name).is_file()]
            if missing:
                raise FileNotFoundError(f"expected the staged outputs {missing} in {staging}")
            _replace_all(staging, out, names)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()  # only if empty
        raise


def _replace_all(staging: Path, out: Path, names: Sequence[str]) -> None:
    """Move ``staging/name`` onto ``out/name`` for every name, all or nothing."""
    previous = staging / ".previous"
    previous.mkdir()
    saved, moved = [], []
    try:
        for name in names:
            if (out / name).exists():
                os.replace(out / name, previous / name)
                saved.append(name)
            os.replace(staging / name, out / name)
            moved.append(name)
    except BaseException:
        for name in moved:
            os.replace(out / name, staging / name)
        for name in saved:
            os.replace(previous / name, out / name)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str | None]]:
    """``(line number, object, problem)`` for every non-blank line of a JSON Lines file: the
    object and None, or None and what is wrong with the line (invalid JSON, not an object).
    Callers decide whether a bad line is an error or a row to count and skip."""
    with path.open(encoding="utf-8-sig") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                yield number, None, f"invalid JSON ({error.msg} at character {error.pos})"
                continue
            if isinstance(record, dict):
                yield number, record, None
            else:
                yield number, None, type(record).__name__
