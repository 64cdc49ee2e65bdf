"""`tokenmill plan validate`: the planner's predictions against this machine's served runs,
apart from the core it checks (nothing in tokenmill.plan outside this package imports it;
tests/test_plan_layout.py checks).

    run.py              the command: every rate predicted, then served and measured
    predict_measure.py  one workload two ways: simulated, and `tokenmill bench serve`
    probe.py            the speed probe before each measured run
    served_steps.py     the calibrated fit scored on the server's recorded steps
    results.py          each run's numbers; report.py their table
"""
