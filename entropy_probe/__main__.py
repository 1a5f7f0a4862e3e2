"""``python -m entropy_probe``: the command line (:mod:`entropy_probe.cli`)."""
from .cli import main

main()
