"""Writing an output folder safely: one writer at a time, atomic replacement, no unsafe
targets, and cleanup of what killed runs left behind.

Every command that writes a store (``ingest``, ``reconstruct``, ``simulate``) does it inside
an :class:`OutputSlot` on its output ``OUT``. Names it uses, all beside ``OUT``:

``OUT.lock``
    JSON ``{pid, host, started, argv}``, created exclusively (``O_CREAT | O_EXCL``): one writer
    per output. A lock whose process is gone (same host, PID not running) is *stale*: the next
    run removes it and says so. A live lock, or one from another host, refuses the run.
``OUT.partial-HOST-PID``
    the new output while it is written (this run's own: host and PID in the name). Any other
    ``.partial`` — a user's folder, another run's — is never deleted; only a stale one (its
    host is this one, its PID dead) is removed.
``OUT.aside-HOST-PID``
    the old output while it is replaced.

Replacement (``--overwrite``): write ``OUT.partial-…``; rename ``OUT`` → ``OUT.aside-…``;
rename the partial → ``OUT``; delete the aside. Each rename is atomic, so a kill at any step
leaves the old output at ``OUT``, the new one at ``OUT``, or — between the renames — both
complete beside it; the next run on ``OUT`` (under the lock) then renames the aside back, so
the old data are intact. Refusals (an output inside a Zarr store, equal to or inside an input,
holding an input, or an existing folder of another kind) happen on entering the slot, before
any computation.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from os import replace as _replace
from pathlib import Path

from .errors import InvalidParameter, UserError
from .store import check_replaceable

HOST = socket.gethostname()
#: Prefix of the per-run scratch folders of ingest (beside the output), ``PREFIX-HOST-PID-xxxx``.
SCRATCH_PREFIX = ".stemdask-scratch"


#: Seconds a removed partial must stay absent before a failed run gives up its output.
_QUIET_S = 0.5


class OutputFolderError(UserError, FileNotFoundError):
    """The folder an output would go into does not exist (it is never created: a typo in a
    path must not create folders, e.g. at the filesystem root)."""


class OutputBusyError(UserError, FileExistsError):
    """Another live run holds the output's lock."""


def run_tag(pid: int | None = None, host: str = HOST) -> str:
    """``HOST-PID``: what names this run's own partial, aside and scratch folders."""
    return f"{host}-{os.getpid() if pid is None else pid}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def owner_is_gone(tag: str) -> bool:
    """True if the run named by ``HOST-PID`` ran on this host and its process is gone."""
    host, _, pid = tag.rpartition("-")
    return host == HOST and pid.isdigit() and not _alive(int(pid))


def leftovers(out: str | os.PathLike) -> list[tuple[Path, bool]]:
    """What earlier runs left beside ``out``: ``(path, stale)`` for its lock, partials, asides
    and scratch folders; ``stale`` when the run that made it is gone (safe to remove)."""
    out = Path(out)
    found = []
    parent = out.parent if out.parent.exists() else None
    for p in sorted(parent.iterdir()) if parent else []:
        if p.name == out.name + ".lock":
            found.append((p, _lock_is_stale(p)))
        elif p.name.startswith((out.name + ".partial", out.name + ".aside-")):
            tag = p.name.split(".partial-", 1)[-1] if ".partial-" in p.name else p.name.split(".aside-", 1)[-1]
            found.append((p, p.name != out.name + ".partial" and owner_is_gone(tag)))
        elif p.name.startswith(SCRATCH_PREFIX + "-"):
            tag = p.name[len(SCRATCH_PREFIX) + 1 :].rpartition("-")[0]
            found.append((p, owner_is_gone(tag)))
    return found


@contextlib.contextmanager
def _folder_locked(folder: Path):
    """An exclusive ``flock`` on ``folder`` (held briefly: one run's lock check-and-create)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the flock


def _lock_is_stale(lock: Path) -> bool:
    try:
        info = json.loads(lock.read_text())
        return info["host"] == HOST and not _alive(int(info["pid"]))
    except (OSError, ValueError, KeyError, TypeError):
        return False  # unreadable: maybe being written right now; never guess


def check_target(out: Path, inputs=()) -> None:
    """Refuse an output that would land inside a Zarr store, on or inside an input, or hold one."""
    out = out.resolve()
    for parent in out.parents:
        if (parent / "zarr.json").is_file():
            raise InvalidParameter(f"{out}: is inside the Zarr store {parent}; choose an output outside it")
    for inp in inputs:
        inp = Path(inp).resolve()
        if out == inp:
            raise InvalidParameter(f"{out}: the output is the input {inp}; choose another output path")
        if inp in out.parents:
            raise InvalidParameter(f"{out}: the output is inside the input {inp}; choose another output path")
        if out in inp.parents:
            raise InvalidParameter(f"{out}: the output folder holds the input {inp}; choose another output path")


class OutputSlot:
    """Context manager owning output ``out`` for one run (see the module docstring).

    ``kind``: the ``format`` attr an existing ``out`` must carry to be replaced;
    ``overwrite``: replace an existing ``out``; ``inputs``: paths the run reads (never
    written over); ``in_place``: write straight into ``out`` unless replacing it (ingest, so
    that ``--resume`` finds and finishes an interrupted store there; the caller refuses an
    existing ``out`` it is not asked to resume). On entry: check the target, take the lock,
    clean up stale leftovers (printed on stderr and kept in ``notes``), refuse an existing
    output unless ``overwrite``/``in_place``. ``target`` is where to write; call
    :meth:`commit` when the new output is complete. On an exception this run's partial is
    removed and the old output stays.
    """

    def __init__(self, out, *, kind: str, overwrite: bool = False, inputs=(), in_place: bool = False):
        self.out = Path(out)
        self.kind, self.overwrite, self.inputs, self.in_place = kind, overwrite, tuple(inputs), in_place
        self.lock = self.out.with_name(self.out.name + ".lock")
        self.partial = self.out.with_name(f"{self.out.name}.partial-{run_tag()}")
        self.aside = self.out.with_name(f"{self.out.name}.aside-{run_tag()}")
        self.notes: list[str] = []
        self.target = self.out if in_place else self.partial

    def __enter__(self) -> "OutputSlot":
        check_target(self.out, self.inputs)
        parent = self.out.resolve().parent
        if not parent.is_dir():
            raise OutputFolderError(f"{self.out}: the folder {parent} does not exist (stemdask creates only the "
                                    "output itself, not the folders above it)")
        self._acquire()
        try:
            self._recover()
            for note in self.notes:
                print(f"stemdask: {note}", file=sys.stderr)
            if self.out.exists():
                if self.overwrite:
                    check_replaceable(self.out, self.kind)
                    self.target = self.partial
                elif not self.in_place:
                    raise FileExistsError(f"{self.out} already exists (use --overwrite to replace it)")
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, exc_type, exc, tb):
        try:
            if self.target == self.partial and (exc_type is not None or self.partial.exists()):
                self._remove_partial()
        finally:
            self._release()

    def _remove_partial(self) -> None:
        """Remove this run's uncommitted partial. After a failed compute, tasks already running
        may still write into it for a moment (dask does not wait for them), so it must stay
        gone for :data:`_QUIET_S` before we trust it; never mask the run's own error. What
        cannot be removed is stale once this process ends, and the next run removes it."""
        deadline, quiet_since = time.monotonic() + 10 * _QUIET_S, None
        while time.monotonic() < deadline:
            if self.partial.exists():
                shutil.rmtree(self.partial, ignore_errors=True)
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since >= _QUIET_S:
                return
            time.sleep(0.05)
        print(f"stemdask: could not remove {self.partial}; the next run on {self.out} will", file=sys.stderr)

    def commit(self) -> Path:
        """Move the new output (written at :attr:`target`) to ``out``, replacing the old one."""
        if self.target == self.out:
            return self.out
        if self.out.exists():
            check_replaceable(self.out, self.kind)
            _replace(self.out, self.aside)
        _replace(self.partial, self.out)
        if self.aside.exists():
            shutil.rmtree(self.aside)
        return self.out

    # ------------------------------------------------------------------ lock
    def _acquire(self) -> None:
        doc = json.dumps({"pid": os.getpid(), "host": HOST, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                          "argv": sys.argv})
        # Serialised through the folder's flock: between one run finding a lock stale and
        # removing it, another could have taken it over and written its own lock there.
        with _folder_locked(self.lock.parent):
            for _ in range(2):
                try:
                    fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    if _lock_is_stale(self.lock):
                        self.lock.unlink(missing_ok=True)
                        self.notes.append(f"removed the stale lock {self.lock} (its process is gone)")
                        continue
                    raise OutputBusyError(self._busy_message()) from None
                with os.fdopen(fd, "w") as f:
                    f.write(doc)
                return
        raise OutputBusyError(self._busy_message())

    def _busy_message(self) -> str:
        try:
            info = json.loads(self.lock.read_text())
            who = f"PID {info['pid']} on {info['host']} since {info['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            who = "another run (its lock file is unreadable)"
        return (f"{self.out} is being written by {who} (lock {self.lock}); wait for it to finish, "
                f"or delete the lock if that process is gone")

    def _release(self) -> None:
        try:
            if json.loads(self.lock.read_text()).get("pid") == os.getpid():
                self.lock.unlink()
        except (OSError, ValueError):
            pass

    # ------------------------------------------------------------------ cleanup
    def _recover(self) -> None:
        """Under the lock: undo an interrupted replacement, remove stale partials and scratch."""
        for path, stale in leftovers(self.out):
            if path == self.lock or not stale:
                continue
            if ".aside-" in path.name and not self.out.exists():
                _replace(path, self.out)
                self.notes.append(f"restored {self.out} from {path.name} (a replacement was interrupted)")
            else:
                shutil.rmtree(path, ignore_errors=True)
                self.notes.append(f"removed {path} (left by an interrupted run)")
