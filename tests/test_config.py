"""Scenario presets, dotted overrides, and an error naming field, value and range for each bad value."""

import math

import pytest

from wdmoe.config import ScenarioConfig, load_scenario, parse_override, preset_names, resolve
from wdmoe.errors import ConfigError, WdmoeError


def test_presets_load_with_their_dimensions():
    assert {"paper", "lab"} <= set(preset_names("scenarios"))
    assert {"mixtral-8x7b", "smollm2-moe8"} <= set(preset_names("models"))
    paper = load_scenario("paper")
    assert (paper.cell.num_devices, paper.cell.r_min_m, paper.cell.r_max_m) == (8, 10.0, 300.0)
    assert (paper.cell.bandwidth_hz, paper.channel.fading, paper.channel.pathloss) == (
        20e6,
        "rayleigh",
        "macro",
    )
    assert len(set(paper.cell.device_classes)) > 1  # heterogeneous
    m = paper.model
    assert (m.name, m.hidden_size, m.ffn_size, m.num_layers, m.num_experts, m.top_k) == (
        "mixtral-8x7b",
        4096,
        14336,
        32,
        8,
        2,
    )
    s = load_scenario("lab").model
    assert (s.name, s.hidden_size, s.ffn_size, s.num_layers, s.num_experts, s.top_k) == (
        "smollm2-moe8",
        576,
        192,
        30,
        8,
        7,
    )


def test_overrides_apply_to_a_loaded_preset():
    cfg = load_scenario(
        "paper",
        [
            "cell.bandwidth_hz=10e6",
            "model=smollm2-moe8",
            "model.top_k=4",
            "channel.pathloss=uma",
            "channel.shadowing_std_db=none",
            "cell.device_classes=['phone']",
            "mobility.model=random_waypoint",
            "seed=7",
        ],
    )
    assert cfg.cell.bandwidth_hz == 1e7 and isinstance(cfg.cell.bandwidth_hz, float)
    assert (cfg.model.name, cfg.model.top_k, cfg.model.hidden_size) == ("smollm2-moe8", 4, 576)
    assert cfg.channel.pathloss == "uma" and cfg.channel.shadowing_std_db is None
    assert cfg.cell.device_classes == ("phone",) and cfg.mobility.model == "random_waypoint" and cfg.seed == 7
    assert parse_override("cell.max_se_bps_per_hz=inf") == (["cell", "max_se_bps_per_hz"], math.inf)


def test_resolved_config_round_trips_through_plain_data():
    cfg = load_scenario("lab", ["cell.positions_m=[[1.0, 2.0], [3.0, 4.0]]", "cell.num_devices=2"])
    again = resolve(cfg.to_dict())
    assert again == cfg and isinstance(again, ScenarioConfig)


def test_scenario_from_a_file_with_a_model_table(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text(
        'model = { name = "tiny", hidden_size = 64, ffn_size = 32, num_layers = 2, num_experts = 4,'
        " top_k = 2, num_heads = 4, num_kv_heads = 2, vocab_size = 100 }\n[cell]\nnum_devices = 4\n"
    )
    cfg = load_scenario(str(path))
    assert (cfg.name, cfg.model.name, cfg.model.kv_size, cfg.cell.num_devices) == ("mine", "tiny", 32, 4)


BAD = [  # (override, text the message must contain: the field, the value, the allowed range)
    ("cell.bandwidth_hz=-1", ["cell.bandwidth_hz = -1.0", "allowed: (0, 1e+11]"]),
    ("cell.num_devices=0", ["cell.num_devices = 0", "allowed: [1, 100000]"]),
    ("cell.r_min_m=400", ["cell.r_min_m = 400.0", "allowed: (0, cell.r_max_m = 300]"]),
    ("cell.r_max_m=-5", ["cell.r_max_m = -5.0", "allowed: (0, 100000]"]),
    ("cell.carrier_hz=1e6", ["cell.carrier_hz = 1000000.0", "allowed: [5e+08, 1e+11]"]),
    ("cell.bs_power_dbm=100", ["cell.bs_power_dbm = 100.0", "allowed: [-50, 80]"]),
    ("cell.snr_gap_db=-3", ["cell.snr_gap_db = -3.0", "allowed: [0, 20]"]),
    ("cell.max_se_bps_per_hz=0", ["cell.max_se_bps_per_hz = 0.0", "allowed: (0, inf]"]),
    ("cell.device_noise_figure_db=nan", ["cell.device_noise_figure_db = nan", "allowed: [0, 30]"]),
    ("cell.ut_height_m=40", ["cell.ut_height_m = 40.0", "allowed: [1, 22.5]"]),
    ("cell.bs_flops_per_s=0", ["cell.bs_flops_per_s = 0.0", "allowed: (0, inf]"]),
    ("cell.overhead_s=-1e-3", ["cell.overhead_s = -0.001", "allowed: [0, 10]"]),
    ("cell.device_classes=['toaster']", ["cell.device_classes = 'toaster'", "phone", "jetson-agx-orin"]),
    ("cell.device_classes=[]", ["cell.device_classes = [] is empty"]),
    ("cell.positions_m=[[1.0, 2.0]]", ["cell.positions_m has 1 positions", "cell.num_devices = 8"]),
    (
        "cell.positions_m=[[1.0, 2.0, 3.0]]",
        ["cell.positions_m[0] = [1.0, 2.0, 3.0] has 3 items", "exactly 2"],
    ),
    ("cell.num_devices=2.5", ["cell.num_devices = 2.5 has the wrong type", "allowed: int"]),
    ("cell.bandwidth_hz=wide", ["cell.bandwidth_hz = 'wide' has the wrong type", "allowed: float"]),
    ("cell.bandwith_hz=1e6", ["cell.bandwith_hz is not a field", "bandwidth_hz"]),
    ("channel.pathloss=free-space", ["channel.pathloss = 'free-space'", "macro, uma, umi"]),
    ("channel.fading=nakagami", ["channel.fading = 'nakagami'", "rayleigh, rician"]),
    ("channel.los=maybe", ["channel.los = 'maybe'", "random, los, nlos"]),
    ("channel.shadowing_std_db=-1", ["channel.shadowing_std_db = -1.0", "allowed: [0, 30]"]),
    ("channel.coherence_s=0", ["channel.coherence_s = 0.0", "allowed: (0, 10]"]),
    ("channel.correlation=pink", ["channel.correlation = 'pink'", "jakes, ar1, iid"]),
    (
        "mobility.model=teleport",
        ["mobility.model = 'teleport'", "constant_velocity, random_waypoint, static"],
    ),
    ("mobility.speed_mps=-1", ["mobility.speed_mps = -1.0", "allowed: [0, 100]"]),
    ("wire.bits_per_element=3", ["wire.bits_per_element = 3", "1, 2, 4, 8, 16, 32"]),
    ("wire.header_bits=-8", ["wire.header_bits = -8", "allowed: [0, 1e+09]"]),
    ("model=gpt-5", ["model = 'gpt-5' is not a known preset", "mixtral-8x7b", "smollm2-moe8"]),
    ("model.top_k=9", ["model.top_k = 9", "allowed: [1, 8]"]),
    ("model.hidden_size=0", ["model.hidden_size = 0", "allowed: [1, 1e+09]"]),
    ("model.num_kv_heads=64", ["model.num_kv_heads = 64", "allowed: [1, 32]"]),
    ("seed=-1", ["seed = -1", "allowed: [0, 9.22337e+18]"]),
    ("colour=blue", ["colour is not a scenario field", "cell, channel"]),
    ("cell.bandwidth_hz", ["override 'cell.bandwidth_hz' is malformed", "section.field=value"]),
]


@pytest.mark.parametrize("override, expected", BAD, ids=[b[0] for b in BAD])
def test_every_bad_value_names_field_value_and_range(override, expected):
    with pytest.raises(ConfigError) as info:
        load_scenario("paper", [override])
    for text in expected:
        assert text in str(info.value)
    assert isinstance(info.value, WdmoeError) and isinstance(info.value, ValueError)


def test_a_model_table_must_be_complete():
    with pytest.raises(ConfigError, match=r"model.vocab_size is missing; allowed: a value of type int"):
        resolve(
            {
                "model": {
                    "name": "x",
                    "hidden_size": 8,
                    "ffn_size": 8,
                    "num_layers": 1,
                    "num_experts": 2,
                    "top_k": 1,
                    "num_heads": 2,
                    "num_kv_heads": 1,
                }
            }
        )


def test_unknown_scenario_lists_the_presets():
    with pytest.raises(
        ConfigError, match=r"scenario = 'nowhere' is not a known preset .* allowed: .*lab.*paper"
    ):
        load_scenario("nowhere")
