"""`python -m advantage`: the same as the `advantage` command."""

from advantage.cli import app

app(prog_name="advantage")
