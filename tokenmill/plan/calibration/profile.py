"""The fitted machine as a hardware profile: the catalogue's schema, each figure's source naming
the fit, written to (and read from) $TOKENMILL_HOME/this-machine.json. The profile predicts
exactly what the fit predicts."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tokenmill.perf.dtypes import Precision
from tokenmill.plan.calibration.fit import UNBOUNDED, CalibrationFit
from tokenmill.plan.hardware import THIS_MACHINE, calibrated_path


def _memory_bytes() -> float:
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 16e9


def profile_dict(
    fit: CalibrationFit, origin: str, precision: Precision, calibration: dict | None = None
) -> dict:
    """The fitted machine in the hardware catalogue's schema; `calibration` (how it was
    measured: dtype, engine settings, held-out errors) is kept beside it."""
    src = (
        f"[fitted] {fit.num_steps} steps of {origin} ({precision.describe()}), "
        f"{time.strftime('%Y-%m-%d')}, rel. RMS error {fit.rel_rms_error:.1%}"
    )
    peak = {"value": fit.flops_per_s / 1e12, "source": src}
    profile = {
        "name": THIS_MACHINE,
        "display_name": "this machine (calibrated)",
        "aliases": ["local", "here"],
        "kind": "cpu",
        "scheduling": "dynamic",
        "calibrated": True,
        "overlap_compute_memory": fit.overlap,
        "memory": [
            {
                "name": "ram",
                "holds": ["weights", "kv", "activations"],
                "capacity_gb": {"value": _memory_bytes() / 1e9, "source": "[measured] os.sysconf"},
                "bandwidth_gb_s": {"value": fit.bytes_per_s / 1e9, "source": src},
                "efficiency": {"value": 1.0, "source": "folded into the fitted bandwidth"},
            }
        ],
        # Every dtype the cost model may ask for runs at the one fitted rate.
        "compute": {
            **{f"{d}_tflops": peak for d in ("fp32", "bf16", "fp16")},
            "efficiency": {"value": 1.0, "source": "folded into the fitted rate"},
        },
        "runtime": {
            "per_step_overhead_us": {"value": fit.per_step_s * 1e6, "source": src},
            "per_request_overhead_us": {"value": fit.per_request_s * 1e6, "source": src},
            "per_prefill_overhead_us": {"value": fit.per_prefill_s * 1e6, "source": src},
            "per_kernel_overhead_us": {"value": 0.0, "source": "folded into per_step_overhead"},
            "step_jitter_cv": {"value": fit.rel_rms_error, "source": src},
            "usable_memory_fraction": {"value": 0.5, "source": "[guess] leave room for the OS"},
        },
        "links": {
            "scale_up": {
                "bandwidth_gb_s": {"value": 10, "source": "[guess] a single machine"},
                "latency_us": {"value": 10, "source": "[guess] a single machine"},
                "domain_size": {"value": 1, "source": "a single machine"},
            }
        },
        "economics": {
            "price_per_hour_usd": {"value": 0.0, "source": "already owned"},
            "power_w": {"value": 65, "source": "[guess] a desktop-class CPU under load"},
        },
    }
    if fit.attention_flops_per_s < UNBOUNDED:
        profile["attention_unit"] = {
            "tflops": {"value": fit.attention_flops_per_s / 1e12, "source": src + "; attention"},
            "efficiency": {"value": 1.0, "source": "folded into the fitted rate"},
        }
    if calibration is not None:
        profile["calibration"] = calibration
    return profile


def write_calibration(profile: dict, path: Path | None = None) -> Path:
    path = path or calibrated_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(profile, indent=2) + "\n", encoding="utf-8")
    return path


def read_calibration(path: Path | None = None) -> dict | None:
    """The `calibration` section of the written profile (dtype, engine settings, errors)."""
    path = path or calibrated_path()
    if not path.exists():
        return None
    return json.loads(path.read_text(encoding="utf-8")).get("calibration")
