"""Results written to an OpenAI Batch API output file (JSONL), one record per input line.

Records follow OpenAI's batch output format. Extensions: each choice's `token_ids` (the
generated token ids), a completion's `metrics`; an error record's `error.line` (the input
line it answers).

`BatchOutput` appends records one whole line at a time, so a run killed at any point
leaves at most a torn last line, which the next run cuts off before it resumes. A run
knows what is already done from `done_ids` (custom_ids with a record) and `done_lines`
(input lines answered by an error record). A line whose custom_id repeats an earlier
line's gets a "duplicate_custom_id" record that keeps the id but answers only for its line.

An exclusive `flock` on the sidecar `<output>.lock` makes a second run pointed at the same
output refuse to start. `close` removes the lock file; a run that is killed leaves it
behind, unlocked (the kernel drops a dead process's flock), and the next run simply takes
it. A run that locked a lock file just removed by its owner sees that the path no longer
names the file it holds, and opens the path again.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import uuid
from pathlib import Path

from ..errors import MpiserveError
from .choices import Choice
from .input_file import BatchItem

FINISH_REASONS = ("stop", "length")
CLIENT_FAULTS = ("invalid_request", "duplicate_custom_id")     # status 400; other codes 500


class BatchOutputError(MpiserveError):
    """The output file is in use by another run, or cannot be appended to safely."""


def completion_record(item: BatchItem, request_id, choices: list[Choice], prompt_tokens: int,
                      metrics: dict, model: str) -> dict:
    """The record of a request that ran to completion."""
    return {
        "id": f"batch_req_{request_id}",
        "custom_id": item.custom_id,
        "response": {"status_code": 200, "request_id": str(request_id),
                     "body": completion_body(item, request_id, choices, prompt_tokens, metrics,
                                             model)},
        "error": None,
    }


def completion_body(item: BatchItem, request_id, choices: list[Choice], prompt_tokens: int,
                    metrics: dict, model: str) -> dict:
    """The OpenAI completion (or chat completion) object of a finished request."""
    prefix, kind = ("chatcmpl", "chat.completion") if item.kind == "chat" else (
        "cmpl", "text_completion")
    generated = sum(len(choice.token_ids) for choice in choices)
    body = {
        "id": f"{prefix}-{request_id}",
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [_choice(item, index, choice) for index, choice in enumerate(choices)],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": generated,
            "total_tokens": prompt_tokens + generated,
        },
        "metrics": dict(metrics),
    }
    return body


def _choice(item: BatchItem, index: int, choice: Choice) -> dict:
    if choice.finish_reason not in FINISH_REASONS:
        raise ValueError(f"finish_reason must be one of {FINISH_REASONS}, "
                         f"got {choice.finish_reason!r}")
    if item.kind == "chat":
        shown = {"index": index, "message": {"role": "assistant", "content": choice.text}}
    else:
        shown = {"index": index, "text": choice.text}
    shown.update(logprobs=choice.logprobs, finish_reason=choice.finish_reason,
                 token_ids=list(choice.token_ids))
    return shown


def error_record(item_or_custom_id: BatchItem | str | None, message: str,
                 code: str = "invalid_request") -> dict:
    """The record of a request that failed: status 400 for the `CLIENT_FAULTS`, else 500.

    Given a `BatchItem`, the record carries its input line as `error.line`. A record
    without a custom_id (the line had none usable) has no `response`.
    """
    if isinstance(item_or_custom_id, BatchItem):
        custom_id, line = item_or_custom_id.custom_id, item_or_custom_id.line_no
    else:
        custom_id, line = item_or_custom_id, None
    request_id = uuid.uuid4().hex
    error = {"code": code, "message": message}
    if line is not None:
        error["line"] = line
    response = None
    if custom_id is not None:
        client_fault = code in CLIENT_FAULTS
        response = {
            "status_code": 400 if client_fault else 500,
            "request_id": request_id,
            "body": {"error": {
                "message": message,
                "type": "invalid_request_error" if client_fault else "server_error",
                "param": None,
                "code": code,
            }},
        }
    return {"id": f"batch_req_{request_id}", "custom_id": custom_id, "response": response,
            "error": error}


class BatchOutput:
    """The output JSONL of one run, locked against other runs and opened for appending."""

    def __init__(self, path: str | Path, fsync: bool = False):
        self.path = Path(path)
        self.done_ids: set[str] = set()
        self.done_lines: set[int] = set()
        self._fsync = fsync
        _check_writable(self.path)
        self._lock = _lock(self.path)
        try:
            good_bytes = self._scan()
            self._file = open(self.path, "ab")
            self._file.truncate(good_bytes)
        except BaseException:
            self._lock.close()
            raise

    def is_done(self, item: BatchItem) -> bool:
        """Whether the output already answers this input line."""
        if item.custom_id is None or item.duplicate_of is not None:
            return item.line_no in self.done_lines
        return item.custom_id in self.done_ids

    def write(self, record: dict) -> None:
        """Append one record as one whole line and flush it (and fsync if asked)."""
        self._file.write(json.dumps(record).encode() + b"\n")
        self._file.flush()
        if self._fsync:
            os.fsync(self._file.fileno())
        self._remember(record)

    def close(self) -> None:
        """Close the output and remove the lock file (unlinked while still held)."""
        self._file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._lock.name)
        self._lock.close()

    def __enter__(self) -> BatchOutput:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _scan(self) -> int:
        """Read the records already written; return the size of the intact part."""
        good_bytes = 0
        if not self.path.exists():
            return good_bytes
        with open(self.path, "rb") as file:
            for line_no, raw in enumerate(file, 1):
                record = _parse_record(raw)
                if record is None:
                    if file.read(1):
                        raise BatchOutputError(
                            f"{self.path} line {line_no} is not a JSON record and is not the "
                            "last line; refusing to append to a corrupted output")
                    break
                self._remember(record)
                good_bytes += len(raw)
        return good_bytes

    def _remember(self, record: dict) -> None:
        error = record.get("error") if isinstance(record.get("error"), dict) else {}
        if "line" in error:
            self.done_lines.add(error["line"])
        if record.get("custom_id") is not None and error.get("code") != "duplicate_custom_id":
            self.done_ids.add(record["custom_id"])


def _parse_record(raw: bytes) -> dict | None:
    """The record on one line, or None if the line is torn or not a JSON object."""
    if not raw.endswith(b"\n"):
        return None
    try:
        record = json.loads(raw)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def _check_writable(path: Path) -> None:
    """Refuse an output that is a directory or lies in a missing or read-only directory."""
    if path.is_dir():
        raise BatchOutputError(f"output {path} is a directory; name a file")
    folder = path.parent
    if not folder.is_dir():
        raise BatchOutputError(f"output {path}: directory {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path,
                                                                                    os.W_OK)):
        raise BatchOutputError(f"output {path} is not writable")


LOCK_ATTEMPTS = 5


def _lock(path: Path):
    """Hold an exclusive lock on `<path>.lock` for as long as the returned file is open."""
    lock_path = f"{path}.lock"
    for _ in range(LOCK_ATTEMPTS):
        handle = _locked_file(path, lock_path)
        if _still_named(handle, lock_path):
            return handle
        handle.close()                     # its owner removed it as we locked it: try anew
    raise BatchOutputError(f"cannot lock {lock_path} for output {path}: it is removed and "
                           f"created again by other runs ({LOCK_ATTEMPTS} attempts)")


def _locked_file(path: Path, lock_path: str):
    handle = open(lock_path, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise BatchOutputError(
            f"{path} is being written by another run (it holds {lock_path}); "
            "wait for it to finish or choose another output") from None
    except OSError as err:
        handle.close()
        raise BatchOutputError(
            f"cannot lock {lock_path} for output {path}: {err.strerror} "
            "(the file system may not support flock)") from err
    return handle


def _still_named(handle, lock_path: str) -> bool:
    """Whether `lock_path` still names the file `handle` has open."""
    try:
        named = os.stat(lock_path)
    except FileNotFoundError:
        return False
    held = os.fstat(handle.fileno())
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)
