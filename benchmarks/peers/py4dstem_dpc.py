"""py4DSTEM's iterative DPC on a random COM field, timed; run by an interpreter that has
py4DSTEM (it pins numpy < 2, so it lives in its own environment, see benchmarks/integration.py).

    PYTHON_WITH_PY4DSTEM benchmarks/peers/py4dstem_dpc.py FIELD ITERATIONS REPEAT

Prints one JSON line: {"seconds": best of REPEAT, "iterations": ..., "padding_factor": ...,
"version": ...}. The COM field is the same as integration.py's (numpy default_rng(0) normal,
(2, FIELD, FIELD), float64); py4DSTEM takes it as measured COM (no datacube), with the
rotation and transpose forced (no search), its default padding factor 2, float32 arithmetic,
every iteration taken (stopping_criterion 0, no backtracking).
"""

import json
import sys
import time
import warnings

import numpy as np
import py4DSTEM
from py4DSTEM.process.phase import DPC


def main() -> None:
    field, iterations, repeat = (int(v) for v in sys.argv[1:4])
    com_y, com_x = np.random.default_rng(0).normal(size=(2, field, field))
    warnings.simplefilter("ignore")
    best = np.inf
    for _ in range(repeat):
        dpc = DPC(energy=300e3, verbose=False).preprocess(
            force_com_measured=(com_x, com_y), force_com_rotation=0.0, force_com_transpose=False,
            plot_center_of_mass=False, plot_rotation=False)
        t = time.perf_counter()
        dpc.reconstruct(reset=True, max_iter=iterations, stopping_criterion=0.0, backtrack=False, progress_bar=False)
        best = min(best, time.perf_counter() - t)
    print(json.dumps({"seconds": best, "iterations": iterations, "padding_factor": 2, "version": py4DSTEM.__version__}))


if __name__ == "__main__":
    main()
