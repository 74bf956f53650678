"""The result record and the one writer of files that must never be seen half-written.

``<runs-dir>/<run_id>/result.json`` exists only for a finished run (written last, atomically);
a failed run leaves ``error.json`` instead (a run stopped by bad input leaves neither). Leaderboards are rendered
only from these records.
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

from harmbench_ft.errors import StorageError, UsageError

RESULT_VERSION = 1
RESULT_FILE = "result.json"
ERROR_FILE = "error.json"
GENERATIONS_FILE = "generations.jsonl"
LIBRARIES = ("hft-bench", "torch", "transformers", "peft", "datasets", "pluggy", "safetensors", "vllm", "ray")


def storage_error(exc: OSError, what: str) -> UsageError | StorageError:
    """The one line for a failed write: a path that is (or lies under) a file, or a file given where a folder is
    needed, is the input's fault (exit 2); permissions, a read-only or immutable file system, a full disk are the
    environment's (exit 1)."""
    if isinstance(exc, IsADirectoryError):
        return UsageError(f"{what}: it is a folder; give a file name")
    if isinstance(exc, (FileExistsError, NotADirectoryError)):
        return UsageError(f"{what}: it, or a folder above it, is a file")
    return StorageError(f"{what}: {exc.strerror or exc}")


def writable_dir(path: Path, what: str) -> Path:
    """Create `path` if needed and check this process can write into it, before any work that would write there,
    so a bad --runs-dir or --out stops in one line instead of a traceback mid-run."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise NotADirectoryError(20, "Not a directory", str(path))
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".hft-bench-write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise storage_error(exc, f"{what} {path} is not a folder that can be written") from None
    return path


def write_atomic(path: Path, text: str | bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over the target."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") if isinstance(text, bytes) else os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(exc, OSError):
            raise storage_error(exc, f"cannot write {path}") from None
        raise


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


def read_jsonl(path: Path, required: tuple[str, ...] = (), check: Callable[[dict[str, Any]], str | None] | None = None) -> list[dict[str, Any]]:
    """Every row of a JSONL file (one JSON object a line, blank lines skipped), each with the `required` keys and
    passing `check` (which returns a problem or None), or a one-line error naming the file, the line and what is
    wrong with it (a truncated line, bytes that are not UTF-8, a key missing in a later row)."""
    rows = []
    with Path(path).open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UsageError(f"{path}:{lineno}: not UTF-8 text (byte {raw[exc.start]:#04x} at column {exc.start + 1})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path}:{lineno}: not valid JSON ({exc.msg}, column {exc.colno}); each line must be one JSON object") from None
            if not isinstance(row, dict):
                raise UsageError(f"{path}:{lineno}: expected a JSON object with keys {list(required)}, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise UsageError(f"{path}:{lineno}: missing key(s) {missing}; every row needs {list(required)} (has {sorted(row)})")
            problem = check(row) if check is not None else None
            if problem:
                raise UsageError(f"{path}:{lineno}: {problem}")
            rows.append(row)
    return rows


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


def machine() -> dict[str, Any]:
    """The processor a number was computed on. One spec's floats differ in their last bits from one instruction
    set to another (AVX-512 against AVX2, a GPU against a CPU), so a record names where it ran, and each stage
    where its artifact was built (docs/leaderboard.md, "One spec on two machines")."""
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def provenance() -> dict[str, Any]:
    return {
        "libraries": library_versions(),
        "git": git_revision(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": machine(),
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
