"""The public names downstream code relies on: importable from `score_fast`, lazily."""
import subprocess
import sys

import score_fast

CONTRACT = ["pack", "plan_bins", "PackedBatch", "token_logprobs", "kl_penalty",
            "score_advantages", "score_loss", "linear_logprobs", "linear_score_loss"]


def test_public_names_resolve():
    for name in CONTRACT:
        assert name in score_fast.__all__, name
        assert callable(getattr(score_fast, name)), name


def test_import_does_not_load_triton():
    # Packing users should not pay for triton's import; the losses load it on first use.
    code = "import sys, score_fast; print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unknown_name_is_an_attribute_error():
    try:
        score_fast.no_such_op
    except AttributeError as e:
        assert "no_such_op" in str(e)
    else:
        raise AssertionError("expected AttributeError")


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    """The README's Python API example, as written: objects instead of paths, a TRL-style
    reward function and a callback that stops the run after its second step."""
    import os
    import re
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    code = re.search(r"<!-- api-example -->\s*```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    step, r2, policy_s = capsys.readouterr().out.split()[-3:]
    assert step == "2" and 0 <= float(r2) <= 1 and float(policy_s) > 0
    assert sorted(os.listdir(tmp_path / "runs" / "api")) == ["config.yaml", "metrics.jsonl"]
    assert "Trainer" in score_fast.__all__ and "Config" in score_fast.__all__
