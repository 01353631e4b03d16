"""Device classes: how fast a device runs an expert and how much it can hold.

``effective_flops_per_s`` is what the latency model divides an expert's FLOPs by (SPEC §4:
t_compute = n·F/C_u). [our choice] It is 25 % of the device's dense FP16 peak — small-batch expert
FFNs are memory-bound and reach a fraction of peak; change it per class when a testbed measures
better. Peaks and memories, and where they come from:

- phone: Qualcomm Snapdragon 8 Gen 2 (Adreno 740), ≈ 4.0 TFLOPS FP16 (vendor-independent
  estimates; Qualcomm does not publish FLOPS), 12 GB LPDDR5X shared (typical flagship).
  https://www.qualcomm.com/products/mobile/snapdragon/smartphones/snapdragon-8-series-mobile-platforms/snapdragon-8-gen-2-mobile-platform
- jetson-orin-nano: NVIDIA Jetson Orin Nano 8GB — 1024-core Ampere GPU, 32 Tensor Cores, 625 MHz,
  8 SMs × 1024 FP16 FLOP/clk ≈ 5.1 TFLOPS dense FP16 (40 TOPS INT8 sparse, datasheet), 8 GB LPDDR5
  at 68 GB/s. NVIDIA Jetson Orin Nano Series Data Sheet (DS-11105-001).
- jetson-agx-orin: NVIDIA Jetson AGX Orin 64GB — 2048-core Ampere GPU, 64 Tensor Cores, 1.3 GHz,
  16 SMs × 1024 FP16 FLOP/clk ≈ 21.3 TFLOPS dense FP16 (275 TOPS INT8 sparse incl. DLAs),
  64 GB LPDDR5 at 204.8 GB/s. NVIDIA Jetson AGX Orin Series Data Sheet (DS-10662-001).
- laptop: NVIDIA GeForce RTX 4060 Laptop GPU — 24 SMs, ≈ 2.3 GHz boost, ≈ 512 FP16 (FP32-acc)
  tensor FLOP/clk/SM ≈ 28 TFLOPS dense, 8 GB GDDR6 (NVIDIA product page; per-SM rate from the
  Ada Lovelace architecture whitepaper, RTX 4090: 165 TFLOPS over 128 SMs at 2.52 GHz).

Energy (:mod:`wdmoe.latency.energy`). ``compute_power_w`` is what the class draws while it runs
experts at its peak clock; a device running at ``effective_flops_per_s`` for the compute time draws
that power, so its energy per FLOP is ε_u = P_u / C_u (J/FLOP; memory-bound kernels pay the full
board power for a quarter of the peak FLOPs). [assumption] the whole module power is charged to
the experts (no idle floor subtracted):

- phone: 7.5 W, the Snapdragon 8 Gen 2 SoC's measured draw in GPU benchmarks (7.3–7.6 W, Golden
  Reviewer, reported by Notebookcheck, "GPU des Snapdragon 8 Gen 2 übertrifft Performance und
  Effizienz des Apple A16 Bionic", 2023) → ε ≈ 7.5 pJ/FLOP.
- jetson-orin-nano: 15 W, the top power mode of the Orin Nano 8GB (modes 7 W / 15 W, DS-11105-001)
  whose GPU clock the 5.1 TFLOPS above assumes → ε ≈ 11.8 pJ/FLOP.
- jetson-agx-orin: 60 W, MAXN of the AGX Orin 64GB (15–60 W, DS-10662-001), the mode of its
  1.3 GHz GPU clock → ε ≈ 11.3 pJ/FLOP.
- laptop: 115 W, the top of the RTX 4060 Laptop GPU's total graphics power range (35–115 W, NVIDIA
  product page), where its boost clock holds → ε ≈ 16.4 pJ/FLOP.

``radio_rx_w`` is the radio's draw while it receives (W). Every class reaches the BS over the
same cellular link, so every class gets one LTE modem's number: β = 1288.04 mW, the base power of
a phone's LTE radio in its connected state while moving data (Huang et al., "A close examination
of performance and power characteristics of 4G LTE networks", MobiSys 2012, Table 3: P = α·rate +
β with α_d = 51.97 mW/(Mb/s) downlink, α_u = 438.39 mW/(Mb/s) uplink). [assumption] the
throughput term α·rate is left out (≈ 0.5 W at 10 Mb/s downlink) and so is the RRC tail after a
transfer (the devices stay connected between layers, a tail is not spent per call).
"""

from dataclasses import dataclass

import numpy as np

from wdmoe.channel.units import FloatArray
from wdmoe.errors import ConfigError

EFFICIENCY = 0.25  # [our choice] sustained fraction of dense FP16 peak for expert FFNs
GIB = 2**30
LTE_RX_W = 1.28804  # β of Huang et al., MobiSys 2012, Table 3 (module doc)


@dataclass(frozen=True)
class DeviceClass:
    """A kind of device: effective compute [FLOP/s], memory [bytes], the power it draws while it
    computes [W] and its radio's draw while it receives [W] (module doc: sources)."""

    name: str
    effective_flops_per_s: float
    memory_bytes: int
    compute_power_w: float = 0.0
    radio_rx_w: float = LTE_RX_W

    @property
    def joules_per_flop(self) -> float:
        """ε_u = P_u / C_u [J/FLOP]: the energy of one FLOP run at the effective rate."""
        return self.compute_power_w / self.effective_flops_per_s


DEVICE_CLASSES: dict[str, DeviceClass] = {
    c.name: c
    for c in (
        DeviceClass("phone", EFFICIENCY * 4.0e12, 12 * GIB, compute_power_w=7.5),
        DeviceClass("jetson-orin-nano", EFFICIENCY * 5.1e12, 8 * GIB, compute_power_w=15.0),
        DeviceClass("jetson-agx-orin", EFFICIENCY * 21.3e12, 64 * GIB, compute_power_w=60.0),
        DeviceClass("laptop", EFFICIENCY * 28.0e12, 8 * GIB, compute_power_w=115.0),
    )
}


def device_class(name: str, field: str = "device class") -> DeviceClass:
    """The named class, or a ConfigError listing the known ones."""
    if name not in DEVICE_CLASSES:
        raise ConfigError(
            f"{field} = {name!r} is not a known device class; allowed: {', '.join(DEVICE_CLASSES)}"
        )
    return DEVICE_CLASSES[name]


def devices_for(names: tuple[str, ...], num_devices: int) -> tuple[DeviceClass, ...]:
    """The class of each of the U devices: ``names`` repeated cyclically to length U."""
    return tuple(device_class(names[u % len(names)]) for u in range(num_devices))


def effective_flops_per_s(devices: tuple[DeviceClass, ...]) -> FloatArray:
    """C_u [U] in FLOP/s."""
    return np.array([d.effective_flops_per_s for d in devices], dtype=np.float64)
