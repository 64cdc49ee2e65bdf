#!/usr/bin/env bash
# Issue 12's speed targets in one run (BENCHMARKS.md section 7): tokenmill computing on the GGUF
# blocks vs llama.cpp on the same files (llama-bench tg128 and llama-server at concurrency 1),
# and vs tokenmill's own bf16 path (the engine scenario measures both), for the bundled Q4_1 file
# and a Q8_0 file requantized by llama-quantize from the BF16 GGUF.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${OUT:-bench-results/quant-$(date -u +%Y%m%d-%H%M)}
mkdir -p "$OUT"
read -r Q4 Q8 < <($PY - <<'PYEOF'
from tokenmill.bench import llamacpp
from tokenmill.loader.default_model import default_model_path
b = llamacpp.ensure_built()
bf16 = llamacpp.to_bf16_gguf(b, default_model_path())
print(default_model_path(), llamacpp.requantize_gguf(b, bf16, "Q8_0"))
PYEOF
)
for model in "$Q4" "$Q8"; do
  name=$(basename "$model" .gguf)
  $PY -m tokenmill.cli.main bench compare "$model" --weights as-is --quantization gguf \
    --scenarios tpot,engine --engines tokenmill,llama.cpp --repetitions 2 --tpot-requests 4 \
    --engine-batch-sizes 1,128 --results "$OUT/$name"
done
