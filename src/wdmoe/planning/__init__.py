"""Expert placement by channel (issue 14 item 3): which device hosts which (layer, expert) shard.

optimise.py  the pure optimiser: expected layer latency J(p), greedy + local search, brute force
inputs.py    its inputs: router usage on calibration text, the average channel, memory in shards
files.py     the placement file ``wdmoe plan`` writes and the simulator / ``wdmoe cluster`` read
"""

from wdmoe.planning.files import PlacementFile, read_placement
from wdmoe.planning.optimise import InfeasiblePlanError, Placement, PlanProblem, plan

__all__ = ["InfeasiblePlanError", "Placement", "PlacementFile", "PlanProblem", "plan", "read_placement"]
