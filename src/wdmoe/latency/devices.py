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
"""

from dataclasses import dataclass

import numpy as np

from wdmoe.channel.units import FloatArray
from wdmoe.errors import ConfigError

EFFICIENCY = 0.25  # [our choice] sustained fraction of dense FP16 peak for expert FFNs
GIB = 2**30


@dataclass(frozen=True)
class DeviceClass:
    """A kind of device: effective compute [FLOP/s] and memory [bytes]."""

    name: str
    effective_flops_per_s: float
    memory_bytes: int


DEVICE_CLASSES: dict[str, DeviceClass] = {
    c.name: c
    for c in (
        DeviceClass("phone", EFFICIENCY * 4.0e12, 12 * GIB),
        DeviceClass("jetson-orin-nano", EFFICIENCY * 5.1e12, 8 * GIB),
        DeviceClass("jetson-agx-orin", EFFICIENCY * 21.3e12, 64 * GIB),
        DeviceClass("laptop", EFFICIENCY * 28.0e12, 8 * GIB),
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
