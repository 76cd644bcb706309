"""The gateway's benchmarks (issue "Performance"): `python -m bench {routing,memory,concurrency,profile,all}`.

Results: bench/RESULTS.md (the write-up) and bench/results/*.json (the raw figures of the last full run).
"""
