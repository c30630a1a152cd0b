"""iCOM and DPC of a large COM field, against stempy's ``phase_from_com`` in the same run (issue 13).

    python benchmarks/integration.py [--field 2048] [--iterations 10] [--repeat 3]

A random (white) COM field of ``--field``² positions in Å⁻¹ (the integrators' cost does not
depend on the content):

* stemdask iCOM, the default ``pad="mirror"`` (the mirror extension, by cosine/sine transforms
  on the scan grid: :func:`stemdask.kernels.icom.integrate_mirrored`) and ``pad="none"``;
* stempy's ``stempy.image.phase_from_com`` (one complex FFT integration, no padding), where
  stempy is installed (the test extras install it on Linux x86-64);
* stemdask DPC (``dpc_phase``, padding 0.25 per side) for ``--iterations`` steps (``tol=0``:
  every step taken), with seconds per iteration. py4DSTEM's DPC is not installed here; its
  figure in issue 13 was measured elsewhere.

Prints the best of ``--repeat`` runs of each (after a warm-up) and the ratios to stempy.
"""

from __future__ import annotations

import argparse

import numpy as np
from ricom import best_time  # benchmarks/ricom.py: the shortest of a few runs

from stemdask.kernels.dpc import dpc_phase
from stemdask.kernels.icom import integrate_com


def _best(fn, repeat: int) -> float:
    fn()  # warm-up
    return best_time(fn, repeat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--field", type=int, default=2048, help="COM field side (positions, default 2048)")
    ap.add_argument("--iterations", type=int, default=10, help="DPC steps (default 10)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    n = args.field
    com_y, com_x = np.random.default_rng(0).normal(size=(2, n, n))
    rows = [("stemdask iCOM, pad mirror (default)", _best(lambda: integrate_com(com_y, com_x, 0.2), args.repeat)),
            ("stemdask iCOM, pad none", _best(lambda: integrate_com(com_y, com_x, 0.2, pad="none"), args.repeat))]
    try:
        from stempy.image import phase_from_com
    except ImportError:
        stempy = None
    else:
        stempy = _best(lambda: phase_from_com(np.stack([com_x, com_y])), args.repeat)
        rows.append(("stempy phase_from_com (no padding)", stempy))
    dpc = _best(lambda: dpc_phase(com_y, com_x, 0.2, iterations=args.iterations, tol=0.0), 1)
    rows.append((f"stemdask DPC, {args.iterations} iterations", dpc))
    print(f"{n}² COM field; best of {args.repeat} (DPC: of 1)")
    for name, t in rows:
        ratio = f"  ({t / stempy:.2f}× stempy)" if stempy else ""
        print(f"{name:40s} {t:7.3f} s{ratio}")
    print(f"DPC per iteration                        {dpc / args.iterations:7.3f} s")
    if stempy is None:
        print("stempy is not installed: pip install stempy (Linux x86-64) for its figure")


if __name__ == "__main__":
    main()
