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


def test_compare_without_an_slo_ranks_instead_of_crashing(capsys):
    code, out, err = _run(
        capsys, "--model", "llama-3.1-8b", "--compare", "h100,groq-lpu", "--workload",
        "fixed:in=100,out=20", "--concurrency", "4", "--num-prompts", "8", "--plot", "none",
    )  # fmt: skip
    assert code == 0 and "Traceback" not in err
    assert "SLO none" in out and "cheapest per output token: h100" in out
    rows = [line for line in out.splitlines() if re.match(r"\s+\d[* ] ", line)]
    assert len(rows) == 2 and all(line.rstrip().endswith("-") for line in rows)


def _json_plan(capsys, *argv):
    code, out, _ = _run(capsys, *argv, "--json")
    assert code == 0
    return json.loads(out)


def test_more_chips_never_lower_throughput(capsys):
    """Extra wafers become copies or deeper pipelines, whichever serves more. A 70B model on 8 or
    16 wafers was deepened to 8 or 16 stages, each extra hop slowing a single user down; and 64
    users on 4 wafers were refused instead of queued."""
    argv = ["--model", "llama-3.1-70b", "--hardware", "cerebras-wse3", "--workload",
            "fixed:in=200,out=50", "--num-prompts", "8"]  # fmt: skip
    for users in (1, 64):
        throughput = []
        for chips in (4, 8, 16):
            res = _json_plan(capsys, *argv, "--concurrency", str(users), "--chips", str(chips))
            throughput.append(res["throughput_tok_s"])
            assert res["chips"] <= chips and res["placement"]["pp"] == 4
        assert throughput == sorted(throughput), (users, throughput)


def test_size_finds_the_fewest_replicas_meeting_the_slo(capsys):
    """No cap at 4x the fewest chips: 8B at 1,500 req/s needs more than 4 H100s."""
    argv = [
        "--model",
        "llama-3.1-8b",
        "--hardware",
        "h100",
        "--workload",
        "fixed:in=100,out=10",
        "--rate",
        "1500",
        "--slo",
        "ttft=100ms,tok_s_per_user=100",
        "--num-prompts",
        "32",
        "--tp",
        "1",
    ]
    res = _json_plan(capsys, *argv, "--size")  # fmt: skip
    best = res["best"]
    assert best["slo"]["meets"] and best["slo"]["target"] == "p99 ttft <= 100 ms, tpot <= 10 ms"
    assert best["chips"] > 4
    fewer = best["placement"]["replicas"] - 1
    pl = best["placement"]
    one_less = _json_plan(capsys, *argv, "--replicas", str(fewer), "--chips",
                          str(pl["chips_per_replica"]))  # fmt: skip
    assert one_less["slo"]["meets"] is False
    costs = [d["cost_per_mtok_usd"] for d in res["designs"]]
    assert costs == sorted(costs)


def test_list_verbose_names_every_fitted_or_guessed_figure(capsys):
    code, out, _ = _run(capsys, "--list", "--verbose")
    assert code == 0
    fitted = [line for line in out.splitlines() if line.strip().startswith("[fitted]")]
    assert any("groq-lpu" in out and "per_kernel_overhead_us" in line for line in fitted)
    for line in out.splitlines():
        if line.strip().startswith("["):
            assert re.match(r"\s+\[(fitted|guess|secondary|derived)\] \S+ = \S+ +\(.+\)$", line)
    assert "PERIODS_MEASURED" in out and "ELECTRICITY_USD_PER_KWH" in out


def test_sweep_draws_the_crossover_chart(capsys, tmp_path):
    plot = tmp_path / "sweep.png"
    code, out, _ = _run(
        capsys, "--model", "llama-3.1-8b", "--sweep", "concurrency=1,16", "--compare",
        "h100x2,cerebras-wse3", "--workload", "fixed:in=100,out=20", "--num-prompts", "16",
        "--plot", str(plot),
    )  # fmt: skip
    assert code == 0 and plot.stat().st_size > 10_000
    table = [line.split() for line in out.splitlines() if line.startswith(("h100x2", "cerebras"))]
    assert [(row[0], row[1]) for row in table] == [
        ("h100x2", "1"),
        ("cerebras-wse3", "1"),
        ("h100x2", "16"),
        ("cerebras-wse3", "16"),
    ]
    crossover = out.split("least J/token", 1)[1].split()
    assert crossover[:4] == ["1", "h100x2", "cerebras-wse3", "h100x2"]
