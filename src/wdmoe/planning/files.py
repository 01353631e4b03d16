"""The placement file: what ``wdmoe plan`` writes and the simulator and ``wdmoe cluster`` read.

JSON, one object:

    {"format": "wdmoe-placement", "version": 1,
     "num_devices": U, "num_experts": E, "layers": [MoE layer ids, decoder order],  (L of them)
     "placement": [[device of expert e of layer index l, …] per layer],           [L, E] primaries
     "devices": [{"device": u, "shards": [[layer id, expert], …]}, …],            U shard lists
     … anything else (expected latency, the config) is kept but not read}

A shard is keyed (decoder layer id, expert) like :func:`wdmoe.runtime.cluster.shard_key`. Every
(layer, expert) must be on some device, its primary among its hosts. Reading a bad file raises
ConfigError naming the file and the fault.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wdmoe.errors import ConfigError
from wdmoe.planning.optimise import IntArray, Placement

FORMAT, VERSION = "wdmoe-placement", 1


@dataclass(frozen=True)
class PlacementFile:
    """A read placement: layer ids [L], primaries [L, E] (layer index, expert → device) and the
    shard lists of the U devices ((layer id, expert) pairs)."""

    layers: tuple[int, ...]
    primary: IntArray
    shards: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def num_devices(self) -> int:
        return len(self.shards)


def placement_dict(placement: Placement, layers: list[int], num_devices: int, **extra: Any) -> dict[str, Any]:
    """The file's JSON object for ``placement`` of MoE layers ``layers`` (ids, decoder order)."""
    p = placement.primary
    devices = [
        {"device": u, "shards": [[layers[li], e] for li, e in keys]}
        for u, keys in enumerate(placement.shards(num_devices))
    ]
    head = {"format": FORMAT, "version": VERSION, "num_devices": num_devices}
    return {
        **head,
        "num_experts": int(p.shape[1]),
        "layers": layers,
        "placement": p.tolist(),
        "devices": devices,
        **extra,
    }


def write_placement(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def _load(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(
            f"placement file {str(path)!r} does not exist; write one with `wdmoe plan --out FILE`"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"placement file {str(path)!r} is not JSON: {e}") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise ConfigError(f"placement file {str(path)!r} is not a {FORMAT} version {VERSION} file")
    return data


def _parse(path: Path, data: dict[str, Any]) -> PlacementFile:
    try:
        layers = tuple(int(i) for i in data["layers"])
        primary = np.array(data["placement"], dtype=np.int64)
        shards = tuple(
            tuple(sorted((int(k[0]), int(k[1])) for k in d["shards"]))
            for d in sorted(data["devices"], key=lambda d: int(d["device"]))
        )
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise ConfigError(f"placement file {str(path)!r} is malformed: {type(e).__name__}: {e}") from e
    if primary.ndim != 2 or primary.shape[0] != len(layers):
        raise ConfigError(
            f"placement file {str(path)!r}: 'placement' has shape {primary.shape}, expected "
            f"({len(layers)}, E) for its {len(layers)} layers"
        )
    return PlacementFile(layers, primary, shards)


def check_consistent(path: Path, f: PlacementFile) -> None:
    """Every primary in range and among the shard lists' hosts of its (layer, expert)."""
    u = f.num_devices
    if f.primary.size and not (f.primary.min() >= 0 and f.primary.max() < u):
        raise ConfigError(
            f"placement file {str(path)!r}: devices {sorted(set(f.primary.ravel().tolist()))} "
            f"are outside 0..{u - 1} (its {u} shard lists)"
        )
    for li, layer in enumerate(f.layers):
        for e, device in enumerate(f.primary[li]):
            if (layer, e) not in f.shards[device]:
                raise ConfigError(
                    f"placement file {str(path)!r}: (layer {layer}, expert {e}) has primary device "
                    f"{device}, whose shard list does not hold it"
                )


def read_placement(
    path: Path, num_devices: int | None = None, num_layers: int | None = None, num_experts: int | None = None
) -> PlacementFile:
    """Read and check a placement file, against the cell's devices and the model's L and E when given."""
    path = Path(path)
    f = _parse(path, _load(path))
    check_consistent(path, f)
    want = {"devices": num_devices, "MoE layers": num_layers, "experts per layer": num_experts}
    got = {"devices": f.num_devices, "MoE layers": len(f.layers), "experts per layer": f.primary.shape[1]}
    for what, n in want.items():
        if n is not None and got[what] != n:
            raise ConfigError(
                f"placement file {str(path)!r} is for {got[what]} {what}, but this run has {n}; "
                "plan again for this cell and model (wdmoe plan)"
            )
    return f
