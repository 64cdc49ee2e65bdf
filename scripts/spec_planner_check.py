"""The planner's TPOT with speculative decoding against a served run, at batch 1.

    python scripts/spec_planner_check.py docs/results/DATE-spec-planner-check

Serves the bundled model in float32 (the settings `tokenmill plan calibrate --dtype float32`
fits) without and with a draft model (the target's own file, k = 4: it drafts every step, which
is what the planner's --spec-decode models), runs `tokenmill bench serve` on 16 ShareGPT requests
one at a time against each, and saves each bench JSON and the server's /metrics. Then compare
with `tokenmill plan --model <the same file> --hardware this-machine --weights-dtype fp32
--workload sharegpt --concurrency 1 --num-prompts 16 --max-num-seqs 64
--max-num-batched-tokens 512 [--spec-decode k=4,accept=measured:OUT/metrics-draft-k4.txt,cost=1.0]`.
"""

import json
import subprocess
import sys
from pathlib import Path

import httpx

from tokenmill.bench.serve_process import ServeProcess
from tokenmill.loader.default_model import default_model_path


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model = str(default_model_path())
    base = [model, "--dtype", "float32", "--max-num-seqs", "64",
            "--max-num-batched-tokens", "512", "--block-size", "16", "--kv-cache-memory", "1",
            "--no-prefix-caching"]  # fmt: skip
    draft = json.dumps({"method": "draft", "model": model, "num_speculative_tokens": 4})
    for name, extra in (("none", []), ("draft-k4", ["--speculative-config", draft])):
        with ServeProcess(base + extra, out / f"serve-{name}.log") as server:
            bench = [sys.executable, "-m", "tokenmill.cli.main", "bench", "serve",
                     "--base-url", server.base_url, "--workload", "sharegpt",
                     "--num-prompts", "16", "--seed", "0", "--max-concurrency", "1",
                     "--num-warmup", "1", "--json", str(out / f"bench-{name}.json"),
                     "--no-progress"]  # fmt: skip
            subprocess.run(bench, check=True)
            metrics = httpx.get(server.base_url + "/metrics", timeout=10).text
            (out / f"metrics-{name}.txt").write_text(metrics)
        m = json.loads((out / f"bench-{name}.json").read_text())["metrics"]
        print(f"{name}: TPOT median {m['tpot']['median']:.2f} ms, "
              f"{m['output_throughput']:.2f} output tok/s")  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1]))
