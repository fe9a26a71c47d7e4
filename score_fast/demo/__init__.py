"""The built-in demo experiment, kept apart from the library: the toy arithmetic task
(task.py), `score-fast demo` (experiment.py) and `score-fast ablate` (ablate.py). Tests,
benchmarks and examples build their tiny models and tokenizers from task.py."""
