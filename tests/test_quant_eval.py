"""quant-eval: end to end on a tiny random-weight Hugging Face folder (SmolLM2's tokenizer), the
scheme grammar, teacher forcing through the KV cache, the math generator, and the sandbox."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
from dataclasses import replace

import pytest
import torch

from tokenmill.config import EngineConfig, ModelConfig
from tokenmill.errors import ConfigError
from tokenmill.quant_eval.schemes import SchemeUnsupported, apply_scheme, parse_scheme

TINY = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, smollm_path) -> str:
    """config.json + random safetensors (std 0.5, so logits are far from uniform) + SmolLM2's
    tokenizer.json and chat template: a model quant-eval opens like any HF folder."""
    from safetensors.torch import save_file

    from tokenmill.loader.dummy import dummy_weight_shapes
    from tokenmill.loader.gguf_loader import open_gguf
    from tokenmill.models.arch_config import ArchConfig

    folder = tmp_path_factory.mktemp("tiny_quant_eval")
    gen = torch.Generator().manual_seed(0)
    weights = {
        name: (1.0 + 0.1 * torch.randn(shape, generator=gen))
        if "norm" in name
        else 0.5 * torch.randn(shape, generator=gen) / shape[-1] ** 0.5
        for name, shape in dummy_weight_shapes(ArchConfig.from_hf_dict(TINY)).items()
    }
    weights["lm_head.weight"] *= 16  # peaked next-token distributions
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(TINY | {"eos_token_id": 2, "bos_token_id": 1}))
    tokenizer = open_gguf(smollm_path).tokenizer
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    tokenizer_config = {
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "chat_template": tokenizer.chat_template,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    return str(folder)


# ---- end to end ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_output(tiny_folder, tmp_path_factory):
    from tokenmill.quant_eval.harness import EvalSettings
    from tokenmill.quant_eval.results import Tolerance
    from tokenmill.quant_eval.run import run_quant_eval
    from tokenmill.quant_eval.schemes import parse_schemes
    from tokenmill.quant_eval.speed import SpeedSettings
    from tokenmill.quant_eval.tasks import TaskSize

    settings = EvalSettings(
        size=TaskSize(num_samples=2, max_tokens=16),
        chunk_tokens=64,
        speed=SpeedSettings(batch_sizes=(1, 3), prompt_len=16, output_len=6, prefill_len=48,
                            num_prefill_prompts=2),
        progress=False,
    )  # fmt: skip
    schemes = parse_schemes("none,bf16,fp32,int8+kv-int8,int3-g7")
    out_dir = tmp_path_factory.mktemp("quant_eval_out")
    return run_quant_eval([tiny_folder], schemes, settings, Tolerance(), out_dir)


def _schemes(run_output) -> dict[str, dict]:
    record = json.loads(run_output.json_path.read_text())
    (model,) = record["models"]
    return {s["scheme"]: s for s in model["schemes"]}


def test_scheme_equal_to_the_reference_measures_zero_loss(run_output):
    schemes = _schemes(run_output)
    assert list(schemes) == ["reference", "none", "bf16", "fp32", "int8+kv-int8", "int3-g7"]
    assert schemes["reference"]["is_reference"]
    for task in ("chat", "code", "math"):
        ref, fp32 = schemes["reference"]["tasks"][task], schemes["fp32"]["tasks"][task]
        assert fp32["num_tokens"] == ref["num_tokens"] > 0
        # Separately built engines, same math: bit-identical logits through the same chunks.
        assert fp32["mean_kl"] == 0.0 and fp32["p99_kl"] == 0.0
        assert fp32["top1_agreement"] == 1.0
        assert fp32["perplexity"] == ref["perplexity"] and fp32["perplexity_change_pct"] == 0.0
        assert fp32["accuracy"] == ref["accuracy"]


def test_bf16_measures_a_real_loss(run_output):
    schemes = _schemes(run_output)
    assert schemes["bf16"]["engine"]["dtype"] == "bfloat16"
    for task in ("chat", "code", "math"):
        bf16, ref = schemes["bf16"]["tasks"][task], schemes["reference"]["tasks"][task]
        assert 0.0 < bf16["mean_kl"] < 0.5 and bf16["p99_kl"] >= 0.0
        assert 0.5 <= bf16["top1_agreement"] <= 1.0
        assert bf16["perplexity"] > 1.0 and bf16["perplexity"] != ref["perplexity"]
        assert bf16["perplexity_change_pct"] == pytest.approx(
            100 * (bf16["perplexity"] / ref["perplexity"] - 1)
        )


def test_quantized_weights_and_kv_cache_are_measured(run_output):
    schemes = _schemes(run_output)
    q, bf16 = schemes["int8+kv-int8"], schemes["bf16"]
    assert q["error"] is None
    assert q["engine"]["quantization"] == "int8" and q["engine"]["kv_cache_dtype"] == "int8"
    # int8 K/V (1 byte each) + one 2-byte scale per (token, KV head): 2 x 2 x 2 x (16 + 2).
    assert q["memory"]["kv_bytes_per_token"] == 144
    assert q["memory"]["weight_bytes"] < 0.6 * bf16["memory"]["weight_bytes"]
    for task in ("chat", "code", "math"):
        r = q["tasks"][task]
        assert r["mean_kl"] > 0.0 and r["mean_kl"] != bf16["tasks"][task]["mean_kl"]
        assert r["num_tokens"] == bf16["tasks"][task]["num_tokens"]


def test_accuracy_memory_and_speed_are_measured(run_output):
    schemes = _schemes(run_output)
    ref = schemes["reference"]
    assert ref["tasks"]["chat"]["accuracy"] is None
    for task, name in (("code", "pass@1"), ("math", "exact match")):
        assert ref["tasks"][task]["accuracy_name"] == name
        assert ref["tasks"][task]["num_answers"] == 2
        assert ref["tasks"][task]["accuracy"] in (0.0, 0.5, 1.0)
    # 2 layers x (K, V) x 2 KV heads x head_dim 16, at 4 and 2 bytes.
    assert schemes["fp32"]["memory"]["kv_bytes_per_token"] == 512
    assert schemes["bf16"]["memory"]["kv_bytes_per_token"] == 256
    assert schemes["bf16"]["memory"]["kv_bytes_per_token_formula"] == 256
    fp32_bytes = schemes["fp32"]["memory"]["weight_bytes"]
    assert fp32_bytes == pytest.approx(2 * schemes["bf16"]["memory"]["weight_bytes"], rel=0.01)
    assert fp32_bytes >= 4 * 2 * 49152 * 64  # embedding + lm_head
    for s in ("reference", "none", "bf16", "fp32", "int8+kv-int8"):
        speed = schemes[s]["speed"]
        assert speed["prefill_tok_s"] > 0
        assert set(speed["decode_tok_s"]) == {"1", "3"} and min(speed["decode_tok_s"].values()) > 0


def test_unsupported_scheme_is_reported_not_fatal(run_output):
    bad = _schemes(run_output)["int3-g7"]
    assert bad["error"] and "int3-g7" in bad["error"] and "Traceback" not in bad["error"]
    assert bad["tasks"] == {} and bad["speed"] is None
    assert "Not measured:" in run_output.markdown and "- int3-g7: " in run_output.markdown


def test_report_plot_and_cheapest_scheme_lines(run_output):
    md = run_output.markdown_path.read_text()
    assert md == run_output.markdown
    assert "| scheme | perplexity | change | mean KL |" in md and "### math" in md
    assert run_output.plot_paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    schemes = _schemes(run_output)
    lines = run_output.summary_lines
    assert [line.split()[1] for line in lines] == ["chat:", "code:", "math:"]
    for line in lines:
        chosen = line.split()[2]
        # Within tolerance (bf16's KL here is far below 0.01, accuracies are equal or not),
        # the one with the fewest weight bytes: half of float32's.
        assert schemes[chosen]["memory"]["weight_bytes"] == min(
            s["memory"]["weight_bytes"]
            for s in schemes.values()
            if not s["error"] and _accepted(s, schemes["reference"], line.split()[1][:-1])
        )


def _accepted(s: dict, ref: dict, task: str) -> bool:
    r, base = s["tasks"][task], ref["tasks"][task]
    if r["mean_kl"] > 0.01:
        return False
    return r["accuracy"] is None or r["accuracy"] >= base["accuracy"] - 0.02


# ---- teacher forcing ----------------------------------------------------------------------


def test_teacher_forcing_reads_the_kv_cache_chunk_by_chunk(tiny_folder):
    from tokenmill import LLM, SamplingParams
    from tokenmill.engine.build import build_engine
    from tokenmill.quant_eval.tasks import TeacherItem
    from tokenmill.quant_eval.teacher_forcing import TeacherForcer, teacher_forcing_config

    base = EngineConfig(model=ModelConfig(model=tiny_folder, dtype="float32"))
    item = TeacherItem(list(range(100, 140)), list(range(500, 560)))
    whole = TeacherForcer(build_engine(teacher_forcing_config(base, 128, item.num_tokens)))
    chunked_engine = build_engine(teacher_forcing_config(base, 8, item.num_tokens))
    chunked = TeacherForcer(chunked_engine)
    one, many = whole.logits(item), chunked.logits(item)
    assert one.shape == many.shape == (60, 49152)
    # 13 chunks of 8: every one after the first attends to K/V read back from the paged cache.
    torch.testing.assert_close(many, one, rtol=1e-4, atol=1e-4)
    assert chunked_engine.runner.prompt_logits_observer is None
    assert not chunked_engine.has_unfinished_requests()
    # Row i scores target token i: the engine's own prompt logprobs of those tokens agree.
    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    tokens = item.context_ids + item.target_ids
    (out,) = LLM.from_engine(whole.engine).generate([tokens], params, use_tqdm=False)
    expected = [out.prompt_logprobs[len(item.context_ids) + i][t].logprob
                for i, t in enumerate(item.target_ids)]  # fmt: skip
    got = torch.log_softmax(many, dim=-1)[torch.arange(60), torch.tensor(item.target_ids)]
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-4, atol=1e-4)
    # Same float32 weights, int8 K/V: the logits move, so the quantized cache is what was read.
    int8_kv = replace(base, cache=replace(base.cache, kv_cache_dtype="int8"))
    quantized = TeacherForcer(build_engine(teacher_forcing_config(int8_kv, 8, item.num_tokens)))
    moved = (quantized.logits(item) - many).abs().max().item()
    assert 1e-4 < moved < 0.1 * many.abs().max().item()


# ---- schemes ------------------------------------------------------------------------------


def test_scheme_names_are_settings():
    assert parse_scheme("none").settings_dict == {"quantization": "none"}
    assert parse_scheme("bf16").settings_dict == {"dtype": "bfloat16", "quantization": "none"}
    assert parse_scheme("int4-g128-sym").settings_dict == {"quantization": "int4-g128-sym"}
    assert parse_scheme("kv-fp8").settings_dict == {"kv_cache_dtype": "fp8", "quantization": "none"}
    assert parse_scheme("int8+kv-int8").settings_dict == {
        "quantization": "int8",
        "kv_cache_dtype": "int8",
    }
    with pytest.raises(ConfigError, match="twice"):
        parse_scheme("int8+gguf")
    with pytest.raises(ConfigError, match="not a scheme"):
        parse_scheme("int8+")


def test_apply_scheme_sets_fields_or_says_what_is_missing():
    base = EngineConfig()
    assert apply_scheme(base, parse_scheme("fp32")).model.dtype == "float32"
    assert apply_scheme(base, parse_scheme("none")) == base
    with pytest.raises(SchemeUnsupported, match="kv-int3"):
        apply_scheme(base, parse_scheme("kv-int3"))
    with pytest.raises(SchemeUnsupported, match="int3-g7"):
        apply_scheme(base, parse_scheme("int3-g7"))


def test_cli_registers_quant_eval():
    from tokenmill.cli.main import build_parser

    args = build_parser().parse_args(
        ["quant-eval", "--models", "smollm2", "--schemes", "int8+kv-int8", "--num-samples", "3",
         "--max-tokens", "16", "--batch-sizes", "1,8"]
    )  # fmt: skip
    assert args.models == ("smollm2",) and args.batch_sizes == (1, 8)
    assert args.num_samples == 3 and args.max_tokens == 16 and callable(args.func)


# ---- math ---------------------------------------------------------------------------------


def test_math_problems_are_fixed_by_the_seed_and_exact():
    from tokenmill.quant_eval.math_task import generate_problems, is_correct

    problems = generate_problems(200, seed=0)
    assert problems == generate_problems(200, seed=0)
    assert problems != generate_problems(200, seed=1)
    # random.Random is the same on every platform and Python version: these never change.
    assert [(p.expression, p.answer) for p in problems[:3]] == GOLDEN_SEED0
    for p in problems:
        assert re.fullmatch(r"\d+ [-+*] \d+( \* \d+)?", p.expression)
        assert eval(p.expression) == p.answer  # noqa: S307 - digits and operators only
    assert {p.expression.split()[1] for p in problems} == {"+", "-", "*"}
    assert is_correct(" 323\n", 323) and is_correct("323", 323) and is_correct("-5 apples", -5)
    assert not is_correct("3230", 323) and not is_correct("324", 323) and not is_correct("", 1)


GOLDEN_SEED0 = [("98 + 15 * 3", 143), ("67 * 64", 4288), ("39 + 17 * 13", 260)]


# ---- sandbox ------------------------------------------------------------------------------


def test_sandbox_runs_humaneval_canonical_as_passing_and_wrong_as_failing():
    from tokenmill.quant_eval.code_task import passes, read_problems

    problems = read_problems()
    assert len(problems) == 164
    for problem in problems[:3]:
        assert passes(problem, problem["canonical_solution"])
        assert not passes(problem, "    return None\n")


def test_sandbox_refuses_writes_outside_its_folder(tmp_path):
    from tokenmill.quant_eval.sandbox import run_python

    target = tmp_path / "outside.txt"
    attempts = [
        f"open({str(target)!r}, 'w').write('x')",
        f"import os; os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)",
        f"import pathlib; pathlib.Path({str(target)!r}).write_text('x')",
        # Past the Python guard: the kernel's read-only mounts refuse it where namespaces work.
        f"import sys; del sys.modules['_io']; import _io; _io.FileIO({str(target)!r}, 'w')",
        f"import os; os.remove({str(tmp_path / 'keep.txt')!r})",
    ]
    (tmp_path / "keep.txt").write_text("keep")
    for program in attempts:
        result = run_python(program, timeout_s=20)
        assert result.status == "failed", (program, result.output)
    assert not target.exists() and (tmp_path / "keep.txt").read_text() == "keep"
    inside = run_python("open('mine.txt', 'w').write('ok'); print(open('mine.txt').read())")
    assert inside.passed and inside.output.strip() == "ok"
    assert run_python("while True: pass", timeout_s=1).status == "timeout"


def test_sandbox_refuses_the_network():
    from tokenmill.quant_eval.sandbox import run_python

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    server.settimeout(0.2)
    accepted = []

    def accept_loop():
        while not stop.is_set():
            with contextlib.suppress(TimeoutError, OSError):
                accepted.append(server.accept())

    stop = threading.Event()
    thread = threading.Thread(target=accept_loop)
    thread.start()
    try:
        plain = f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2)"
        bypass = (
            "import sys; del sys.modules['_socket']; import _socket\n"
            f"s = _socket.socket(); s.settimeout(2); s.connect(('127.0.0.1', {port}))"
        )
        results = [run_python(plain, timeout_s=20), run_python(bypass, timeout_s=20)]
    finally:
        stop.set()
        thread.join()
        server.close()
    assert results[0].status == "failed" and "network access is disabled" in results[0].output
    if results[1].isolation in ("namespaces", "network-namespace"):
        assert results[1].status == "failed"
    assert not accepted
