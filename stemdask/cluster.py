"""Connect to a Dask cluster from a profile name, a YAML profile, or a scheduler address.

A profile is YAML with a ``cluster:`` kind and that cluster's keyword arguments::

    cluster: local            # local | local-cuda | slurm | pbs
    n_workers: 2              # ... keyword arguments of the cluster class
    threads_per_worker: 1
    memory_limit: 300MB
    scale: 4                  # optional: jobs to request (slurm, pbs)
    dask:                     # optional: dask config applied while connected
      distributed.worker.memory.spill: 0.6

Kinds: ``local`` → ``distributed.LocalCluster``; ``local-cuda`` →
``dask_cuda.LocalCUDACluster`` (``gpu`` extra); ``slurm``/``pbs`` →
``dask_jobqueue.SLURMCluster``/``PBSCluster`` (``hpc`` extra). Profiles shipped with
stemdask (``cluster_configs/*.yaml``) are found by name, e.g. ``connect("local")``.

Everything stemdask computes picks the active client up (``distributed.default_client``):
graphs, progress bars and per-block ingest jobs all run on it. Rechunks use the ``p2p``
method under distributed (bounded memory for the SSB scan-FFT transpose).

Batch-system clusters fail in one line (:class:`ClusterError`), never a hang: a missing
``sbatch``/``qsub``, a submission the scheduler refuses (its own error line), and no worker
within ``timeout`` seconds (the jobs' ids said; every job submitted is cancelled). The
shipped SLURM/PBS profiles run the worker with ``python: python``, the interpreter the job's
``job_script_prologue`` puts first on PATH (dask-jobqueue's default is this process's own
absolute interpreter, which the prologue cannot change). :func:`job_script` shows what
would be submitted (``stemdask cluster show PROFILE``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from importlib import resources
from pathlib import Path

import dask
import yaml

from .errors import InvalidParameter, MissingExtra, UserError

KINDS = {
    "local": ("distributed", "LocalCluster"),
    "local-cuda": ("dask_cuda", "LocalCUDACluster"),
    "slurm": ("dask_jobqueue", "SLURMCluster"),
    "pbs": ("dask_jobqueue", "PBSCluster"),
}

#: dask settings that matter for stemdask under distributed.
DISTRIBUTED_DEFAULTS = {"array.rechunk.method": "p2p", "optimization.fuse.active": False}
#: The batch systems' submission commands.
SUBMIT = {"slurm": "sbatch", "pbs": "qsub"}
#: Longest wait (s) for the first worker of a batch-system cluster.
DEFAULT_TIMEOUT = 300.0


class ClusterError(UserError, RuntimeError):
    """A cluster that cannot start: one line for the user (the cause, and what was cleaned up)."""


def profile_names() -> list[str]:
    """Names of the profiles shipped with stemdask."""
    return sorted(
        p.name[:-5] for p in resources.files("stemdask.cluster_configs").iterdir() if p.name.endswith(".yaml")
    )


def load_profile(spec: str | os.PathLike) -> dict:
    """Read a profile from a YAML path or a shipped profile name; validate its kind."""
    path = Path(spec)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise FileNotFoundError(f"cluster profile {path} does not exist")
        text = path.read_text()
        where = str(path)
    else:
        res = resources.files("stemdask.cluster_configs") / f"{spec}.yaml"
        if not res.is_file():
            raise InvalidParameter(
                f"unknown cluster profile {spec!r}: not a file, not one of {profile_names()}, "
                f"not a scheduler address (tcp://host:port)"
            )
        text = res.read_text()
        where = f"profile {spec!r}"
    try:
        profile = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InvalidParameter(f"{where}: not valid YAML ({e})") from None
    if not isinstance(profile, dict) or "cluster" not in profile:
        raise InvalidParameter(f"{where}: a profile needs a 'cluster:' kind, one of {sorted(KINDS)}")
    if profile["cluster"] not in KINDS:
        raise InvalidParameter(f"{where}: unknown cluster kind {profile['cluster']!r}; choose from {sorted(KINDS)}")
    return profile


def make_cluster(profile: dict, scale: bool = True):
    """Instantiate the cluster a profile describes; with ``scale``, request its ``scale`` jobs
    (batch systems) or workers. A batch system's submission command must be on PATH."""
    import importlib

    kind = profile["cluster"]
    kwargs = {k: v for k, v in profile.items() if k not in ("cluster", "scale", "dask")}
    module, cls = KINDS[kind]
    try:
        mod = importlib.import_module(module)
    except ImportError:
        extra = {"dask_cuda": "gpu", "dask_jobqueue": "hpc"}.get(module, "")
        raise MissingExtra(f"cluster kind {kind!r} needs {module}: pip install 'stemdask[{extra}]'") from None
    if scale and kind in SUBMIT and shutil.which(SUBMIT[kind]) is None:
        raise ClusterError(
            f"a {kind} cluster submits its workers with {SUBMIT[kind]!r}, which is not on PATH here: "
            "run on the cluster's login node, or choose another --cluster"
        )
    if kind in SUBMIT:
        kwargs["job_cls"] = _closed_on_close(getattr(mod, cls).job_cls)
    cluster = getattr(mod, cls)(**kwargs)
    if scale and profile.get("scale"):
        if kind in SUBMIT:
            cluster.scale(jobs=int(profile["scale"]))
        else:
            cluster.scale(int(profile["scale"]))
    return cluster


def _closed_on_close(job_cls):
    """``job_cls`` whose ``close`` (which cancels the job) also marks it closed: dask-jobqueue
    0.9's leaves it 'running', and distributed's ``SpecCluster.close`` asserts that every worker
    it created has closed — an AssertionError after every run on a batch system."""
    from distributed.core import Status

    class Job(job_cls):
        async def close(self):
            try:
                await super().close()
            finally:
                self.status = Status.closed

    Job.__name__ = Job.__qualname__ = job_cls.__name__
    return Job


def job_script(profile: dict) -> str | None:
    """The job script a batch-system profile would submit (nothing is submitted); None for
    local kinds."""
    if profile["cluster"] not in SUBMIT:
        return None
    cluster = make_cluster(profile, scale=False)
    try:
        return cluster.job_script()
    finally:
        cluster.close()


class _SubmitErrors(logging.Handler):
    """While a cluster starts: keeps the exceptions that distributed logs from its event loop
    (a job submission that failed, with a traceback through tornado) instead of letting them
    reach the terminal — the caller raises them in one line; other records go on as before."""

    LOGGERS = ("tornado.application", "distributed.deploy.spec", "asyncio")

    def __init__(self):
        super().__init__(logging.ERROR)
        self.errors: list[BaseException] = []

    def emit(self, record):
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])
            return
        for handler in self._handlers.get(record.name, ()):  # not an exception: as without us
            if record.levelno >= handler.level:
                handler.handle(record)

    def __enter__(self):
        self._saved, self._handlers = [], {}
        for name in self.LOGGERS:  # distributed gives tornado.application a handler of its own
            log = logging.getLogger(name)
            self._saved.append((log, log.handlers, log.propagate))
            self._handlers[name] = log.handlers or logging.getLogger().handlers
            log.handlers, log.propagate = [self], False
        return self

    def __exit__(self, *exc):
        for log, handlers, propagate in self._saved:
            log.handlers, log.propagate = handlers, propagate


def _submission_failure(kind: str, error: BaseException) -> str:
    """One line for a failed job submission: the scheduler's own words where it refused the
    job (dask-jobqueue's 'Command exited …' text: its stderr lines), else the exception."""
    text = str(error)
    if "Command exited with non-zero exit code" in text:
        lines = [line.strip() for line in text.split("stderr:", 1)[-1].splitlines() if line.strip()]
        return f"{SUBMIT[kind]} refused the job: " + ("; ".join(lines) or text.strip().splitlines()[0])
    return f"submitting the {kind} job failed: {type(error).__name__}: {' '.join(text.split())}"


def _wait_for_first_worker(cluster, client, kind: str, submit_errors: _SubmitErrors, timeout: float) -> None:
    """Return once a worker has joined; :class:`ClusterError` when the submission was refused
    or none joined within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        if submit_errors.errors:
            raise ClusterError(_submission_failure(kind, submit_errors.errors[0]))
        if client.scheduler_info(n_workers=1)["workers"]:
            return
        if time.monotonic() > deadline:
            jobs = [getattr(w, "job_id", None) for w in cluster.workers.values()]
            jobs = ", ".join(j for j in jobs if j) or "none"
            raise ClusterError(
                f"no Dask worker joined within {timeout:g} s (--cluster-timeout); {kind} job(s) {jobs} "
                "did not start (still queued? see squeue/qstat) and were cancelled"
            )
        time.sleep(0.2)


def _close(cluster) -> None:
    """Close a cluster, cancelling every job it submitted — also when a submission failed
    (distributed's close asserts that every worker it created has started or failed)."""
    from distributed.core import Status

    for worker in list(cluster.workers.values()):
        if getattr(worker, "job_id", "") is None and worker.status == Status.created:
            worker.status = Status.failed  # its job was never submitted: nothing to cancel
    cluster.close()


@contextlib.contextmanager
def connect(spec: str | os.PathLike | None, timeout: float = DEFAULT_TIMEOUT):
    """Context manager yielding a ``distributed.Client`` (or None for ``spec=None``).

    ``spec``: a shipped profile name (``local``, ``local-cuda``, ``slurm``…), a YAML path, or a
    scheduler address (``tcp://host:8786``). With None or ``"none"``, nothing is started: dask's threaded
    scheduler runs in this process (fast, no serialisation; the default for one machine).
    Clusters started here are closed on exit (their jobs cancelled). A batch-system cluster
    waits at most ``timeout`` s for its first worker (:class:`ClusterError` otherwise).
    """
    if spec is None or str(spec) == "none":
        yield None
        return
    from distributed import Client

    spec = str(spec)
    if "://" in spec:
        with dask.config.set(DISTRIBUTED_DEFAULTS), Client(spec) as client:
            yield client
        return
    profile = load_profile(spec)
    kind = profile["cluster"]
    with dask.config.set({**DISTRIBUTED_DEFAULTS, **(profile.get("dask") or {})}):
        # batch systems only: a local cluster's start raises its errors itself
        with _SubmitErrors() if kind in SUBMIT else contextlib.nullcontext() as submit_errors:
            if kind in SUBMIT and not profile.get("scale"):
                raise ClusterError(f"{spec}: the {kind} profile requests no jobs: give it 'scale: N' (jobs)")
            cluster = make_cluster(profile)
            client = None
            try:
                client = Client(cluster)
                if kind in SUBMIT:
                    _wait_for_first_worker(cluster, client, kind, submit_errors, timeout)
            except BaseException:
                if client is not None:
                    client.close()
                _close(cluster)
                raise
        try:
            with client:
                yield client
        finally:
            _close(cluster)
