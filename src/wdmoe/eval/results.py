"""Evaluation results as JSON Lines: one record per (config, task), appended safely, resumable.

A record is written as one line, flushed and fsync'ed, so a crash loses at most the line being
written; such a truncated last line is dropped (with a warning) when the file is read or appended
to. A record's ``key`` hashes the resolved config and the task, so a rerun skips what is done.
"""

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from wdmoe import __version__
from wdmoe.errors import ConfigError
from wdmoe.eval.harness import TaskResult
from wdmoe.simulate import StepRecord

# Scenario fields added after records were first written, at the values that reproduce those
# records: left out of the key, so that a resumed run still finds what older versions wrote.
KEY_NEUTRAL: dict[tuple[str, str], Any] = {
    ("cell", "placement"): None,
    ("wire", "format"): "none",  # prices bits_per_element, values exact: the adaptive lists are unused
    ("wire", "adaptive_formats"): ["bfloat16", "int8"],
    ("wire", "adaptive_snr_db"): [15.0],
}


def key_view(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """``config`` without the :data:`KEY_NEUTRAL` fields at their neutral values (the record keeps them)."""
    scenario = config.get("scenario")
    resolved = scenario.get("resolved") if isinstance(scenario, Mapping) else None
    if not isinstance(scenario, Mapping) or not isinstance(resolved, Mapping):
        return config
    trimmed = {k: dict(v) if isinstance(v, Mapping) else v for k, v in resolved.items()}
    for (section, name), neutral in KEY_NEUTRAL.items():
        values = trimmed.get(section)
        if isinstance(values, dict) and name in values and jsonable(values[name]) == neutral:
            del values[name]
    return {**config, "scenario": {**scenario, "resolved": trimmed}}


def jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def config_key(config: Mapping[str, Any], task: str) -> str:
    """A stable hash of the resolved ``config`` and ``task`` (key order does not matter; fields of
    :data:`KEY_NEUTRAL` at their neutral values do not count)."""
    blob = json.dumps(
        {"config": key_view(config), "task": task}, sort_keys=True, separators=(",", ":"), default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def per_request(records: Sequence[StepRecord], value: Any) -> list[float]:
    """``value(record)`` summed per request: a prefill and the decode steps that follow it."""
    totals: list[float] = []
    for r in records:
        if r.phase == "prefill" or not totals:
            totals.append(0.0)
        totals[-1] += float(value(r))
    return totals


def request_totals_s(records: Sequence[StepRecord]) -> list[float]:
    """End-to-end simulated seconds per request."""
    return per_request(records, lambda r: r.total_s)


def outage_summary(records: Sequence[StepRecord]) -> dict[str, Any]:
    """What outage and deadlines did: the share of requests that lost an expert to a link in
    outage (skipped up front, or a call lost at its deadline) or to a late call; such (layer,
    device) events per request; the share of (layer, device) times a link was down; per device the
    same, and its calls lost / cut late and tokens skipped per request."""
    lost = np.asarray(per_request(records, lambda r: r.cut_down.sum() + (r.skipped_tokens > 0).sum()))
    late = np.asarray(per_request(records, lambda r: r.cut_late.sum()))
    layers = sum(r.link_down.shape[0] for r in records)
    return {
        "outage_requests": float(np.mean(lost > 0)),
        "late_requests": float(np.mean(late > 0)),
        "lost_calls": float(lost.mean()),
        "late_calls": float(late.mean()),
        "link_down_rate": float(np.mean([r.link_down.mean() for r in records])),
        "per_device_outage": {
            "link_down": (np.sum([r.link_down.sum(0) for r in records], axis=0) / layers).tolist(),
            "cut_down": (np.sum([r.cut_down.sum(0) for r in records], axis=0) / len(lost)).tolist(),
            "cut_late": (np.sum([r.cut_late.sum(0) for r in records], axis=0) / len(lost)).tolist(),
            "skipped": (np.sum([r.skipped_tokens.sum(0) for r in records], axis=0) / len(lost)).tolist(),
        },
    }


def latency_summary(records: Sequence[StepRecord]) -> dict[str, Any]:
    """Percentiles of per-request latency (s), mean TTFT / TPOT (s), expert-drop rate, retained
    mass, what outage and deadlines did (:func:`outage_summary`) and the devices' energy per
    request (:func:`energy_summary`)."""
    if not records:
        return {"requests": 0}
    totals = np.asarray(request_totals_s(records))
    prefill = [r.total_s for r in records if r.phase == "prefill"]
    decode = [r.total_s for r in records if r.phase == "decode"]
    kept = float(sum(r.expert_tokens.sum() for r in records))
    dropped = float(sum(r.dropped_tokens.sum() for r in records))
    return {
        "requests": len(totals),
        "steps": len(records),
        "mean_s": float(totals.mean()),
        **{f"p{q}_s": float(np.percentile(totals, q)) for q in (50, 95, 99)},
        "ttft_s": float(np.mean(prefill)) if prefill else None,
        "tpot_s": float(np.mean(decode)) if decode else None,
        "total_s": float(totals.sum()),
        "per_request_s": [float(f"{x:.4g}") for x in totals],  # for CDFs (wdmoe report)
        "drop_rate": dropped / (kept + dropped) if kept + dropped > 0 else 0.0,
        "retained_mass": float(np.mean([r.retained_mass for r in records])),
        "experts_per_token": kept
        / max(sum(r.new_tokens for r in records), 1)
        / records[0].expert_tokens.shape[0],
        "per_layer": breakdown_per_layer(records, len(totals)),
        "per_device": breakdown_per_device(records, len(totals)),
        **outage_summary(records),
        **energy_summary(records, len(totals)),
    }


def energy_summary(records: Sequence[StepRecord], requests: int) -> dict[str, Any]:
    """The devices' energy (:mod:`wdmoe.latency.energy`), all in J: ``energy_j`` the mean per
    request (all devices, compute + radio), ``compute_j`` / ``radio_j`` its two parts, and per
    device [U] (``per_device_energy``) the mean per request of each part and their sum. {} when a
    record carries no energy (made before it was accounted)."""
    if any(r.compute_j is None or r.radio_j is None for r in records):
        return {}
    compute = np.sum([r.compute_j.sum(0) for r in records if r.compute_j is not None], axis=0) / requests
    radio = np.sum([r.radio_j.sum(0) for r in records if r.radio_j is not None], axis=0) / requests
    return {
        "energy_j": float(compute.sum() + radio.sum()),
        "compute_j": float(compute.sum()),
        "radio_j": float(radio.sum()),
        "per_device_energy": {
            "compute_j": compute.tolist(),
            "radio_j": radio.tolist(),
            "energy_j": (compute + radio).tolist(),
        },
    }


def breakdown_per_layer(records: Sequence[StepRecord], requests: int) -> dict[str, list[float]]:
    """Per MoE layer, seconds per request: waiting T_l (max over busy devices) and BS compute."""
    return {
        "waiting_s": (np.sum([r.waiting_s for r in records], axis=0) / requests).tolist(),
        "bs_s": (np.sum([r.bs_s for r in records], axis=0) / requests).tolist(),
    }


def breakdown_per_device(records: Sequence[StepRecord], requests: int) -> dict[str, list[float]]:
    """Per device [U]: tokens, dropped candidates and seconds of downlink / compute / uplink per
    request (summed over layers), its drop rate, and its mean true SNR at an equal share (dB)."""
    tokens = np.sum([r.device_tokens.sum(0) for r in records], axis=0)
    dropped = np.sum([r.device_dropped.sum(0) for r in records], axis=0)
    total = tokens + dropped
    per = {
        name: (np.sum([getattr(r, name).sum(0) for r in records], axis=0) / requests).tolist()
        for name in ("downlink_s", "compute_s", "uplink_s")
    }
    return {
        "tokens": (tokens / requests).tolist(),
        "dropped": (dropped / requests).tolist(),
        "drop_rate": np.divide(dropped, total, out=np.zeros_like(total), where=total > 0).tolist(),
        **per,
        "snr_db_dl": np.mean([r.snr_db_dl for r in records], axis=0).tolist(),
        "snr_db_ul": np.mean([r.snr_db_ul for r in records], axis=0).tolist(),
    }


def make_record(config: Mapping[str, Any], result: TaskResult, latency: Mapping[str, Any]) -> dict[str, Any]:
    """The line written for one (config, task): key, config, metrics, latency, version, time, and
    (multiple choice) each item's 0/1 outcome as a string, so that two runs compare item by item."""
    outcomes = {"outcomes": {"acc": result.outcomes}} if result.outcomes else {}
    return {
        "key": config_key(config, result.task),
        "task": result.task,
        "config": dict(config),
        "metrics": dict(result.metrics),
        "stderr": dict(result.stderr),
        "n": result.n,
        "kind": result.kind,
        "latency": dict(latency),
        **outcomes,
        "wdmoe_version": __version__,
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _parse_lines(path: Path) -> tuple[list[dict[str, Any]], int]:
    """Records of ``path`` and the byte length of its valid prefix (a bad last line is dropped)."""
    data = path.read_bytes() if path.exists() else b""
    records, valid_end, offset = [], 0, 0
    lines = data.split(b"\n")
    for i, line in enumerate(lines):
        end = offset + len(line) + 1
        if line.strip():
            complete = i < len(lines) - 1  # the last chunk has no newline: a write cut short
            try:
                row = json.loads(line) if complete else None
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict):
                if not any(x.strip() for x in lines[i + 1 :]):
                    warnings.warn(
                        f"{path}: ignoring a truncated last line (an interrupted write)", stacklevel=3
                    )
                    break
                raise ConfigError(f"{path}:{i + 1}: not a valid result record; fix or remove that line")
            records.append(row)
        valid_end = min(end, len(data))
        offset = end
    return records, valid_end


def read_records(path: Path) -> list[dict[str, Any]]:
    """All complete records of ``path`` ([] when it does not exist)."""
    return _parse_lines(Path(path))[0]


def record_key(record: Mapping[str, Any]) -> str:
    """The key this version gives ``record``'s config and task: equal to its stored ``key`` unless
    an older version wrote it (whose key hashed fields that :data:`KEY_NEUTRAL` now leaves out, or
    lacked fields added since at their neutral values)."""
    if isinstance(record.get("config"), Mapping) and isinstance(record.get("task"), str):
        return config_key(record["config"], record["task"])
    return str(record["key"])


def completed_keys(path: Path) -> set[str]:
    """Keys (:func:`record_key`) of the records already in ``path``: what a rerun can skip."""
    return {record_key(r) for r in read_records(path) if "key" in r}


def _line_start(f: BinaryIO, end: int, chunk: int = 1 << 16) -> int:
    """Offset just after the last newline before ``end`` (0 if none), reading backwards."""
    pos = end
    while pos > 0:
        start = max(0, pos - chunk)
        f.seek(start)
        cut = f.read(pos - start).rfind(b"\n")
        if cut >= 0:
            return start + cut + 1
        pos = start
    return 0


def complete_prefix(path: Path) -> int:
    """Byte length of ``path`` without a bad tail: an unterminated last line (a write cut short)
    and a last line that is not a JSON object. Reads backwards from the end only, so appending
    stays O(1) in the file's size."""
    if not path.exists():
        return 0
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        end = _line_start(f, size)  # after the last newline
        if end == 0:
            return 0
        start = _line_start(f, end - 1)
        f.seek(start)
        line = f.read(end - start)
    try:
        valid = isinstance(json.loads(line), dict) if line.strip() else True
    except json.JSONDecodeError:
        valid = False
    return end if valid else start


def append_record(path: Path, record: Mapping[str, Any]) -> None:
    """Append ``record`` as one line, durably (flush + fsync); a truncated tail is cut off first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    valid_end = complete_prefix(path)
    if path.exists() and path.stat().st_size != valid_end:
        warnings.warn(f"{path}: cutting off a truncated last line (an interrupted write)", stacklevel=2)
        os.truncate(path, valid_end)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def select_records(path: Path, keys: Iterable[str]) -> list[dict[str, Any]]:
    """The records of ``path`` whose key is in ``keys``, in file order."""
    wanted = set(keys)
    return [r for r in read_records(path) if r.get("key") in wanted]
