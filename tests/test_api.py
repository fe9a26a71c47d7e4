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


def test_the_repo_root_shadows_no_installed_package():
    """From the repo root (`python -m` and `python -c` put it first on sys.path) the tree's
    kernels/ must not hide PyPI's `kernels`, which transformers >= 5.25 imports: the folder
    has no __init__.py, so it is at most an empty namespace that any installed `kernels`
    wins over; score_fast.kernels is still the tree's folder, from the root and elsewhere."""
    import importlib.metadata
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert not os.path.exists(os.path.join(root, "kernels", "__init__.py"))
    code = ("import transformers, score_fast.kernels.token_logprobs as t\n"
            "transformers.LlamaConfig()\n"
            "try:\n    import kernels\nexcept ImportError:\n    kernels = None\n"
            "print(getattr(kernels, '__file__', None))\nprint(t.__file__)")
    for cwd in (root, os.path.dirname(root)):
        out = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        found, ours = out.stdout.split()
        assert ours == os.path.join(root, "kernels", "token_logprobs.py")
        try:  # HF's kernels installed: it is the one imported
            dist = importlib.metadata.distribution("kernels")
            assert found == str(dist.locate_file("kernels/__init__.py")), found
        except importlib.metadata.PackageNotFoundError:
            assert found == "None" or not found.startswith(root), found
    for argv in (["-m", "score_fast", "train", "--help"],
                 ["-m", "torch.distributed.run", "--nproc_per_node=1", "-m", "score_fast",
                  "eval", "--help"]):
        out = subprocess.run([sys.executable, *argv], cwd=root, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0 and "--" in out.stdout, (argv, out.stderr[-2000:])
