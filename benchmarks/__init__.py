"""Benchmark bfn-codec against standard compressors: `python -m benchmarks.run FILES_OR_DIRS`."""
