"""The result record and the one writer of files that must never be seen half-written.

``<runs-dir>/<run_id>/result.json`` exists only for a finished run (written last, atomically);
a failed run leaves ``error.json`` instead. Leaderboards are rendered only from these records.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import importlib.metadata
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

from harmbench_ft.errors import UsageError

RESULT_VERSION = 1
RESULT_FILE = "result.json"
ERROR_FILE = "error.json"
GENERATIONS_FILE = "generations.jsonl"
LIBRARIES = ("hft-bench", "torch", "transformers", "peft", "datasets", "pluggy", "safetensors", "vllm", "ray")


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") if isinstance(text, bytes) else os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


@contextlib.contextmanager
def file_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """An exclusive advisory lock (flock): concurrent runs never build the same thing twice.

    ``on_wait`` is called once if another process holds the lock, before blocking until it is free.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def library_versions() -> dict[str, str | None]:
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_revision() -> dict[str, Any]:
    """The hft-bench source revision and whether the tree had uncommitted changes."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return {"revision": None, "dirty": None}
        status = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10)
        return {"revision": rev.stdout.strip(), "dirty": bool(status.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"revision": None, "dirty": None}


def provenance() -> dict[str, Any]:
    return {
        "libraries": library_versions(),
        "git": git_revision(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


class RecordError(UsageError):
    """A result.json that is not a finished record of this version for the folder it sits in."""


def check_record(record: Any, run_dir: Path) -> dict[str, Any]:
    """A record is trusted only if it is a finished record of this version whose run id is its folder's name.

    The run id is later used as a folder name (leaderboard copies, rejudge), so one read from a file must never
    be a path: an absolute or ``../`` id would write outside the output folder.
    """
    if not isinstance(record, dict):
        raise RecordError(f"{run_dir / RESULT_FILE}: not a JSON object")
    if record.get("version") != RESULT_VERSION:
        raise RecordError(f"{run_dir / RESULT_FILE}: record version {record.get('version')!r}, this hft-bench reads version {RESULT_VERSION}")
    if record.get("status") != "finished":
        raise RecordError(f"{run_dir / RESULT_FILE}: status {record.get('status')!r}, not finished")
    if record.get("run_id") != run_dir.name:
        raise RecordError(f"{run_dir / RESULT_FILE}: run id {record.get('run_id')!r} is not its folder's name {run_dir.name!r}")
    if not isinstance(record.get("metrics"), dict) or not isinstance(record.get("spec"), dict):
        raise RecordError(f"{run_dir / RESULT_FILE}: no metrics or spec")
    return record


def read_result(run_dir: Path) -> dict[str, Any] | None:
    """The run's finished record, None if there is none; a damaged or foreign one is a RecordError."""
    path = run_dir / RESULT_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RecordError(f"{path}: not valid JSON ({exc})") from None
    return check_record(record, run_dir)


def iter_results(runs_dir: Path, on_skip: Callable[[str], None] | None = None) -> Iterator[dict[str, Any]]:
    """Every finished, valid result under a runs directory; any other result.json is skipped and named."""
    for path in sorted(Path(runs_dir).glob(f"*/{RESULT_FILE}")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            yield check_record(record, path.parent)
        except (json.JSONDecodeError, UnicodeDecodeError, RecordError) as exc:
            if on_skip is not None:
                on_skip(f"skipped {path}: {exc}")
