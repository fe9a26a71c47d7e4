"""The `score-fast` command.

    score-fast demo                                   # built-in demo: no files, no downloads
    score-fast train --config run.yaml [--stage2.alpha=5 --train.resume=true ...]
    score-fast eval --checkpoint runs/x/checkpoint-400 --data test.jsonl
    score-fast train --help                           # every field with its default

The configuration is score_fast.config (typed dataclasses) read by jsonargparse: a YAML file
(--config) plus dotted overrides. The resolved config is saved as run_dir/config.yaml (and
in every checkpoint); `eval` reads the run's reward, fields and instruction from the
checkpoint's config.yaml (math defaults when there is none)."""
from __future__ import annotations

import logging
import os
import sys

import yaml
from jsonargparse import ActionConfigFile, ArgumentParser

from score_fast.config import Config, EvalConfig, config_from_dict

__all__ = ["main", "build_parser", "parse_config", "run_eval"]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="score-fast", description="SCoRe self-correction training")
    sub = parser.add_subcommands(dest="command")
    train = ArgumentParser(description="Stage I then Stage II SCoRe training")
    train.add_argument("--config", action=ActionConfigFile, help="YAML config file")
    train.add_class_arguments(Config, None)
    sub.add_subcommand("train", train, help="train from a YAML config and overrides")
    ev = ArgumentParser(description="greedy two-attempt evaluation of a checkpoint")
    ev.add_class_arguments(EvalConfig, None)
    sub.add_subcommand("eval", ev, help="evaluate a checkpoint on a data file")
    demo = ArgumentParser(description="the built-in arithmetic demo (tiny Llama, CPU)")
    demo.add_argument("--run_dir", type=str, default="runs/demo", help="where the demo writes")
    sub.add_subcommand("demo", demo, help="run the built-in demo end to end")
    return parser


def parse_config(argv) -> Config | EvalConfig | str:
    """The dataclass config of a `train` or `eval` command line (the demo's run_dir)."""
    args = build_parser().parse_args(list(argv))
    ns = args[args.command].as_dict()
    ns.pop("config", None)
    ns.pop("__path__", None)
    if args.command == "train":
        return config_from_dict(ns)
    if args.command == "eval":
        return EvalConfig(**ns)
    return ns["run_dir"]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = parse_config(argv)
    if isinstance(config, Config):
        from score_fast.trainer import Trainer
        Trainer(config).train()
    elif isinstance(config, EvalConfig):
        run_eval(config)
    else:
        from score_fast.demo import run_demo
        run_demo(run_dir=config)
    return 0


def run_eval(ec: EvalConfig) -> dict:
    from score_fast.data import load_rows
    from score_fast.metrics import format_table
    from score_fast.trainer import evaluate, load_model, load_tokenizer, make_reward_from
    model = load_model(ec.checkpoint, "--checkpoint")
    saved = os.path.join(ec.checkpoint, "config.yaml")
    config = Config()
    if os.path.isfile(saved):
        with open(saved) as f:
            config = config_from_dict(yaml.safe_load(f) or {})
    rows = load_rows(ec.data, config.required_fields(), limit=ec.limit)
    tok = load_tokenizer(ec.checkpoint)
    m = evaluate(model, tok, config, rows, make_reward_from(config), ec.max_new_tokens)
    print(format_table({os.path.basename(os.path.normpath(ec.checkpoint)): m}))
    return m


if __name__ == "__main__":
    sys.exit(main())
