"""What a selection costs in the cell (pure): the latency model, the BS's view, the cell, pricing.

    model.py    the formulas: message bits, DL/compute/UL per device, the layer's wait, BS compute
    view.py     ExpertLatency: the latency view a policy decides on (the BS's estimate, placement, B_u)
    cell.py     Cell: scenario + channel trace + the BS's CSI; its snapshot at time t (estimate,
                truth, view)
    pricing.py  price_layer / price_forward: one path that prices a layer and a forward, called by
                the simulator, the BS and the latency study alike
    overhead.py the software's own cost per message: samples and running estimate of what a real
                call takes beyond its price (measured by the runtime, priced through pricing.py)
    energy.py   what the devices spend: compute (FLOPs × J/FLOP) and radio (power × airtime), per
                layer and device (constants per device class in devices.py)

The names of ``model.py`` are re-exported here; import the others from their modules (they read the
scenario config, which itself imports the device classes of this package).
"""

from wdmoe.latency.model import (
    DeviceTimes,
    ExpertCost,
    Latency,
    LayerDemand,
    bs_layer_flops,
    bs_seconds,
    device_time_s,
    device_times,
    expert_flops_per_token,
    forward_latency,
    layer_demand,
    lm_head_flops,
    payload_bits,
    transfer_s,
    waiting_s,
)

__all__ = [
    "DeviceTimes",
    "ExpertCost",
    "Latency",
    "LayerDemand",
    "bs_layer_flops",
    "bs_seconds",
    "device_time_s",
    "device_times",
    "expert_flops_per_token",
    "forward_latency",
    "layer_demand",
    "lm_head_flops",
    "payload_bits",
    "transfer_s",
    "waiting_s",
]
