"""Studies: what the model does in a simulated cell, measured over benchmark tasks.

runner.py     one evaluation point (model, policy, scenario, simulation, scoring) on tasks → records
sweep/        a grid file expanded into points, run in parallel into one resumable file
report/       records → table rows (speed-ups, Δaccuracy), Markdown and plots
reproduce.py  the paper-style comparison end to end, into a folder
demo.py       the main job: top-k against WDMoE-θ on one channel trace, side by side
"""
