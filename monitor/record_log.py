"""The monitor's record file: every accepted record as a JSON line, so that a restarted monitor takes up
its windows where it left them, and `python -m histoserve.monitor report` can look back over the history.

A file that outgrows `max_bytes` is renamed to `<name>.1` (replacing the previous one) and a new one is
started, so the disk holds at most about twice `max_bytes`. On start the monitor replays `<name>.1`
then `<name>`: each model version's window is refilled with its last records. A line cut short by a
crash (or any unreadable line) is skipped and counted, never fatal; the next append starts on a fresh
line so it cannot glue a new record onto the broken one. A write that fails (disk full) raises, and
the next append starts on a fresh line too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from histoserve.formats.records import PredictionRecord, read_records


class RecordLog:
    def __init__(self, path: str | Path, max_bytes: int = 64 * 2**20):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.path, self.max_bytes = Path(path), max_bytes
        self.skipped: list[str] = []  # "file:line: why", for lines replay could not read
        self.cut_short = False  # the last append failed part-way
        self.handle = self.open()

    @property
    def previous(self) -> Path:
        return self.path.with_name(self.path.name + ".1")

    def open(self):
        # Unbuffered: a failed write leaves nothing in a buffer to be written again later.
        handle = open(self.path, "a+b", buffering=0)  # noqa: SIM115 (lives as long as the log)
        if handle.seek(0, os.SEEK_END) > 0:
            handle.seek(-1, os.SEEK_END)
            self.cut_short = handle.read(1) != b"\n"  # a crash mid-write: never append onto that line
        return handle

    def append(self, records: list[PredictionRecord]) -> None:
        """Appends the records; an OSError (disk full, file too large) propagates."""
        if not records:
            return
        data = memoryview((b"\n" if self.cut_short else b"") + "".join(json.dumps(r.to_dict()) + "\n" for r in records).encode())
        try:
            while data:
                data = data[self.handle.write(data):]
        except OSError:
            self.cut_short = True
            raise
        self.cut_short = False
        if self.handle.tell() >= self.max_bytes:
            self.handle.close()
            os.replace(self.path, self.previous)
            self.handle = self.open()

    def replay(self) -> Iterator[PredictionRecord]:
        """The records of `<name>.1`, then of `<name>`, oldest first; unreadable lines go to `skipped`."""
        for path in (self.previous, self.path):
            if path.exists():
                yield from read_records(path, self.skipped)

    def close(self) -> None:
        self.handle.close()
