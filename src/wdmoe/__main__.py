"""``python -m wdmoe``: the same as the ``wdmoe`` command."""

from wdmoe.cli import main

main()
