"""wdmoe: wireless distributed Mixture-of-Experts LLMs (WDMoE).

Shape legend used in comments across the code base:
    T tokens (batch × sequence, flattened), D hidden size, E experts per layer,
    K router candidates per token (top-k), F expert FFN width, L MoE layers,
    U devices, V vocabulary.
"""

__version__ = "0.1.0"
