"""`tokenmill quant-eval`: what each precision scheme costs in quality, per task, and what it buys
in speed and memory, measured against the model computed in float32 (docs/quant_eval.md)."""
