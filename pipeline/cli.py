"""The `diffret` command: one click group; each subcommand is a module of pipeline/commands/.

A subcommand's module is imported only when it runs (or for `diffret --help`), so `train-generator`
and `evaluate` never load open_clip or decord, and `cache` does not load torch. Known failures
print one line (`Error: ...`) and exit with status 1 (commands/errors.py).
"""
from __future__ import annotations

from importlib import import_module

import click

# command name -> its module in diffret.pipeline.commands (which names it `command`)
COMMANDS = {"cache": "cache", "demo-data": "demo_data", "evaluate": "evaluate", "extract": "extract",
            "import-checkpoint": "import_checkpoint", "index": "index", "search": "search", "serve": "serve",
            "sweep": "sweep", "train-generator": "train_generator"}


class Commands(click.Group):
    """A group that imports a subcommand's module when the subcommand is asked for."""

    def list_commands(self, ctx) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        return import_module(f"diffret.pipeline.commands.{COMMANDS[name]}").command


@click.group(cls=Commands)
@click.version_option(package_name="diffret")
def main():
    """diffret: generative text-video retrieval (DiffusionRet) on a feature cache."""


if __name__ == "__main__":
    main()
