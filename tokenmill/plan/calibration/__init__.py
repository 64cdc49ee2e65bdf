"""Measuring this machine for the planner, apart from the core it measures (nothing in
tokenmill.plan outside this package imports it; tests/test_plan_layout.py checks).

    run.py        `tokenmill plan calibrate`: record, fit, write this-machine
    scenarios.py  the engine run through serving's batch shapes
    served.py     the same scenarios sent to `tokenmill serve`
    fit.py        the step-time fit and its errors
    profile.py    the fit as a catalogue profile, written and read

The CPU time other processes take (a disturbed step) is read in tokenmill.bench.machine_load,
shared with the benchmarks.
"""
