"""The subcommands of `diffret`, one module each (pipeline/cli.py groups them), and what they share:
options made from config dataclasses (options.py), one-line errors (errors.py), consoles, the
progress bar and the metrics table (output.py)."""
