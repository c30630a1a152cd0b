"""Peak resident memory of this process and of a cluster's workers (Linux ``/proc``), for
memory tests and benchmarks."""

from __future__ import annotations


def peak_rss_bytes() -> int:
    """This process's peak resident memory (bytes): VmHWM, which unlike ``getrusage`` does not
    inherit the peak of the process a worker was forked or spawned from."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource  # not Linux: best available figure

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def reset_peak_rss() -> None:
    """Reset this process's peak-RSS mark (Linux: ``/proc/self/clear_refs``), so that
    :func:`peak_rss_bytes` measures from now on."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_per_worker(client) -> dict[str, int]:
    """Peak resident memory (bytes) of every worker process since it started (or since
    ``client.run(reset_peak_rss)``)."""
    return client.run(peak_rss_bytes)
