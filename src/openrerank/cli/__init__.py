"""The `openrerank` command line: `serve` and the subcommands wired to it."""
