"""The ``stemdask`` command: simulate, ingest, info, validate, calibrate, reconstruct, demo,
cluster, live.

One module per group of subcommands; each adds its parser and runs with the parsed
arguments. The science lives in the Python API (:mod:`stemdask.methods`,
:func:`stemdask.reconstruct.reconstruct` …): ``reconstruct``'s method options and ``demo``'s
defaults are built from it, and only for the command being run, so that ``stemdask
--version`` and ``--help`` import nothing heavy.

Errors: a :class:`~stemdask.errors.UserError` (a file, store, option or cluster problem) or
an ``OSError`` is one line ``stemdask CMD: error: …`` and exit status 2; anything else is a
stemdask bug and keeps its traceback. ``--debug`` shows the traceback of every error.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from .. import __version__
from ..errors import UserError
from . import calibrate, info, live, make_store, reconstruct
from .common import CLIError, common_options

#: Commands that compute, hence connect to ``--cluster`` first.
COMPUTING = ("simulate", "ingest", "calibrate", "reconstruct")


def build_parser(command: str | None = None) -> tuple[argparse.ArgumentParser, dict]:
    """The parser and its subcommand parsers by name. ``command``: build the options that need
    the Python API (``reconstruct``'s methods, ``demo``'s defaults) only for that command
    (None: for every command)."""
    parser = argparse.ArgumentParser(
        prog="stemdask", description="4D-STEM phase-contrast imaging from electron events, on Dask.")
    parser.add_argument("--version", action="version", version=f"stemdask {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = common_options()
    return parser, {**reconstruct.add_parsers(sub, common, full=lambda name: command in (None, name)),
                    **make_store.add_parsers(sub, common), **info.add_parsers(sub, common),
                    **calibrate.add_parser(sub, common), **live.add_parser(sub, common)}


def _command_of(argv: list[str]) -> str | None:
    """The subcommand named in ``argv`` (its first word that is not an option), or None."""
    return next((a for a in argv if not a.startswith("-")), None)


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; an unknown option is reported against its subcommand (exit 2)."""
    parser, commands = build_parser(_command_of(argv) or "")
    args, extra = parser.parse_known_args(argv)
    if extra:
        name = " ".join(filter(None, [args.command, getattr(args, "action", None)]))
        commands.get(name, parser).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def worker_death_message(e, client) -> str:
    """One line for a worker that died under a computation — ``distributed.KilledWorker``, or a
    result cancelled because a worker died with the data it needed: which task, and how much
    memory per worker to give instead (the usual cause: a task's memory passed the nanny's
    terminate threshold, and the worker was restarted). The suggestion doubles the room a
    worker has for tasks: the limit at the terminate fraction, less what a worker process holds
    at rest (measured now on the surviving workers, else ≈ 250 MB)."""
    import dask
    from dask.utils import format_bytes

    worker = getattr(e, "last_worker", None)
    limit = getattr(worker, "memory_limit", None)
    rest = []
    if client is not None:
        infos = client.scheduler_info().get("workers", {}).values()
        limit = limit or max((w.get("memory_limit") or 0 for w in infos), default=0) or None
        try:
            rest = list(client.run(_rss_now, on_error="ignore").values())
        except Exception:  # a cluster too broken to answer: no measurement
            rest = []
    if type(e).__name__ == "KilledWorker":
        where = (f"Dask workers died {e.allowed_failures + 1} times running task {e.task!r} (last on "
                 f"{getattr(worker, 'address', worker)}), most likely out of memory")
    else:
        where = f"a Dask worker died with data that {e.key!r} needed ({e.reason}), most likely out of memory"
    if not limit:
        return (f"{where}: worker memory limit unknown; use a cluster profile with more memory per worker "
                "(memory_limit), or lower the dask config stemdask.chunk-bytes")
    terminate = dask.config.get("distributed.worker.memory.terminate", 0.95) or 1.0
    at_rest = max(rest) if rest else 250e6
    room = max(terminate * limit - at_rest, 0.05 * limit)
    wanted = (at_rest + 2 * room) / terminate
    return (f"{where}: worker memory limit {format_bytes(limit)}, of which a worker holds "
            f"{format_bytes(at_rest)} at rest{'' if rest else ' (assumed)'}; raise memory_limit in the cluster "
            f"profile by {format_bytes(wanted - limit)} to at least {format_bytes(wanted)} per worker (twice the "
            f"room for tasks), or give each worker fewer threads, or lower the dask config stemdask.chunk-bytes")


def _rss_now() -> int:
    """This process's resident memory (bytes)."""
    import psutil

    return psutil.Process().memory_info().rss


def _run(args) -> int:
    if args.command not in COMPUTING:
        return args.func(args)
    from ..cluster import connect

    with connect(args.cluster, timeout=args.cluster_timeout) as client:
        try:
            return args.func(args)
        except Exception as e:
            if _worker_died(e):
                raise CLIError(worker_death_message(e, client)) from None
            if isinstance(e, MemoryError) and client is not None:  # the scheduler's "more than memory_limit"
                said = " ".join(str(e).split()).rstrip(".")
                raise CLIError(f"{said}: raise memory_limit in the cluster profile, or give each worker fewer "
                               "threads") from None
            raise


def _worker_died(e: Exception) -> bool:
    """Whether ``e`` is distributed's word for a worker that died under the computation."""
    name = type(e).__name__
    lost = name == "FutureCancelledError" and getattr(e, "reason", "") == "lost dependencies"
    return name == "KilledWorker" or lost


def main(argv=None) -> int:
    args = parse(sys.argv[1:] if argv is None else list(argv))
    try:
        with warnings.catch_warnings():
            if not args.debug:  # a warning is one line too, naming the command (--debug: where it came from)
                warnings.showwarning = lambda message, *_, **__: print(
                    f"stemdask {args.command}: warning: {' '.join(str(message).split())}", file=sys.stderr)
            return _run(args)
    except (UserError, OSError) as e:
        if args.debug:
            raise
        print(f"stemdask {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"stemdask {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(e: Exception) -> str:
    """The message of a user error; an ``OSError`` as ``FILE: what the system said``."""
    if isinstance(e, OSError) and not isinstance(e, UserError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return str(e)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
