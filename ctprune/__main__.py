"""`python -m ctprune ...` (and `torchrun -m ctprune ...`) run the CLI."""

from ctprune.cli import _entry

_entry()
