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
"""

from __future__ import annotations

import contextlib
import os
from importlib import resources
from pathlib import Path

import dask
import yaml

KINDS = {
    "local": ("distributed", "LocalCluster"),
    "local-cuda": ("dask_cuda", "LocalCUDACluster"),
    "slurm": ("dask_jobqueue", "SLURMCluster"),
    "pbs": ("dask_jobqueue", "PBSCluster"),
}

#: dask settings that matter for stemdask under distributed.
DISTRIBUTED_DEFAULTS = {"array.rechunk.method": "p2p", "optimization.fuse.active": False}


def profile_names() -> list[str]:
    """Names of the profiles shipped with stemdask."""
    return sorted(p.name[:-5] for p in resources.files("stemdask.cluster_configs").iterdir() if p.name.endswith(".yaml"))


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
            raise ValueError(f"unknown cluster profile {spec!r}: not a file, not one of {profile_names()}, "
                             f"not a scheduler address (tcp://host:port)")
        text = res.read_text()
        where = f"profile {spec!r}"
    try:
        profile = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ValueError(f"{where}: not valid YAML ({e})") from None
    if not isinstance(profile, dict) or "cluster" not in profile:
        raise ValueError(f"{where}: a profile needs a 'cluster:' kind, one of {sorted(KINDS)}")
    if profile["cluster"] not in KINDS:
        raise ValueError(f"{where}: unknown cluster kind {profile['cluster']!r}; choose from {sorted(KINDS)}")
    return profile


def make_cluster(profile: dict):
    """Instantiate the cluster a profile describes (jobs are requested with ``scale``)."""
    import importlib

    kwargs = {k: v for k, v in profile.items() if k not in ("cluster", "scale", "dask")}
    module, cls = KINDS[profile["cluster"]]
    try:
        mod = importlib.import_module(module)
    except ImportError:
        extra = {"dask_cuda": "gpu", "dask_jobqueue": "hpc"}.get(module, "")
        raise ImportError(f"cluster kind {profile['cluster']!r} needs {module}: pip install 'stemdask[{extra}]'") from None
    cluster = getattr(mod, cls)(**kwargs)
    if profile.get("scale"):
        if profile["cluster"] in ("slurm", "pbs"):
            cluster.scale(jobs=int(profile["scale"]))
        else:
            cluster.scale(int(profile["scale"]))
    return cluster


@contextlib.contextmanager
def connect(spec: str | os.PathLike | None):
    """Context manager yielding a ``distributed.Client`` (or None for ``spec=None``).

    ``spec``: a shipped profile name (``local``, ``local-cuda``, ``slurm``…), a YAML path, or a
    scheduler address (``tcp://host:8786``). With None, nothing is started: dask's threaded
    scheduler runs in this process (fast, no serialisation; the default for one machine).
    Clusters started here are closed on exit.
    """
    if spec is None:
        yield None
        return
    from distributed import Client

    spec = str(spec)
    if "://" in spec:
        with dask.config.set(DISTRIBUTED_DEFAULTS), Client(spec) as client:
            yield client
        return
    profile = load_profile(spec)
    with dask.config.set({**DISTRIBUTED_DEFAULTS, **(profile.get("dask") or {})}):
        cluster = make_cluster(profile)
        try:
            with Client(cluster) as client:
                yield client
        finally:
            cluster.close()


def _peak_rss_bytes() -> int:
    """This process's peak resident memory (bytes): VmHWM, which unlike ``getrusage`` does not
    inherit the peak of the process a worker was forked or spawned from."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource  # not Linux: best available figure

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss_per_worker(client) -> dict[str, int]:
    """Peak resident memory (bytes) of every worker process since it started."""
    return client.run(_peak_rss_bytes)
