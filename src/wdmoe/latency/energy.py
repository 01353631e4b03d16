"""What a selection costs the devices in energy (pure): compute from FLOPs, radio from airtime.

For MoE layer l and device u with n_u tokens of its experts, priced by :mod:`wdmoe.latency.model`
(downlink airtime t^DL_u, uplink airtime t^UL_u in s):

    E^comp_u  = n_u · F_tok · ε_u                    J; F_tok FLOPs per token, ε_u J/FLOP
    E^radio_u = P^rx_u · t^DL_u + P^tx_u · t^UL_u    J; P^rx_u, P^tx_u in W
    P^tx_u    = P^rx_u + p_u                         W; p_u the radiated power (cell.device_power_dbm)

ε_u = P_u / C_u, the class's compute power over its effective FLOP/s, and P^rx_u, the radio's
draw while it receives, come from :mod:`wdmoe.latency.devices` (sources there). [assumption] a
transmitting radio draws its receive-chain power plus what it radiates (a power amplifier's losses
are left out, so P^tx is a lower bound: Huang et al., MobiSys 2012, measure 438 mW per Mb/s of LTE
uplink on top of β); no RRC tail or idle power is charged. A device with no work (n_u = 0) sends
and receives nothing (its airtimes are 0) and spends no energy. A call cut at its deadline is
charged in full: the BS stops waiting, the device still computes and answers.

A request's energy is the sum over its forwards, layers and devices; rows served together
(continuous batching) share a layer's messages, so each row is charged its share of the airtime,
its own tokens over the batch's (:func:`attribute`). Shapes: [..., U] (one layer [U], a forward
[L, U]).
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from wdmoe.channel.units import FloatArray, dbm_to_w
from wdmoe.latency.devices import DeviceClass, devices_for
from wdmoe.latency.model import DeviceTimes

if TYPE_CHECKING:
    from wdmoe.config import ScenarioConfig


@dataclass(frozen=True)
class EnergyModel:
    """Per device [U]: energy per FLOP ε_u (J/FLOP), radio draw receiving / transmitting (W)."""

    joules_per_flop: FloatArray
    rx_power_w: FloatArray
    tx_power_w: FloatArray

    @classmethod
    def for_devices(cls, devices: tuple[DeviceClass, ...], tx_radiated_w: Any) -> "EnergyModel":
        """The classes' ε_u and P^rx_u; P^tx_u = P^rx_u + the radiated power p_u (W, scalar or [U])."""
        eps = np.array([d.joules_per_flop for d in devices], dtype=np.float64)
        rx = np.array([d.radio_rx_w for d in devices], dtype=np.float64)
        return cls(eps, rx, rx + np.broadcast_to(np.asarray(tx_radiated_w, dtype=np.float64), rx.shape))

    @classmethod
    def from_scenario(cls, scenario: "ScenarioConfig", num_devices: int) -> "EnergyModel":
        """The scenario's device classes over U devices; p_u = ``cell.device_power_dbm`` in W."""
        devices = devices_for(scenario.cell.device_classes, num_devices)
        return cls.for_devices(devices, dbm_to_w(scenario.cell.device_power_dbm))


@dataclass(frozen=True)
class DeviceEnergy:
    """Energy per device [..., U] in J: computing experts and running the radio."""

    compute_j: FloatArray
    radio_j: FloatArray

    @property
    def total_j(self) -> FloatArray:
        return np.asarray(self.compute_j + self.radio_j)

    def per_device_j(self) -> FloatArray:
        """[U]: compute + radio summed over every leading axis (layers, forwards)."""
        total = self.total_j
        return np.asarray(total.reshape(-1, total.shape[-1]).sum(0))

    def sum_j(self) -> float:
        """Everything: all layers and devices (J)."""
        return float(self.total_j.sum())


def compute_energy_j(tokens: Any, flops_per_token: float, joules_per_flop: Any) -> FloatArray:
    """E^comp [..., U] = n_u · F_tok · ε_u (J) for tokens [..., U] and ε_u broadcastable to them."""
    return np.asarray(np.asarray(tokens, dtype=np.float64) * flops_per_token * joules_per_flop)


def radio_energy_j(downlink_s: Any, uplink_s: Any, rx_power_w: Any, tx_power_w: Any) -> FloatArray:
    """E^radio [..., U] = P^rx_u · t^DL_u + P^tx_u · t^UL_u (J) for airtimes [..., U] in s."""
    return np.asarray(np.multiply(rx_power_w, downlink_s) + np.multiply(tx_power_w, uplink_s))


def device_energy(
    model: EnergyModel, tokens: Any, times: DeviceTimes, flops_per_token: float
) -> DeviceEnergy:
    """Energy per device [..., U] of loads n_u [..., U] priced as ``times`` (module doc)."""
    return DeviceEnergy(
        compute_energy_j(tokens, flops_per_token, model.joules_per_flop),
        radio_energy_j(times.downlink_s, times.uplink_s, model.rx_power_w, model.tx_power_w),
    )


def attribute(energy: DeviceEnergy, own_tokens: Any, all_tokens: Any) -> DeviceEnergy:
    """One row's part of energy spent for a batch [..., U]: the share own/all of each device's
    compute and radio energy (0 where the batch gave the device nothing). A row priced alone has
    own = all: its energy unchanged."""
    own = np.asarray(own_tokens, dtype=np.float64)
    every = np.asarray(all_tokens, dtype=np.float64)
    share = np.divide(own, every, out=np.zeros(np.broadcast(own, every).shape), where=every > 0)
    return DeviceEnergy(np.asarray(energy.compute_j * share), np.asarray(energy.radio_j * share))
