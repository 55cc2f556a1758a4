"""The `minisft` command: its parser and subcommands (commands), what each one does with files
(workflows, inside), and pinned downloads (fetch, datasets)."""
from minisft.cli.commands import main

__all__ = ["main"]
