"""The compiled context kernel (bfn_codec/_context.c); everything else is in pyproject.toml.
-ffp-contract=off keeps every float operation a separately rounded one (no fused
multiply-adds), so the kernel computes the same bits on every machine."""
from setuptools import Extension, setup

setup(ext_modules=[Extension("bfn_codec._context", ["bfn_codec/_context.c"],
                             extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math"])])
