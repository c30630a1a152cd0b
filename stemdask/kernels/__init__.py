"""Pure compute kernels: plain arrays in, plain arrays out, no dask, no I/O.

Each CPU kernel is a numba ``njit(nogil=True, cache=True)`` function tested against a
brute-force NumPy version in ``tests/``.
"""
