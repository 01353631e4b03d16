"""Scenario configuration: typed, validated frozen dataclasses loaded from TOML presets.

    load_scenario("paper", overrides=["cell.bandwidth_hz=10e6", "model=smollm2-moe8"])

Presets live in ``configs/scenarios/NAME.toml`` (the cell, channel, mobility and wire) and
``configs/models/NAME.toml`` (model dimensions); a scenario names its model, or gives a table.
Overrides are dotted ``section.field=value`` strings whose value is parsed as TOML (bare words are
strings). Every bad value raises :class:`ConfigError` naming the field, the value and the allowed
range. Defaults follow SPEC §3–4.
"""

import datetime
import math
import os
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from wdmoe.channel.fading import FADING
from wdmoe.channel.geometry import MOBILITY
from wdmoe.channel.pathloss import PATHLOSS
from wdmoe.errors import ConfigError
from wdmoe.formats import FORMATS, FormatError, check_rule
from wdmoe.latency.devices import DEVICE_CLASSES

INF = math.inf


def check_range(name: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> None:
    """Raise ConfigError unless lo ≤ value ≤ hi (lo < value with ``lo_open``)."""
    ok = (value > lo if lo_open else value >= lo) and value <= hi and not math.isnan(value)
    if not ok:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise ConfigError(f"{name} = {value!r} is out of range; allowed: {interval}")


def check_choice(name: str, value: object, allowed: Iterable[object]) -> None:
    """Raise ConfigError unless value is one of ``allowed``."""
    options = list(allowed)
    if value not in options:
        raise ConfigError(f"{name} = {value!r} is not allowed; choose one of: {', '.join(map(str, options))}")


@dataclass(frozen=True)
class CellConfig:
    """The cell: geometry, band, powers, noise, device classes and the BS server.

    ``positions_m`` (pairs, metres, BS at the origin) replaces the annulus drop when given.
    ``device_classes`` is repeated cyclically over the U devices. ``bs_height_m`` /
    ``ut_height_m`` default to the path-loss model's own (TR 38.901) values when absent.
    ``min_se_bps_per_hz``: below it a link is down for the fading block (default: the lowest CQI
    of 3GPP TS 38.214 Table 5.2.2.1-2, see :mod:`wdmoe.latency.deadline`; 0 turns outage off).
    ``csi_period_s``: how often the BS refreshes its channel estimate (absent: every fading block).
    ``placement``: a placement file of ``wdmoe plan`` (JSON; absent: expert e on device e mod U).
    """

    num_devices: int = 8
    r_min_m: float = 10.0
    r_max_m: float = 300.0
    positions_m: tuple[tuple[float, float], ...] = ()
    device_classes: tuple[str, ...] = ("jetson-agx-orin",)
    bandwidth_hz: float = 20e6
    carrier_hz: float = 2e9
    bs_power_dbm: float = 43.0
    device_power_dbm: float = 23.0
    noise_psd_dbm_per_hz: float = -174.0
    bs_noise_figure_db: float = 5.0
    device_noise_figure_db: float = 9.0
    snr_gap_db: float = 0.0
    max_se_bps_per_hz: float = INF
    bs_height_m: float | None = None
    ut_height_m: float | None = None
    bs_flops_per_s: float = 1e14
    overhead_s: float = 0.0
    min_se_bps_per_hz: float = 0.1523
    csi_period_s: float | None = None
    placement: str | None = None

    def __post_init__(self) -> None:
        check_range("cell.num_devices", self.num_devices, 1, 100_000)
        check_range("cell.r_max_m", self.r_max_m, 0.0, 1e5, lo_open=True)
        if not 0.0 < self.r_min_m <= self.r_max_m:
            allowed = f"(0, cell.r_max_m = {self.r_max_m:g}]"
            raise ConfigError(f"cell.r_min_m = {self.r_min_m!r} is out of range; allowed: {allowed}")
        self._check_positions()
        if not self.device_classes:
            raise ConfigError("cell.device_classes = [] is empty; give at least one device class")
        for name in self.device_classes:
            check_choice("cell.device_classes", name, DEVICE_CLASSES)
        check_range("cell.bandwidth_hz", self.bandwidth_hz, 0.0, 1e11, lo_open=True)
        check_range("cell.carrier_hz", self.carrier_hz, 0.5e9, 100e9)
        check_range("cell.bs_power_dbm", self.bs_power_dbm, -50.0, 80.0)
        check_range("cell.device_power_dbm", self.device_power_dbm, -50.0, 50.0)
        check_range("cell.noise_psd_dbm_per_hz", self.noise_psd_dbm_per_hz, -200.0, -100.0)
        check_range("cell.bs_noise_figure_db", self.bs_noise_figure_db, 0.0, 30.0)
        check_range("cell.device_noise_figure_db", self.device_noise_figure_db, 0.0, 30.0)
        check_range("cell.snr_gap_db", self.snr_gap_db, 0.0, 20.0)
        check_range("cell.max_se_bps_per_hz", self.max_se_bps_per_hz, 0.0, INF, lo_open=True)
        if self.bs_height_m is not None:
            check_range("cell.bs_height_m", self.bs_height_m, 1.0, 150.0)
        if self.ut_height_m is not None:
            check_range("cell.ut_height_m", self.ut_height_m, 1.0, 22.5)
        check_range("cell.bs_flops_per_s", self.bs_flops_per_s, 0.0, INF, lo_open=True)
        check_range("cell.overhead_s", self.overhead_s, 0.0, 10.0)
        check_range("cell.min_se_bps_per_hz", self.min_se_bps_per_hz, 0.0, 30.0)
        if self.csi_period_s is not None:
            check_range("cell.csi_period_s", self.csi_period_s, 0.0, 3600.0, lo_open=True)

    def _check_positions(self) -> None:
        if not self.positions_m:
            return
        if len(self.positions_m) != self.num_devices:
            raise ConfigError(
                f"cell.positions_m has {len(self.positions_m)} positions; allowed: exactly "
                f"cell.num_devices = {self.num_devices}"
            )
        for u, (x_m, y_m) in enumerate(self.positions_m):
            check_range(f"cell.positions_m[{u}] distance", math.hypot(x_m, y_m), 1.0, 1e5)


@dataclass(frozen=True)
class ChannelConfig:
    """Path loss, LOS, shadowing and fading. ``shadowing_std_db`` absent: the model's own σ.

    ``los``: "random" (drawn from the model's LOS probability), "los" or "nlos" (forced).
    ``coherence_s``: the fading block length T; ``correlation`` of the fading across blocks:
    "jakes" (sum of sinusoids, autocorrelation J0(2π f_D m T) at every lag m), "ar1"
    (Gauss-Markov, ρ = J0(2π f_D T) per block, ρ^m at lag m) or "iid" (independent blocks).
    """

    pathloss: str = "macro"
    los: str = "random"
    shadowing_std_db: float | None = None
    fading: str = "rayleigh"
    rician_k_db: float = 6.0
    coherence_s: float = 0.01
    correlation: str = "jakes"

    def __post_init__(self) -> None:
        check_choice("channel.pathloss", self.pathloss, PATHLOSS.names())
        check_choice("channel.los", self.los, ("random", "los", "nlos"))
        if self.shadowing_std_db is not None:
            check_range("channel.shadowing_std_db", self.shadowing_std_db, 0.0, 30.0)
        check_choice("channel.fading", self.fading, FADING.names())
        check_range("channel.rician_k_db", self.rician_k_db, -30.0, 40.0)
        check_range("channel.coherence_s", self.coherence_s, 0.0, 10.0, lo_open=True)
        check_choice("channel.correlation", self.correlation, ("jakes", "ar1", "iid"))


@dataclass(frozen=True)
class MobilityConfig:
    """How devices move; ``speed_mps`` also sets the Doppler of the fading (even when static:
    the surroundings move)."""

    model: str = "static"
    speed_mps: float = 1.0

    def __post_init__(self) -> None:
        check_choice("mobility.model", self.model, MOBILITY.names())
        check_range("mobility.speed_mps", self.speed_mps, 0.0, 100.0)


@dataclass(frozen=True)
class WireConfig:
    """What a hidden state costs on the air: bits per element (16: bf16; 8/4 with activation
    quantization) and a header per message. ``format`` (:mod:`wdmoe.formats`): ``none`` prices
    ``bits_per_element`` and leaves the values exact (the paper's setting); a format name prices
    that format's own bits (row scales included) and the simulator applies its rounding;
    ``adaptive`` gives each device, per layer, a format by its link's SNR on the BS's estimate:
    ``adaptive_formats[i]`` (strong → weak links) for SNR between ``adaptive_snr_db[i]`` and
    ``adaptive_snr_db[i-1]`` dB (decreasing thresholds)."""

    bits_per_element: int = 16
    header_bits: int = 512
    format: str = "none"
    adaptive_formats: tuple[str, ...] = ("bfloat16", "int8")
    adaptive_snr_db: tuple[float, ...] = (15.0,)

    def __post_init__(self) -> None:
        check_choice("wire.bits_per_element", self.bits_per_element, (1, 2, 4, 8, 16, 32))
        check_range("wire.header_bits", self.header_bits, 0, 1e9)
        check_choice("wire.format", self.format, ("none", *FORMATS, "adaptive"))
        try:
            check_rule(self.adaptive_formats, self.adaptive_snr_db)
        except FormatError as err:
            raise ConfigError(f"wire.adaptive_formats / wire.adaptive_snr_db: {err}") from None


@dataclass(frozen=True)
class ModelConfig:
    """Model dimensions for latency: D hidden, F expert FFN width, L MoE layers, E experts, top-k."""

    name: str
    hidden_size: int
    ffn_size: int
    num_layers: int
    num_experts: int
    top_k: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int

    def __post_init__(self) -> None:
        for f in ("hidden_size", "ffn_size", "num_layers", "num_experts", "num_heads", "vocab_size"):
            check_range(f"model.{f}", getattr(self, f), 1, 10**9)
        check_range("model.top_k", self.top_k, 1, self.num_experts)
        check_range("model.num_kv_heads", self.num_kv_heads, 1, self.num_heads)

    @property
    def kv_size(self) -> int:
        """D_kv = D·H_kv/H: the width of the K and V projections (grouped-query attention)."""
        return self.hidden_size * self.num_kv_heads // self.num_heads


@dataclass(frozen=True)
class ScenarioConfig:
    """Everything a channel trace and the latency model need, plus the default seed."""

    name: str
    model: ModelConfig
    seed: int = 0
    cell: CellConfig = field(default_factory=CellConfig)
    channel: ChannelConfig = field(default_factory=ChannelConfig)
    mobility: MobilityConfig = field(default_factory=MobilityConfig)
    wire: WireConfig = field(default_factory=WireConfig)

    def __post_init__(self) -> None:
        check_range("seed", self.seed, 0, 2**63 - 1)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (to print or save with a result)."""
        return asdict(self)


# --- building dataclasses from TOML data ------------------------------------------------------


def _coerce(name: str, hint: Any, value: Any) -> Any:
    """Check a TOML value against a field's type (int, float, str, X | None, tuple[...])."""
    if isinstance(hint, types.UnionType):
        if value is None or value in ("none", "null"):
            return None
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _coerce(name, inner, value)
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{name} = {value!r} has the wrong type; allowed: a list")
        item = typing.get_args(hint)
        if item[-1] is Ellipsis:
            return tuple(_coerce(f"{name}[{i}]", item[0], v) for i, v in enumerate(value))
        if len(value) != len(item):
            raise ConfigError(f"{name} = {value!r} has {len(value)} items; allowed: exactly {len(item)}")
        return tuple(_coerce(f"{name}[{i}]", t, v) for i, (t, v) in enumerate(zip(item, value, strict=True)))
    ok = {
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, int | float) and not isinstance(value, bool),
        str: isinstance(value, str),
        bool: isinstance(value, bool),
    }[hint]
    if not ok:
        raise ConfigError(f"{name} = {value!r} has the wrong type; allowed: {hint.__name__}")
    return float(value) if hint is float else value


def build(cls: Any, data: Mapping[str, Any], section: str) -> Any:
    """Build dataclass ``cls`` from a table; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{section} = {data!r} has the wrong type; allowed: a table")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{section}.{key} is not a field; allowed: {', '.join(sorted(known))}")
    for f in fields(cls):
        if f.name not in data and f.default is MISSING and f.default_factory is MISSING:
            raise ConfigError(
                f"{section}.{f.name} is missing; allowed: a value of type {hints[f.name].__name__}"
            )
    values = {key: _coerce(f"{section}.{key}", hints[key], value) for key, value in data.items()}
    return cls(**values)


# --- presets and overrides ----------------------------------------------------------------------


def configs_dir() -> Path:
    """``$WDMOE_CONFIGS`` or the repository's ``configs/`` folder."""
    env = os.environ.get("WDMOE_CONFIGS")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "configs"


def preset_names(kind: str) -> list[str]:
    """Names of the presets of ``kind`` ("scenarios" or "models")."""
    return sorted(p.stem for p in (configs_dir() / kind).glob("*.toml"))


def _read_preset(kind: str, name: str, field_name: str) -> dict[str, Any]:
    path = Path(name) if name.endswith(".toml") else configs_dir() / kind / f"{name}.toml"
    if not path.is_file():
        known = ", ".join(preset_names(kind)) or "(none found)"
        raise ConfigError(f"{field_name} = {name!r} is not a known preset or file; allowed: {known}")
    with path.open("rb") as f:
        return tomllib.load(f)


Value = bool | int | float | str | list[Any] | dict[str, Any]


def parse_value(text: str) -> Value:
    """A value typed on the command line, read as a TOML literal: ``10e6`` → 1e7, ``[1, 2]`` →
    [1, 2], ``"7"`` → "7", ``true`` → True (in any case: ``True``, as lm-eval and Python write it).
    Numbers Python reads that TOML does not (``.5``) are floats. What is not one TOML literal
    (``minmax``, ``/path/to/model``), or is a date, stays its bare text, stripped. The one reader
    of `--set`, `--param`, grid strings and lm-eval model_args."""
    raw = text.strip()
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    try:
        doc = tomllib.loads(f"v = {raw}")
    except tomllib.TOMLDecodeError:
        return python_number(raw)
    value = doc["v"]
    if len(doc) != 1 or isinstance(value, datetime.date | datetime.time):
        return raw
    result: Value = value
    return result


def python_number(raw: str) -> Value:
    """``.5``, ``5.``, ``1E3``: numbers Python reads that TOML does not; other text stays text."""
    try:
        number = float(raw)
    except ValueError:
        return raw
    return number if math.isfinite(number) else raw


def parse_assignment(text: str, error: str) -> tuple[str, Value]:
    """``"name=value"`` → (name, :func:`parse_value` of value); without "=" or a name, raise
    ConfigError(``error``), which the caller words for its option."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(error)
    return key.strip(), parse_value(raw)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"cell.bandwidth_hz=10e6"`` → (["cell", "bandwidth_hz"], 1e7); bare words are strings."""
    key, value = parse_assignment(text, f"override {text!r} is malformed; allowed: section.field=value")
    return key.split("."), value


def _set(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(path)}: {part} is not a table")
    node[path[-1]] = value


def resolve(raw: dict[str, Any], overrides: Iterable[str] = (), name: str = "custom") -> ScenarioConfig:
    """Apply overrides to raw scenario data, load its model preset, validate everything."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    parsed = [parse_override(o) for o in overrides]
    for path, value in parsed:
        if path == ["model"]:
            data["model"] = value
    model = data.get("model")
    if isinstance(model, str):
        data["model"] = {"name": Path(model).stem, **_read_preset("models", model, "model")}
    for path, value in parsed:
        if path != ["model"]:
            _set(data, path, value)
    return _scenario_from(data, name)


def _scenario_from(data: dict[str, Any], name: str) -> ScenarioConfig:
    sections = {"cell": CellConfig, "channel": ChannelConfig, "mobility": MobilityConfig, "wire": WireConfig}
    known = {"name", "seed", "model", *sections}
    for key in data:
        if key not in known:
            raise ConfigError(f"{key} is not a scenario field; allowed: {', '.join(sorted(known))}")
    if "model" not in data:
        raise ConfigError("model is missing; allowed: a model preset name or a [model] table")
    parts = {key: build(cls, data.get(key, {}), key) for key, cls in sections.items()}
    seed = _coerce("seed", int, data.get("seed", 0))
    model = build(ModelConfig, data["model"], "model")
    return ScenarioConfig(name=str(data.get("name", name)), model=model, seed=seed, **parts)


def load_scenario(name: str, overrides: Iterable[str] = ()) -> ScenarioConfig:
    """Load a scenario preset (by name, or a path to a .toml file) and apply dotted overrides."""
    raw = _read_preset("scenarios", name, "scenario")
    return resolve(raw, overrides, name=Path(name).stem)
