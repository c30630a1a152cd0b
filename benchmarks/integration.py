"""iCOM and DPC of a large COM field, against stempy's ``phase_from_com`` in the same run (issue 13).

    python benchmarks/integration.py [--field 2048] [--iterations 10] [--repeat 3] [--py4dstem-python PY]

A random (white) COM field of ``--field``² positions in Å⁻¹ (the integrators' cost does not
depend on the content):

* stemdask iCOM, the default ``pad="mirror"`` (the mirror extension, by cosine/sine transforms
  on the scan grid: :func:`stemdask.kernels.icom.solve_y`) and ``pad="none"``, in one task;
  and the mirror integral by 16 MiB row and column chunks (``integrate_by_chunks``, the path of
  fields too large for one task) on the threaded scheduler;
* stempy's ``stempy.image.phase_from_com`` (one complex FFT integration, no padding), where
  stempy is installed (the test extras install it on Linux x86-64);
* stemdask DPC (``dpc_phase``, padding 0.25 per side) for ``--iterations`` steps (``tol=0``:
  every step taken), with seconds per iteration;
* py4DSTEM's DPC at the same iteration count (``benchmarks/peers/py4dstem_dpc.py``), where
  ``--py4dstem-python`` names an interpreter that has it: py4DSTEM pins numpy < 2, so it gets
  its own environment, e.g. ``python -m venv /tmp/p4 && /tmp/p4/bin/pip install py4DSTEM``.

Prints the best of ``--repeat`` runs of each (after a warm-up) and the ratios to stempy.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import dask
import dask.array as da
import numpy as np
from ricom import best_time  # benchmarks/ricom.py: the shortest of a few runs

from stemdask.kernels.dpc import dpc_phase
from stemdask.kernels.icom import integrate_com
from stemdask.methods.icom import integrate_by_chunks


def _best(fn, repeat: int) -> float:
    fn()  # warm-up
    return best_time(fn, repeat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--field", type=int, default=2048, help="COM field side (positions, default 2048)")
    ap.add_argument("--iterations", type=int, default=10, help="DPC steps (default 10)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--py4dstem-python", help="an interpreter with py4DSTEM installed, for its DPC figure")
    args = ap.parse_args()
    n = args.field
    com_y, com_x = np.random.default_rng(0).normal(size=(2, n, n))
    rows = [("stemdask iCOM, pad mirror (default)", _best(lambda: integrate_com(com_y, com_x, 0.2), args.repeat)),
            ("stemdask iCOM, pad none", _best(lambda: integrate_com(com_y, com_x, 0.2, pad="none"), args.repeat))]
    chunked = integrate_by_chunks(da.from_array(com_y, chunks=(64, n)), da.from_array(com_x, chunks=(64, n)),
                                  (0.2, 0.2), 16 * 2**20, pad="mirror", highpass=None, lowpass=None)
    with dask.config.set(scheduler="threads"):
        rows.append(("stemdask iCOM, mirror, by 16 MiB row/column chunks (threads)",
                     _best(chunked.compute, args.repeat)))
    try:
        from stempy.image import phase_from_com
    except ImportError:
        stempy = None
    else:
        stempy = _best(lambda: phase_from_com(np.stack([com_x, com_y])), args.repeat)
        rows.append(("stempy phase_from_com (no padding)", stempy))
    dpc = _best(lambda: dpc_phase(com_y, com_x, 0.2, iterations=args.iterations, tol=0.0), 1)
    rows.append((f"stemdask DPC, {args.iterations} iterations", dpc))
    if args.py4dstem_python:
        peer = Path(__file__).parent / "peers" / "py4dstem_dpc.py"
        out = subprocess.run([args.py4dstem_python, str(peer), str(n), str(args.iterations), str(args.repeat)],
                             capture_output=True, text=True, check=True).stdout
        p4 = json.loads(out.strip().splitlines()[-1])
        rows.append((f"py4DSTEM {p4['version']} DPC, {args.iterations} iterations (float32, pad ×2)",
                     p4["seconds"]))
        dpc_ratio = f"; stemdask DPC / py4DSTEM DPC = {dpc / p4['seconds']:.2f}"
    else:
        dpc_ratio = "; py4DSTEM: give --py4dstem-python (it needs numpy < 2: its own environment)"
    print(f"{n}² COM field; best of {args.repeat} (DPC: of 1)")
    for name, t in rows:
        ratio = f"  ({t / stempy:.2f}× stempy)" if stempy else ""
        print(f"{name:62s} {t:7.3f} s{ratio}")
    print(f"{'DPC per iteration':62s} {dpc / args.iterations:7.3f} s{dpc_ratio}")
    if stempy is None:
        print("stempy is not installed: pip install stempy (Linux x86-64) for its figure")


if __name__ == "__main__":
    main()
