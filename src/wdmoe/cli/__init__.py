"""The ``wdmoe`` command line: thin subcommands over the library.

common.py    consoles, the one-line ``error: …`` exit, progress bars, shared option parsing
model.py     model build | info | split          generate.py  generate (here or at a BS)
demo.py      demo (the main job)                 eval.py      eval
cell.py      cell show | allocate                runtime.py   serve-bs, device, stats, cluster
report.py    report, reproduce                   sweep.py     sweep
dashboard.py dashboard --replay (the live page's own options live with their commands)
app.py       the typer app assembling them (common ← commands ← app)
"""

from wdmoe.cli.app import app, main

__all__ = ["app", "main"]
