"""The `score-fast` command.

    score-fast demo                                   # built-in demo: no files, no downloads
    score-fast train --config run.yaml [--stage2.alpha=5 --train.resume=true ...]
    score-fast train --recipe math --model.path M --data.train_file math.jsonl   # the paper's
    score-fast eval --checkpoint runs/x/checkpoint-400 --data test.jsonl [--kind math|code]
        [--samples 8 --temperature 0.7]   # + self-consistency vs self-correction (Fig. 1 right)
    score-fast ablate [--seeds 0 1 2] [--quick]       # the Table 4 ablations on the demo task
    score-fast plan --model qwen2.5-7b [--lora_rank 16 --offload true] | --table  # memory
    score-fast plot runs/x                            # runs/x/curves.png from metrics.jsonl
    score-fast train --help                           # every field with its default

The configuration is score_fast.config (typed dataclasses) read by jsonargparse: a YAML file
(--config) plus dotted overrides. The resolved config is saved as run_dir/config.yaml (and
in every checkpoint); `eval` reads the run's reward, fields and instruction from the
checkpoint's config.yaml, unless the data file's fields do not fit them: then the format
the fields fit (MATH, HumanEval, MBPP: score_fast.evaluation) decides."""
from __future__ import annotations

import argparse
import difflib
import importlib.resources
import inspect
import logging
import os
import re
import sys
from typing import Optional

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

from score_fast.config import Config, EvalConfig, config_from_dict

__all__ = ["main", "build_parser", "parse_config", "run_eval"]

log = logging.getLogger("score_fast")


def build_parser() -> ArgumentParser:
    # --help shows each config field's docstring (score_fast/config.py). allow_abbrev=False
    # on every parser: argparse would take --train.sav for --train.save_every, and a typo
    # that is a prefix (--rollout.max_new_token) for the option it starts
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog="score-fast", exit_on_error=False, allow_abbrev=False,
                            description="SCoRe self-correction training")
    sub = parser.add_subcommands(dest="command")
    train = ArgumentParser(exit_on_error=False, allow_abbrev=False,
                           description="Stage I then Stage II SCoRe training",
                           # not the ~90 lines of every option: they follow, by section
                           usage="%(prog)s [--recipe RECIPE] [--config CONFIG] "
                                 "[--SECTION.FIELD VALUE ...]")
    train.add_argument("--recipe", type=str, default=None,
                       help=f"the paper's settings for a benchmark, applied where it stands on "
                            f"the command line (later options override): "
                            f"{' | '.join(recipe_names())} (score_fast/recipes/), or a YAML "
                            f"file")
    train.add_argument("--config", action=ActionConfigFile, help="YAML config file")
    train.add_class_arguments(Config, None)
    _section_headers(train)
    sub.add_subcommand("train", train, help="train from a YAML config and overrides")
    ev = ArgumentParser(exit_on_error=False, allow_abbrev=False,
                        description="greedy two-attempt evaluation of a checkpoint "
                                    "(MATH / HumanEval / MBPP files detected by their fields)")
    ev.add_class_arguments(EvalConfig, None)
    _section_headers(ev)
    sub.add_subcommand("eval", ev, help="evaluate a checkpoint on a data file")
    demo = ArgumentParser(exit_on_error=False, allow_abbrev=False,
                          description="the built-in arithmetic demo (tiny Llama, CPU)")
    demo.add_argument("--run_dir", type=str, default="runs/demo", help="where the demo writes")
    demo.add_argument("--seed", type=int, default=0, help="warm-up, sampling and RL seed")
    demo.add_argument("--rollout_backend", type=str, default="hf", choices=["hf", "vllm"],
                      help="how RL samples (rollout.backend); evaluation decodes with hf")
    sub.add_subcommand("demo", demo, help="run the built-in demo end to end")
    ab = ArgumentParser(exit_on_error=False, allow_abbrev=False,
                        description="the paper's ablations (Table 4) on the demo task, "
                                    "several seeds (score_fast.demo.ablate)")
    ab.add_argument("--out", type=str, default="runs/ablate", help="where results go")
    ab.add_argument("--seeds", type=list[int], default=[0, 1, 2], help="one run per seed")
    ab.add_argument("--quick", type=bool, default=False,
                    help="smoke run: short warm-up, 2 + 2 RL steps")
    ab.add_argument("--workers", type=int, default=2, help="parallel worker processes")
    sub.add_subcommand("ablate", ab, help="ablation table + plot on the demo task")
    plan = ArgumentParser(exit_on_error=False, allow_abbrev=False,
                          description="predicted peak device memory of one training step "
                                      "and which devices it fits (score_fast.memory)")
    plan.add_argument("--model", type=Optional[str], default=None,
                      help="a built-in shape (qwen2.5-7b, ...), a model directory, a "
                           "config.json, or a hub id in the local HF cache")
    plan.add_argument("--dtype", type=str, default="bf16", help="fp32 | bf16 | fp16")
    plan.add_argument("--lora_rank", type=int, default=0, help="0: full fine-tune")
    plan.add_argument("--offload", type=bool, default=False,
                      help="optimizer offload: master, grads and AdamW in host memory")
    plan.add_argument("--gradient_checkpointing", type=Optional[bool], default=None,
                      help="null: on from 1B parameters (the trainer's rule)")
    plan.add_argument("--device", type=Optional[str], default=None,
                      help="also the step's predicted time per phase at its roofline and the "
                           "bound that applies (score_fast.steptime): A100 | H100 | H200 | "
                           "B200 (data-sheet rates) | host (this machine's, measured)")
    from score_fast.memory import StepShape
    plan.add_class_arguments(StepShape, None)
    _section_headers(plan)
    plan.add_argument("--table", action="store_true",
                      help="the 1.5B / 7B / 14B x settings x devices table (markdown)")
    sub.add_subcommand("plan", plan, help="memory plan: does a model fit a device (and "
                                          "how long its step takes there)")
    plot = ArgumentParser(exit_on_error=False, allow_abbrev=False,
                          description="a run's curves from its metrics.jsonl as a PNG "
                                      "(score_fast.plots)")
    plot.add_argument("run_dir", type=str, help="the run's train.run_dir")
    plot.add_argument("--out", type=Optional[str], default=None,
                      help="the PNG (default: RUN_DIR/curves.png)")
    sub.add_subcommand("plot", plot, help="plot a run's metrics")
    return parser


def _section_headers(parser: ArgumentParser) -> None:
    """--help's group header of each config section: "rollout: sampling both attempts: ...",
    the section's key and the title jsonargparse gives it (the section field's docstring,
    else the first line of its dataclass's docstring, score_fast/config.py), with the rest
    of that docstring as the group's text. A dataclass without a docstring would be titled
    with its repr (dataclasses' generated __doc__): the key alone then."""
    for key, group in parser.groups.items():
        cls = getattr(group, "group_class", None)  # None: the class at the top (Config)
        doc = cls.__doc__ if cls is not None else None
        if doc and doc.startswith(f"{cls.__name__}("):
            doc = None
        title = group.title or ""
        if title.startswith(f"{getattr(cls, '__name__', key)}("):
            title = ""
        if f"--{key}" in parser._option_string_actions:  # a section: --rollout CONFIG
            group.title = f"{key}: {title}" if title else key
        else:
            group.title = title or None
        rest = inspect.cleandoc(doc).partition("\n")[2].strip() if doc else ""
        if rest:
            group.description = " ".join(rest.split())


def recipe_names() -> list[str]:
    return sorted(p.stem for p in importlib.resources.files("score_fast").joinpath(
        "recipes").iterdir() if p.name.endswith(".yaml"))


def recipe_path(name: str) -> str:
    """A shipped recipe's YAML file (score_fast/recipes/NAME.yaml), or `name` itself when
    it is a YAML file; ValueError naming the recipes otherwise."""
    if name in recipe_names():
        return str(importlib.resources.files("score_fast").joinpath("recipes", f"{name}.yaml"))
    if name.endswith((".yaml", ".yml")) and os.path.isfile(name):
        return name
    raise ValueError(f"--recipe {name!r}: not a recipe ({', '.join(recipe_names())}) and not "
                     f"a YAML file")


def _expand_recipe(argv: list[str]) -> list[str]:
    """`--recipe X` -> `--config <X's YAML>` in place, so options after it override it."""
    out = []
    it = iter(argv)
    for a in it:
        if a == "--recipe" or a.startswith("--recipe="):
            name = a.split("=", 1)[1] if "=" in a else next(it, None)
            if name is None:
                raise ValueError("--recipe needs a name: " + ", ".join(recipe_names()))
            out += ["--config", recipe_path(name)]
        else:
            out.append(a)
    return out


def parse_config(argv) -> Config | EvalConfig | dict:
    """The dataclass config of a `train` or `eval` command line; for `demo` and `ablate`
    their options as a dict with "command"."""
    argv = list(argv)
    if argv[:1] == ["train"]:
        argv = _expand_recipe(argv)
    args = build_parser().parse_args(argv)
    ns = args[args.command].as_dict()
    ns.pop("config", None)
    ns.pop("recipe", None)
    ns.pop("__path__", None)
    if args.command == "train":
        return config_from_dict(ns)
    if args.command == "eval":
        return EvalConfig(**ns)
    return {"command": args.command, **ns}


# what a wrong config, path or install raises: one line on stderr, exit status 2
# (SCORE_FAST_DEBUG=1: the traceback instead)
_COMMANDS = ("train", "eval", "demo", "ablate", "plan", "plot")
_USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
                NotImplementedError, ImportError, argparse.ArgumentError)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        return _run(argv)
    except KeyboardInterrupt as e:  # Ctrl-C: 130 (128 + SIGINT) and one line, no traceback
        from score_fast.trainer import TrainingInterrupted
        if not isinstance(e, TrainingInterrupted):  # that one logged its line: the step
            print("score-fast: interrupted (before the first step: nothing was written "
                  "to resume from)" if argv[:1] == ["train"] else "score-fast: interrupted",
                  file=sys.stderr)
        return 130
    except _USER_ERRORS as e:
        if os.environ.get("SCORE_FAST_DEBUG", "0") not in ("", "0"):
            raise
        if isinstance(e, argparse.ArgumentError):  # jsonargparse's, over two lines: one
            sub = argv[0] if argv and argv[0] in _COMMANDS else None
            text = " ".join(str(e).split())
            print(f"score-fast: error: {text}{_did_you_mean(text, sub)} (score-fast "
                  f"{sub + ' ' if sub else ''}--help lists every option)", file=sys.stderr)
            return 2
        print(f"score-fast: error: {e} ({type(e).__name__}; SCORE_FAST_DEBUG=1 shows the "
              f"traceback)", file=sys.stderr)
        return 2


def _did_you_mean(error: str, command: str | None) -> str:
    """"; did you mean --train.save_every?" for each unrecognized option of `error` that is
    close to one of `command`'s (allow_abbrev=False: a prefix is not taken as the option)."""
    m = re.search(r"unrecognized arguments: (.*)", error)
    if not m or command is None:
        return ""
    sub = build_parser()._subcommands_action._name_parser_map[command]
    known = [o for o in sub._option_string_actions if o.startswith("--")]
    hints = []
    for word in m.group(1).split():
        name = word.split("=", 1)[0]
        if name.startswith("--"):
            # compared without the dashes every option shares (--nope is not --model)
            close = difflib.get_close_matches(name[2:], [o[2:] for o in known], n=1,
                                              cutoff=0.75)
            close = ["--" + c for c in close]
            # a prefix of one option only (--train.sav) is the likeliest meaning
            starts = [o for o in known if o.startswith(name)]
            best = starts[0] if len(starts) == 1 else close[0] if close else None
            if best:
                hints.append((name, best))
    if len(hints) == 1:
        return f"; did you mean {hints[0][1]}?"
    return ("; did you mean " + ", ".join(f"{b} (for {n})" for n, b in hints) + "?"
            if hints else "")


def _run(argv: list[str]) -> int:
    config = parse_config(argv)
    if isinstance(config, Config):
        from score_fast.trainer import Trainer
        Trainer(config).train()
    elif isinstance(config, EvalConfig):
        run_eval(config)
    elif config["command"] == "ablate":
        from score_fast.demo.ablate import run_ablation
        run_ablation(config["out"], seeds=tuple(config["seeds"]), quick=config["quick"],
                     workers=config["workers"])
    elif config["command"] == "plot":
        from score_fast.plots import plot_run
        print(plot_run(config["run_dir"], config["out"]))
    elif config["command"] == "plan":
        from score_fast.memory import plan_text
        print(plan_text(config))
    else:
        from score_fast.demo.experiment import run_demo
        run_demo(run_dir=config["run_dir"], seed=config["seed"],
                 rollout_backend=config["rollout_backend"])
    return 0


def run_eval(ec: EvalConfig) -> dict:
    """Greedy two-attempt metrics of a checkpoint on a data file, over all problems and per
    level / subject / type where the rows have them; with --samples K also the inference-time
    scaling comparison (score_fast.evaluation). Prints the tables and returns {"kind",
    "metrics": {"all": ..., "level=1": ...}, "scaling": ... or None}."""
    import torch

    from score_fast import evaluation as ev
    from score_fast.metrics import format_table
    from score_fast.models import load_model, load_tokenizer, resolve_dtype
    from score_fast.rewards import make_reward_from
    model = load_model(ec.checkpoint, "--checkpoint",
                       resolve_dtype("auto", ec.checkpoint, "--checkpoint"))
    saved_path = os.path.join(ec.checkpoint, "config.yaml")
    saved = None
    if os.path.isfile(saved_path):
        with open(saved_path) as f:
            saved = config_from_dict(yaml.safe_load(f) or {})
    task = ev.load_task(ec.data, saved, kind=ec.kind, limit=ec.limit)
    if ec.samples:
        ev.vote_key(task.kind)  # a reward that cannot vote fails before any generation
    if saved is not None and task.kind != saved.reward.kind:
        log.info("the checkpoint was trained with the %s reward; %s's fields are %s: "
                 "evaluating with the %s reward", saved.reward.kind, ec.data, task.kind,
                 task.kind)
    tok = load_tokenizer(ec.checkpoint)
    model.to("cuda" if torch.cuda.is_available() else "cpu")
    name = os.path.basename(os.path.normpath(ec.checkpoint))
    scaling = None
    with make_reward_from(task.config) as reward:
        metrics = ev.evaluate_greedy(model, tok, task, reward, ec.max_new_tokens)
        print(f"{name} on {ec.data}: {task.kind}, {len(task.rows)} problems, both attempts "
              f"greedy")
        print(format_table(metrics, label=name, count=True, edit_ratio=True))
        if ec.samples:
            torch.manual_seed(ec.seed)
            scaling = ev.inference_scaling(model, tok, task, reward, ec.samples,
                                           ec.temperature, ec.max_new_tokens)
            print()
            print(ev.format_scaling(scaling))
    return {"kind": task.kind, "metrics": metrics, "scaling": scaling}


if __name__ == "__main__":
    sys.exit(main())
