"""Command-line options shared by the commands: ``--config``, ``--set``, flags from config
fields, and the one way a command turns them into a validated config.

A command's settings form one tree whose sections mean the same in every command: ``model.*``
(the model's shape), ``train.*`` (the training loop the command runs), ``eval.*`` (evaluation),
``finetune.*`` (how and on what to fine-tune). ``--config FILE`` reads a YAML file of such
sections, flags set single fields, and ``--set section.field=value`` reaches any field.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable

from llmforge.config import add_flags, deep_merge, flag_overrides, parse_sets
from llmforge.errors import ConfigError


def add_config_options(p: argparse.ArgumentParser, sections: str, *, config_help: str | None = None) -> None:
    p.add_argument("--config", metavar="FILE", default=None,
                   help=config_help or "a recipe: YAML with model:/train: sections (a name in configs/train, or a path)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help=f"set any field by its dotted path ({sections}), e.g. --set train.lr=3e-4; repeatable")


def add_run_options(p: argparse.ArgumentParser, *, prefect: bool = True) -> None:
    from llmforge import tracking

    p.add_argument("--experiment", default=tracking.EXPERIMENT,
                   help=f"MLflow experiment (default: {tracking.EXPERIMENT})")
    if prefect:
        p.add_argument("--no-prefect", action="store_true", help="run directly, not as a Prefect flow")


def settings(args: argparse.Namespace, base: dict[str, Any] | None, validate: Callable[[dict, str], Any],
             base_source: str) -> tuple[Any, dict[str, Any]]:
    """Merge ``base`` (a config file's content), the flags and ``--set``, validating after each
    flag and each ``--set`` so an error names the option that holds the bad value. Returns (config,
    the overrides the command line added on top of ``base``)."""
    from llmforge.config import flatten_dotted, nest

    data = dict(base or {})
    validate(data, base_source)
    flags = flag_overrides(args)
    for key, value in flatten_dotted(flags).items():
        option = "--" + key.rsplit(".", 1)[-1].replace("_", "-")
        _check(validate, deep_merge(data, nest(key, value)), f"{option} {value}", key)
    data = deep_merge(data, flags)
    sets = parse_sets(args.sets)
    for item in args.sets:
        key = item.partition("=")[0].strip()
        _check(validate, deep_merge(data, parse_sets([item])), f"--set {item}", key)
    data = deep_merge(data, sets)
    return validate(data, "options"), deep_merge(flags, sets)


def _check(validate: Callable[[dict, str], Any], data: dict, source: str, key: str) -> None:
    """Validate; an error about ``key`` is said about the option alone (no repeated field path)."""
    try:
        validate(data, source)
    except ConfigError as e:
        msg = str(e).replace(f"{source}: {key}: ", f"{source}: ").replace(f"unknown key {key}", "unknown key")
        raise ConfigError(msg) from None


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    """Flags for every sampling field, and ``--set sampling.NAME=VALUE`` (generate, chat)."""
    from llmforge.model.generate import SamplingConfig

    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="sets",
                   help="a sampling field, e.g. --set sampling.top_k=40; repeatable")
    add_flags(p, SamplingConfig, "sampling", title="sampling options (also --set sampling.NAME=VALUE)")


def sampling_from(args: argparse.Namespace):
    """The validated :class:`~llmforge.model.generate.SamplingConfig` of those options."""
    from llmforge.model.generate import GenerateOptions

    root, _ = settings(args, {}, lambda d, src: GenerateOptions.load(d, source=src), "defaults")
    return root.sampling


__all__ = ["add_config_options", "add_flags", "add_run_options", "settings"]
