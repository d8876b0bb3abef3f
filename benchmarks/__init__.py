"""rredcot's benchmark suite (`make bench`; issue 23). Each module is one benchmark, runnable alone as
`python -m benchmarks.NAME [--quick]`; `python -m benchmarks` runs them all and writes benchmarks/results.json.
Ratios are measured inside one process (the machine may be shared), medians over repeats after a warm-up."""
