"""Compute kernels that torch lacks on some machines (the lowest layer: imports nothing of llamazoo's
but llamazoo.paths). cpu: bf16 and int8 linear layers for a few rows on AVX2 CPUs."""
