"""Progress in one style, under the threaded scheduler, a cluster and for parallel jobs: plain
lines without escape codes when stderr is not a terminal, a bar on a terminal, nothing when quiet."""

from __future__ import annotations

import io
import re

import dask.array as da
import pytest

import stemdask.progress as progress


@pytest.fixture
def every_update(monkeypatch):
    monkeypatch.setattr(progress, "LINE_INTERVAL_S", 0.0)


def lines_of(text: str) -> list[str]:
    assert "\x1b" not in text and "\r" not in text, repr(text)
    return text.splitlines()


LINE = re.compile(r"^reconstruct: (\d+)/(\d+) tasks \(\d+ %\), \d+ s(, done)?$")


def check_lines(lines: list[str]) -> None:
    assert lines and all(LINE.match(ln) for ln in lines), lines
    done, total = LINE.match(lines[-1]).group(1, 2)
    assert done == total and lines[-1].endswith(", done")


def test_threads_give_plain_lines_when_not_a_terminal(every_update, capsys):
    x = da.ones((40, 40), chunks=10).sum()
    assert progress.compute(x, desc="reconstruct")[0] == 1600
    check_lines(lines_of(capsys.readouterr().err))


def test_a_cluster_gives_the_same_lines(every_update, capsys):
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
            Client(cluster):
        x = da.ones((40, 40), chunks=10).sum()
        assert progress.compute(x, desc="reconstruct")[0] == 1600
    check_lines(lines_of(capsys.readouterr().err))


def test_parallel_jobs_count_blocks(every_update, capsys):
    assert progress.run_jobs(lambda j: j * j, range(5), desc="ingest") == [0, 1, 4, 9, 16]
    lines = lines_of(capsys.readouterr().err)
    assert lines[-1].startswith("ingest: 5/5 blocks (100 %)") and lines[-1].endswith(", done")


def test_quiet_shows_nothing(capsys):
    progress.compute(da.ones(10, chunks=5).sum(), progress=False)
    progress.run_jobs(lambda j: j, range(3), desc="ingest", progress=False)
    assert capsys.readouterr().err == ""


def test_a_terminal_gets_a_bar_that_goes_away():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    with progress.Progress("reconstruct", total=3, stream=stream) as bar:
        for _ in range(3):
            bar.update()
    assert "reconstruct" in stream.getvalue() and "\r" in stream.getvalue()
