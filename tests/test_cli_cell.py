"""`wdmoe cell show` and `wdmoe cell allocate` (the sub-app, invoked directly)."""

import json

import pytest
from typer.testing import CliRunner

from wdmoe.cli.cell import cell_app

runner = CliRunner()


def run(*args):
    return runner.invoke(cell_app, [str(a) for a in args])


def show_json(*args):
    res = run("show", *args, "--json")
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_show_json_lists_every_device_and_is_replayable():
    out = show_json("paper", "--seed", 3)
    assert out["scenario"] == "paper" and out["seed"] == 3 and out["share_hz"] == 2.5e6
    assert [d["class"] for d in out["devices"]][:4] == [
        "jetson-agx-orin",
        "jetson-orin-nano",
        "phone",
        "laptop",
    ]
    for d in out["devices"]:
        assert 10.0 <= d["distance_m"] <= 300.0
        assert d["rate_dl_bps"] > 0 and d["rate_ul_bps"] > 0
        assert {"pathloss_db", "shadowing_db", "snr_dl_db", "snr_ul_db", "los"} <= set(d)
    assert out["config"]["cell"]["bandwidth_hz"] == 20e6 and out["config"]["model"]["name"] == "mixtral-8x7b"
    assert show_json("paper", "--seed", 3) == out
    assert show_json("paper", "--seed", 4)["devices"] != out["devices"]


def test_show_counts_how_often_each_link_is_in_outage():
    """The share of the first minute's blocks below the lowest CQI: the weak links' under Rayleigh
    fading, none with outage turned off."""
    far = ["--set", "cell.r_min_m=600", "--set", "cell.r_max_m=900"]
    shares = [d["outage_share"] for d in show_json("paper", "--seed", 0, *far)["devices"]]
    assert all(0.0 <= x <= 1.0 for x in shares) and max(shares) > 0.01
    off = show_json("paper", "--seed", 0, *far, "--set", "cell.min_se_bps_per_hz=0")["devices"]
    assert [d["outage_share"] for d in off] == [0.0] * 8
    assert "outage (60 s)" in run("show", "paper").stdout


def test_show_table_and_overrides():
    res = run("show", "lab", "--seed", 1, "--set", "cell.num_devices=3")
    assert res.exit_code == 0, res.output
    assert "lab · seed 1 · inh · rician" in res.stdout and "jetson" in res.stdout
    assert len(show_json("lab", "--set", "cell.num_devices=3")["devices"]) == 3


def test_show_plot_writes_a_png(tmp_path):
    path = tmp_path / "cell.png"
    res = run("show", "paper", "--seed", 1, "--plot", path)
    assert res.exit_code == 0, res.output
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_allocate_json_compares_every_allocator():
    res = run("allocate", "paper", "--seed", 2, "--tokens", "4,3,2,1,0,0,1,2", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["tokens"] == [4, 3, 2, 1, 0, 0, 1, 2]
    alloc = out["allocators"]
    assert set(alloc) == {"equal", "minmax", "proportional", "energy"}
    for name, a in alloc.items():
        assert sum(a["bandwidth_hz"]) == pytest.approx(20e6), name
        assert a["layer_s"] == pytest.approx(max(a["device_s"]))
    assert alloc["minmax"]["bandwidth_hz"][4] == 0.0 and alloc["minmax"]["device_s"][4] == 0.0
    assert alloc["minmax"]["layer_s"] <= min(alloc["equal"]["layer_s"], alloc["proportional"]["layer_s"])
    # least energy within 10 % (its default slack) of min-max's wait
    fastest = alloc["minmax"]["layer_s"]
    assert fastest <= alloc["energy"]["layer_s"] <= 1.1 * fastest * (1 + 1e-9)


def test_allocate_table_and_broadcast_tokens():
    res = run("allocate", "lab", "--tokens", "2")
    assert res.exit_code == 0, res.output
    assert "minmax MHz / ms" in res.stdout and "layer" in res.stdout
    repeated = run("allocate", "paper", "--json", *[a for n in range(8) for a in ("--tokens", n % 3)])
    assert json.loads(repeated.stdout)["tokens"] == [0, 1, 2, 0, 1, 2, 0, 1]


@pytest.mark.parametrize(
    "args, message",
    [
        (("show", "atlantis"), "scenario = 'atlantis' is not a known preset"),
        (("show", "paper", "--set", "cell.bandwidth_hz=-1"), "cell.bandwidth_hz = -1.0 is out of range"),
        (("allocate", "paper", "--tokens", "1,2"), "--tokens = [1, 2] is out of range; allowed: 1 or 8"),
        (("allocate", "paper", "--tokens", "x"), "is not a list of integers"),
        (("allocate", "paper", "--tokens", "-1"), "integers ≥ 0"),
    ],
)
def test_bad_input_exits_2_with_a_clear_error(args, message):
    res = run(*args)
    assert res.exit_code == 2
    assert message in res.stderr
