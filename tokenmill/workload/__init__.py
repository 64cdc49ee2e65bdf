"""The workload generator shared by `tokenmill bench serve` and `tokenmill plan`.

workload = build_workload("sharegpt", 500, ArrivalSpec(rate=4.0), tokenizer=tok, seed=0)
for req in workload.requests:   # prompt (text or None), prompt_len, output_len, arrival_s
    ...
"""

from tokenmill.workload.arrivals import ArrivalSpec
from tokenmill.workload.sharegpt import TextEncoder, iter_records, load_pairs, sample_sharegpt
from tokenmill.workload.slo import SLO, parse_slo
from tokenmill.workload.spec import LengthSpec, build_workload, parse_workload
from tokenmill.workload.synthetic import fixed_lengths, random_lengths
from tokenmill.workload.types import Workload, WorkloadRequest

__all__ = [
    "SLO",
    "ArrivalSpec",
    "LengthSpec",
    "TextEncoder",
    "Workload",
    "WorkloadRequest",
    "build_workload",
    "fixed_lengths",
    "iter_records",
    "load_pairs",
    "parse_slo",
    "parse_workload",
    "random_lengths",
    "sample_sharegpt",
]
