"""`tokenmill plan` end to end: a table, a JSON object, a comparison, and clear errors."""

import json
import re

import pytest

from tokenmill.cli.main import main


def _run(capsys, *argv):
    code = main(["plan", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_json_has_the_documented_keys(capsys):
    code, out, _ = _run(
        capsys, "--model", "llama-3.1-8b", "--hardware", "h100", "--workload",
        "fixed:in=200,out=50", "--concurrency", "8", "--num-prompts", "16", "--json",
        "--slo", "ttft=500ms,tpot=50ms",
    )  # fmt: skip
    assert code == 0
    res = json.loads(out)
    for key in ("ttft_s", "tpot_s", "per_user_tok_s", "throughput_tok_s", "chips",
                "cost_per_mtok_usd", "joules_per_token", "placement"):  # fmt: skip
        assert key in res
    assert res["chips"] == 1 and res["placement"]["tp"] == 1
    assert 0 < res["tpot_s"] < 0.05 and res["throughput_tok_s"] > 0
    assert res["slo"]["meets"] in (True, False)


def test_plan_table_on_groq(capsys):
    code, out, _ = _run(
        capsys, "--model", "llama-3.1-70b", "--hardware", "groq-lpu", "--weights-dtype", "fp8",
        "--workload", "fixed:in=100,out=20", "--rate", "20", "--num-prompts", "20",
    )  # fmt: skip
    assert code == 0
    assert re.search(r"TP\s+\d+\s+x\s+PP\s+\d+", out)
    assert "groq-lpu" in out and "$" in out and "J per output token" in out


def test_compare_ranks_and_plots(capsys, tmp_path):
    plot = tmp_path / "pareto.png"
    code, out, _ = _run(
        capsys, "--model", "llama-3.1-8b", "--compare", "h100,l4,groq-lpu",
        "--workload", "fixed:in=100,out=20", "--concurrency", "4", "--num-prompts", "8",
        "--slo", "tpot=100ms", "--plot", str(plot),
    )  # fmt: skip
    assert code == 0
    assert "cheapest meeting the SLO" in out
    assert plot.stat().st_size > 1000


def test_list(capsys):
    code, out, _ = _run(capsys, "--list")
    assert code == 0 and "cerebras-wse3" in out and "llama-3.1-405b" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "gpt-9", "--hardware", "h100", "--concurrency", "1"], "llama-3.1-8b"),
        (["--model", "llama-3.1-8b", "--hardware", "tpu9", "--concurrency", "1"], "groq-lpu"),
        (["--model", "llama-3.1-70b", "--hardware", "h100", "--chips", "1", "--concurrency", "1"],
         "short by"),
        (["--model", "llama-3.1-8b", "--hardware", "h100", "--concurrency", "1", "--slo",
          "ttft=-5ms"], "positive"),
        (["--model", "llama-3.1-8b", "--hardware", "h100", "--concurrency", "1", "--slo",
          "speed=fast"], "bad SLO"),
        (["--model", "llama-3.1-8b", "--hardware", "h100", "--concurrency", "1", "--workload",
          "fixed:in=0,out=5"], ">= 1"),
        (["--model", "llama-3.1-8b", "--hardware", "h100"], "--concurrency"),
        (["--model", "llama-3.1-8b", "--hardware", "h100", "--rate", "-2"], "rate"),
        (["--model", "llama-2-70b", "--hardware", "b200", "--concurrency", "1", "--workload",
          "fixed:in=4000,out=1000"], "context"),
    ],
)  # fmt: skip
def test_bad_input_is_a_clear_error(capsys, argv, message):
    code, out, err = _run(capsys, *argv)
    assert code == 2
    assert err.startswith("tokenmill: error:") and message in err
    assert "Traceback" not in err
