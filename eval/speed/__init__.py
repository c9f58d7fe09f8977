"""Speed benchmarks: what pruning buys in time, memory and FLOPs.

``bench_prefill`` (``vtprune bench``), ``bench_decode`` and ``bench_gemm`` time random-weight models of
LLaVA-1.5 geometry (``shapes``); ``flops_report`` (``vtprune flops``) counts full-size models on the
``meta`` device.
"""
