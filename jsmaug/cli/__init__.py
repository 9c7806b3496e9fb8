"""The `jsmaug` command (main.py) and its subcommands; each module has main(argv) -> exit code."""
