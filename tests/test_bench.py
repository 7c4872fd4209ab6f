import json
import logging
import sys

import pytest

from conftest import build_tiny_model, build_tiny_tokenizer
from sdlm import STGSDiffModel
from sdlm.bench import (
    BenchTarget,
    MethodReport,
    TargetFileError,
    TargetFinished,
    TargetResult,
    TargetStarted,
    load_base_config,
    load_targets,
    markdown_report,
    run_bench,
    solved_curve,
    speed_ratio,
    summarize,
    write_report,
)
from sdlm.objectives import greedy_generate


@pytest.fixture()
def tiny_dm():
    tok = build_tiny_tokenizer()
    return STGSDiffModel(build_tiny_model("llama", len(tok)), tok)


def _result(target_id, success, solved_at=None, steps=5, seconds=10.0, method="sdlm"):
    return TargetResult(
        method=method, target_id=target_id, target_text="x", success=success, text_success=success,
        steps=steps, seconds=seconds, solved_at=solved_at, prompt_text="p|q\nr", prompt_ids=[1, 2],
        token_accuracy=1.0 if success else 0.5, lcs_ratio=1.0 if success else 0.5,
    )


# -- target files ------------------------------------------------------------------------


def test_load_lmi_json_targets(tmp_path):
    path = tmp_path / "lmi.json"
    path.write_text(json.dumps({"metadata": {}, "samples": [
        {"id": "a", "prompt_tokens": [1, 2, 3], "target_tokens": [4, 5], "target_text": " hi"},
        {"id": "b", "prompt_tokens": [6, 7, 8], "target_tokens": [9], "target_text": "!"},
    ]}))
    targets = load_targets(path)
    assert [t.id for t in targets] == ["a", "b"]
    assert targets[0].target_ids == [4, 5]
    assert targets[0].target_text == " hi"
    assert targets[0].prompt_length == 3


def test_load_jsonl_targets(tmp_path):
    path = tmp_path / "targets.jsonl"
    path.write_text('"hello world"\n\n{"id": "x", "target": "fox"}\n{"text": "dog", "target_ids": [3, 4]}\n')
    targets = load_targets(path)
    assert [t.id for t in targets] == ["line_1", "x", "line_4"]
    assert targets[0].target_text == "hello world"
    assert targets[0].target_ids is None
    assert targets[1].target_text == "fox"
    assert targets[2].target_ids == [3, 4]
    assert targets[2].prompt_length is None


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.json", None, "not found"),
        ("bad.jsonl", '"ok"\n{not json\n', "line 2 is not valid JSON"),
        ("empty.jsonl", "\n\n", "no targets found"),
        ("list.json", '["a", "b"]', "JSON list is not supported"),
        ("nosamples.json", '{"data": []}', 'needs a "samples" list'),
        ("notarget.json", '{"samples": [{"id": "a", "prompt_tokens": [1]}]}', "sample 0: no target found"),
        ("badids.jsonl", '{"target_ids": [1, "2"]}\n', "list of token ids"),
        ("emptytext.jsonl", '""\n', "target text is empty"),
        ("number.jsonl", "42\n", "expected a JSON string or object"),
        ("dup.jsonl", '{"id": "a", "target": "x"}\n{"id": "a", "target": "y"}\n', "appears twice"),
        ("badjson.json", '{"samples": [', "invalid JSON"),
    ],
)
def test_bad_target_files_raise(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(TargetFileError, match=message):
        load_targets(path)


def test_directory_as_targets_file_raises(tmp_path):
    with pytest.raises(TargetFileError, match="is a directory"):
        load_targets(tmp_path)


# -- config ------------------------------------------------------------------------------


def test_base_config_needs_no_target(tmp_path):
    config = load_base_config(overrides=["optimizer.lr=0.5"])
    assert config.optimizer.lr == 0.5
    path = tmp_path / "base.yaml"
    path.write_text("prompt:\n  samples: 2\n")
    assert load_base_config(path).prompt.samples == 2


# -- runner ------------------------------------------------------------------------------


def test_run_bench_reports_each_target(tiny_dm):
    prompt_ids = tiny_dm.tokenizer.encode("hello world")
    reachable = greedy_generate(tiny_dm, prompt_ids, 3)
    config = load_base_config(overrides=[
        "prompt.init_text=hello world", "prompt.init_scale=20", "prompt.samples=2", "eval.every=1",
    ])
    targets = [
        BenchTarget(id="reachable", target_text=None, target_ids=reachable),
        BenchTarget(id="text", target_text="The end."),
    ]
    events = []
    report = run_bench(config, targets, max_steps=3, model=tiny_dm, on_event=events.append)
    assert [r.target_id for r in report.results] == ["reachable", "text"]
    first = report.results[0]
    assert first.success
    assert first.solved_at is not None
    assert first.solved_at <= first.seconds
    assert greedy_generate(tiny_dm, first.prompt_ids, len(reachable)) == reachable
    assert report.results[1].steps <= 3
    assert report.results[1].target_text == "The end."
    assert [type(e) for e in events] == [TargetStarted, TargetFinished, TargetStarted, TargetFinished]
    summary = report.summary()
    assert summary["targets"] == 2
    assert summary["solved"] >= 1
    assert summary["peak_memory_mb"] > 0


def test_run_bench_time_budget_ends_runs(tiny_dm):
    config = load_base_config(overrides=["prompt.length=3", "prompt.samples=1"])
    targets = [BenchTarget(id="t", target_text=None, target_ids=[5, 6, 7, 8, 9, 10, 11, 12])]
    report = run_bench(config, targets, max_seconds=0.5, model=tiny_dm)
    result = report.results[0]
    assert result.steps < 1_000_000
    assert result.seconds < 30
    assert report.settings["max_seconds"] == 0.5


def test_run_bench_rejects_bad_budget(tiny_dm):
    config = load_base_config()
    with pytest.raises(ValueError, match="max_seconds must be > 0"):
        run_bench(config, [BenchTarget("t", "x")], max_seconds=0, model=tiny_dm)
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        run_bench(config, [BenchTarget("t", "x")], max_steps=0, model=tiny_dm)


# -- summaries and reports ---------------------------------------------------------------


def test_summary_medians():
    results = [_result("a", True, 2.0, steps=4), _result("b", True, 6.0, steps=8), _result("c", False)]
    summary = summarize(results, peak_memory_mb=12.0)
    assert summary["solved"] == 2
    assert summary["median_seconds_to_success"] == 4.0
    assert summary["median_steps_to_success"] == 6
    assert summary["seconds_per_step"] == pytest.approx(30.0 / 17)
    assert summary["peak_memory_mb"] == 12.0


def test_summary_with_no_success():
    summary = summarize([_result("a", False)])
    assert summary["solved"] == 0
    assert summary["median_seconds_to_success"] is None


def test_solved_curve_steps_up_at_each_success():
    results = [_result("a", True, 2.0, seconds=2.0), _result("b", False, seconds=9.0), _result("c", True, 1.0, seconds=1.0)]
    xs, ys = solved_curve(results)
    assert xs == [0.0, 1.0, 1.0, 2.0, 2.0, 9.0]
    assert ys == [0.0, 0.0, 1 / 3, 1 / 3, 2 / 3, 2 / 3]


def _reports():
    fast = MethodReport("sdlm", {}, [_result("a", True, 2.0), _result("b", False)], peak_memory_mb=100.0)
    slow = MethodReport("gcg", {}, [_result("a", True, 20.0, method="gcg"), _result("b", True, 40.0, method="gcg")])
    return [fast, slow]


def test_speed_ratio_second_over_first():
    assert speed_ratio(_reports()) == pytest.approx(15.0)
    assert speed_ratio(_reports()[:1]) is None


def test_markdown_report_rows():
    text = markdown_report(_reports())
    assert "| sdlm | 1/2 |" in text
    assert "| gcg | 2/2 |" in text
    assert "gcg / sdlm: 15.0x" in text
    assert "### gcg" in text
    # Pipes and line breaks in prompts must not break the table.
    assert "p\\|q\\nr" in text


def test_target_line_states_steps_and_seconds_once():
    from sdlm.bench_render import target_line

    solved = target_line(TargetFinished(method="sdlm", index=0, total=2, result=_result("a", True, solved_at=6.8, steps=24, seconds=6.8)))
    assert solved.startswith("[sdlm] 1/2 a: solved in 24 steps, 6.8 s, token accuracy 1.00")
    assert solved.count(" s,") == 1
    unsolved = target_line(TargetFinished(method="sdlm", index=1, total=2, result=_result("b", False, steps=1, seconds=3.21)))
    assert "b: not solved in 1 step, 3.2 s, token accuracy 0.50" in unsolved


def test_write_report_files(tmp_path):
    pytest.importorskip("matplotlib")
    paths = write_report(_reports(), tmp_path / "out", meta={"cores": 2})
    data = json.loads(paths["json"].read_text())
    assert data["meta"] == {"cores": 2}
    assert [m["method"] for m in data["methods"]] == ["sdlm", "gcg"]
    assert data["methods"][1]["summary"]["solved"] == 2
    assert data["ratio_median_seconds"] == pytest.approx(15.0)
    assert paths["markdown"].read_text().startswith("| method |")
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"


def test_write_report_without_matplotlib(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with caplog.at_level(logging.WARNING, logger="sdlm"):
        paths = write_report(_reports(), tmp_path)
    assert "plot" not in paths
    assert not (tmp_path / "solved_vs_seconds.png").exists()
    assert "matplotlib is not installed" in caplog.text


# -- the CLI command ---------------------------------------------------------------------


@pytest.fixture()
def cli_model(monkeypatch, tiny_dm):
    import sdlm.optimize

    def load(config, *specs, **kwargs):
        tiny_dm.load_kwargs = kwargs  # what `sdlm bench` asked for, read by the tests
        return tiny_dm

    monkeypatch.setattr(sdlm.optimize, "load_diff_model", load)
    return tiny_dm


def _invoke(*args):
    from typer.testing import CliRunner

    from sdlm.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_bench_writes_results(tmp_path, cli_model):
    prompt_ids = cli_model.tokenizer.encode("hello world")
    reachable = greedy_generate(cli_model, prompt_ids, 3)
    targets = tmp_path / "targets.jsonl"
    targets.write_text(json.dumps({"id": "r", "target_ids": reachable}) + "\n" + json.dumps("The end.") + "\n")
    config = tmp_path / "base.yaml"
    config.write_text("prompt:\n  init_text: hello world\n  init_scale: 20\n  samples: 2\neval:\n  every: 1\n")
    out = tmp_path / "out"
    result = _invoke("bench", targets, "--config", config, "--max-steps", 2, "--output", out)
    assert result.exit_code in (0, 1), result.output
    assert "| sdlm |" in result.stdout
    assert "[sdlm] 1/2 r: solved" in result.stderr
    data = json.loads((out / "results.json").read_text())
    assert [r["target_id"] for r in data["methods"][0]["results"]] == ["r", "line_2"]
    assert data["methods"][0]["results"][0]["success"] is True
    assert data["meta"]["cores"] >= 1
    assert cli_model.load_kwargs == {"compile_default": True}
    assert data["methods"][0]["settings"]["compiled"] is False
    assert (out / "results.md").exists()


def test_cli_bench_limit_and_all_solved_exit_code(tmp_path, cli_model):
    reachable = greedy_generate(cli_model, cli_model.tokenizer.encode("hello world"), 3)
    targets = tmp_path / "targets.jsonl"
    targets.write_text(json.dumps({"target_ids": reachable}) + "\n" + json.dumps("never reached") + "\n")
    overrides = ["--set", "prompt.init_text=hello world", "--set", "prompt.init_scale=20", "--set", "eval.every=1"]
    result = _invoke("bench", targets, *overrides, "--limit", 1, "--max-steps", 2, "--output", tmp_path / "o", "-q")
    assert result.exit_code == 0, result.output
    assert result.stderr.strip().splitlines()[-1].startswith("results written to")
    assert "[sdlm]" not in result.stderr


def test_cli_bench_bad_targets_file(tmp_path, cli_model):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    result = _invoke("bench", bad)
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ")
    assert "line 1 is not valid JSON" in result.stderr
    missing = _invoke("bench", tmp_path / "missing.json")
    assert missing.exit_code == 2
    assert "not found" in missing.stderr


def test_load_reports_round_trip(tmp_path):
    from sdlm.bench import load_reports

    paths = write_report(_reports(), tmp_path, meta={"cores": 2})
    reports, meta = load_reports(paths["json"])
    assert meta == {"cores": 2}
    assert [r.method for r in reports] == ["sdlm", "gcg"]
    assert reports[0].results == _reports()[0].results
    assert reports[0].peak_memory_mb == 100.0


# -- benchmarks/sweep.py -----------------------------------------------------------------


def _sweep_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sweep.py"
    spec = importlib.util.spec_from_file_location("sweep", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_splits_variants_at_double_dash():
    sweep = _sweep_module()

    assert sweep.split_variants(["t.json", "--limit", "2"]) == (["t.json", "--limit", "2"], [[]])
    assert sweep.split_variants(["t.json", "--", "a=1", "b=2", "--", "c=3"]) == (["t.json"], [["a=1", "b=2"], ["c=3"]])


@pytest.mark.parametrize(
    "variants, message",
    [
        (["--", "prompt.samples=1", "--", "search.polsh_every=2"], "did you mean 'search.polish_every'"),
        (["--", "model.spec=smollm2", "--", "model.spec=other"], "different models"),
    ],
    ids=["typo-in-second-variant", "two-models"],
)
def test_sweep_rejects_bad_variants_before_running(tmp_path, capsys, variants, message):
    targets = tmp_path / "t.jsonl"
    targets.write_text('"hello"\n')

    code = _sweep_module().main([str(targets), "--output", str(tmp_path / "out"), *variants])

    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sweep_rejects_missing_targets(tmp_path, capsys):
    code = _sweep_module().main([str(tmp_path / "nope.json")])

    assert code == 2
    assert "not found" in capsys.readouterr().err
