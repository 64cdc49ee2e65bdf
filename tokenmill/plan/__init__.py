"""The inference-hardware planner: what a model and its traffic cost, and how fast they run,
on GPUs, SRAM inference chips and CPUs.

    hardware.py   the catalogue (catalogue/*.toml, a source beside every figure)
    models.py     popular model shapes (catalogue/*.json) or any config.json
    placement.py  fewest chips holding weights + KV; TP/PP layout and its explanation
    load.py       one replica's share of the traffic; the steady-state window it is measured in
    step_time.py  a step's time on a placement (per-chip roofline + links)
    sim_runner.py the SimRunner: BaseRunner on a virtual clock
    simulate.py   the engine step loop driving the real Scheduler and KVCacheManager
    metrics.py    TTFT / TPOT / ITL / E2E, throughput, goodput under SLOs (workload/slo.py)
    economics.py  $ per million tokens, joules per token
    planner.py    one plan end to end; compare.py ranks hardware
    search.py     the best use of a chip budget; the cheapest deployment meeting an SLO (--size)
    sweep.py      the crossover chart across load (--sweep)
    assumptions.py every guessed or fitted figure with its source (--list --verbose)

Measuring this machine, apart from what it measures (the core above imports neither):

    calibration/  `tokenmill plan calibrate`: record, fit and write this-machine
    validation/   `tokenmill plan validate`: predicted vs measured serving, the speed probe
"""
