"""The wireless cell (pure): geometry and mobility, path loss, fading, rates → ChannelState.

trace = generate_trace(load_scenario("paper"), num_blocks=100, seed=0)
state = trace.state(0)                      # immutable snapshot: gains, SNR, rates per Hz
state.ul.rate_bps(state.equal_share_hz())   # [U] bit/s at B/U each
"""

from wdmoe.channel.fading import FADING, doppler_hz, gauss_markov, jakes_rho
from wdmoe.channel.geometry import MOBILITY, drop_annulus
from wdmoe.channel.pathloss import PATHLOSS
from wdmoe.channel.state import ChannelState, Link, spectral_efficiency
from wdmoe.channel.trace import ChannelTrace, LinkBudget, generate_trace

__all__ = [
    "FADING",
    "MOBILITY",
    "PATHLOSS",
    "ChannelState",
    "ChannelTrace",
    "Link",
    "LinkBudget",
    "doppler_hz",
    "drop_annulus",
    "gauss_markov",
    "generate_trace",
    "jakes_rho",
    "spectral_efficiency",
]
