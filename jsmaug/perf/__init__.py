"""Performance tools as a library: the analytic FLOP count (`flops`), the HLO counter (`hlo_stats`) and the
benchmarks' timers, records, synthetic batch, planned step runner and PyTorch step (`bench`)."""
