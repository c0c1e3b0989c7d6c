"""Where a batch run's rows go: a CSV or JSON Lines file, appended to row by row and resumed from."""

from __future__ import annotations

import csv
import json
import sys
import time
from pathlib import Path

from .rows import FORMATS, ClassifyError, ModelId, Row


class RowWriter:
    """Rows appended to a CSV or JSON Lines file, each flushed as it is written."""

    def __init__(self, path: Path, k: int):
        self.path, self.k = path, k
        self.format = FORMATS.get(path.suffix.lower())
        if self.format is None:
            raise ClassifyError(f"output {path}: name it .csv or .jsonl to pick the format")
        self.handle = None

    def columns(self) -> list[str]:
        pairs = [f"{kind}_{i}" for i in range(1, self.k + 1) for kind in ("label", "probability")]
        return ["path", *pairs, "make", "make_probability", "accepted", "accepted_level", "reason", "model", "version",
                "sha256", "error"]

    def done(self, model: ModelId) -> set[str]:
        """Paths already in the file scored by this model; drops a last row cut off by a kill."""
        if not self.path.exists():
            return set()
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise ClassifyError(f"cannot read {self.path} to resume: {exc.strerror or exc}") from None
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            with open(self.path, "r+b") as fh:
                fh.truncate(keep)
            data = data[:keep]
        text = data.decode("utf-8", errors="replace")
        seen = set()
        if self.format == "csv":
            records = csv.DictReader(text.splitlines())
            if records.fieldnames and "path" not in records.fieldnames:
                raise ClassifyError(f"{self.path} is not a whatcar output (no 'path' column); choose another name")
            if records.fieldnames and records.fieldnames != self.columns():
                raise ClassifyError(f"{self.path} has other columns than this run writes (another --top-k, or "
                                    "another version of whatcar); choose another output name")
            for record in records:
                if record.get("sha256") == model.sha256:
                    seen.add(record["path"])
        else:
            for number, line in enumerate(text.splitlines(), 1):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise ClassifyError(f"{self.path} line {number} is not JSON; choose another output name") from None
                if record.get("model", {}).get("sha256") == model.sha256:
                    seen.add(record["path"])
        return seen

    def open(self) -> None:
        fresh = not self.path.exists() or self.path.stat().st_size == 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.path, "a", encoding="utf-8", newline="")
        except OSError as exc:
            raise ClassifyError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        if self.format == "csv":
            self.writer = csv.writer(self.handle, lineterminator="\n")
            if fresh:
                self.writer.writerow(self.columns())
                self.handle.flush()

    def write(self, row: Row, model: ModelId) -> None:
        if self.format == "csv":
            pairs = [value for label, probability in row.predictions for value in (label, f"{probability:.6f}")]
            pairs += [""] * (2 * self.k - len(pairs))
            accepted = "" if row.accepted is None else str(row.accepted).lower()
            make, make_probability = (row.make[0], f"{row.make[1]:.6f}") if row.make is not None else ("", "")
            self.writer.writerow([row.path, *pairs, make, make_probability, accepted, row.accepted_level or "",
                                  row.reason or "", model.name, model.version, model.sha256, row.error or ""])
        else:
            self.handle.write(json.dumps({
                "path": row.path,
                "predictions": [{"label": label, "probability": p} for label, p in row.predictions],
                "make": {"label": row.make[0], "probability": row.make[1]} if row.make is not None else None,
                "accepted": row.accepted, "accepted_level": row.accepted_level, "reason": row.reason,
                "model": {"name": model.name, "version": model.version, "sha256": model.sha256},
                "error": row.error}) + "\n")
        self.handle.flush()

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


class Progress:
    """A one-line progress bar on a terminal (nothing otherwise), and the summary at the end."""

    def __init__(self, total: int, stream=sys.stderr):
        self.total, self.stream = total, stream
        self.live = stream.isatty()
        self.scored = self.failed = 0
        self.levels = {"model": 0, "make": 0}  # answers named at each level
        self.started = self.shown = time.monotonic()

    def add(self, row: Row) -> None:
        if row.error:
            self.failed += 1
        else:
            self.scored += 1
            if row.accepted_level in self.levels:
                self.levels[row.accepted_level] += 1
        now = time.monotonic()
        if self.live and (now - self.shown > 0.2 or self.scored + self.failed == self.total):
            self.shown = now
            done = self.scored + self.failed
            rate = done / max(now - self.started, 1e-9)
            left = (self.total - done) / rate if rate else 0
            width = 30
            bar = "#" * int(width * done / self.total)
            self.stream.write(f"\r[{bar:<{width}}] {done}/{self.total} files  {rate:.1f} images/s  "
                              f"{int(left) // 60}:{int(left) % 60:02d} left ")
            self.stream.flush()

    def summary(self, skipped: int, interrupted: bool = False) -> str:
        elapsed = time.monotonic() - self.started
        done = self.scored + self.failed
        line = (f"{'interrupted: ' if interrupted else ''}scored {self.scored}, failed {self.failed}"
                f"{f', skipped {skipped} already done' if skipped else ''} in {elapsed:.1f} s "
                f"({done / elapsed if elapsed else 0:.1f} images/s)")
        if any(self.levels.values()):
            line += (f"; named the model for {self.levels['model']}, only the make for {self.levels['make']}, "
                     f"turned away {self.scored - sum(self.levels.values())}")
        if self.live:
            self.stream.write("\r" + " " * 90 + "\r")
        return line


