"""Writing a file so that a reader sees the old content or the new one, never half of it: the content
goes to a temporary file in the same folder, which is renamed over the target (one `rename`, atomic on
POSIX) and removed if anything fails on the way. Model repositories, checkpoints, manifests and slide
results are all written this way."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomically(path: str | os.PathLike, content: str | bytes | Callable[[BinaryIO], object], mode: int = 0o644) -> None:
    """`content`: text (UTF-8), bytes, or a function that writes to the open binary file (torch.save)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            if isinstance(content, str):
                handle.write(content.encode())
            elif isinstance(content, bytes):
                handle.write(content)
            else:
                content(handle)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
