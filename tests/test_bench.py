"""The benchmark keeps working: a short smoke run in CI (numbers are printed, never asserted)."""
import re
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.skipif(not all(shutil.which(t) for t in ("wrk", "nginx", "npm")), reason="needs wrk, nginx and npm")
def test_bench_smoke_measures_every_path():
    result = subprocess.run([sys.executable, str(ROOT / "bench/bench.py"), "--smoke"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = re.findall(r"^\| 1 \| (\w+) \| ([\d,]+) \| [\d.]+ \| [\d.]+ \| (\d+) \|$", result.stdout, re.M)
    assert [name for name, _, _ in rows] == ["direct", "satellite", "satellite_w2", "chp", "nginx"]
    assert all(int(rate.replace(",", "")) > 0 and errors == "0" for _, rate, errors in rows)
    assert "satellite / chp" in result.stdout and "satellite_w2 / chp" in result.stdout
    bulk = re.findall(r"^\| bulk download 20 MB, (\w+) \| ([\d,]+) MB/s \|$", result.stdout, re.M)
    assert [name for name, _ in bulk] == ["direct", "satellite", "satellite_w2", "chp", "nginx"]
    for figure in ("WebSocket round trip through satellite", "idle WebSockets", "redeem → first proxied response",
                   "getlink calls per second", "tunnel / direct", "isolated / open direct",
                   "getlink + redeem pairs per second"):
        assert figure in result.stdout
    loads = re.findall(r"^\| ([\w ()]+) \| ([\d,]+) \| (\d+) \| [\d.]+ \| [\d.]+ \|$", result.stdout, re.M)
    assert [name for name, _, _ in loads] == ["direct (plain HTTP)", "satellite", "chp", "nginx"]
    counts = [int(count) for _, _, count in loads]     # every path loaded the whole JupyterLab (its polls may differ)
    assert min(counts) > 20 and max(counts) - min(counts) <= 5, counts


def test_front_bench_smoke_measures_both_fronts_and_satellite_alone():
    result = subprocess.run([sys.executable, str(ROOT / "bench/front.py"), "--smoke"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = re.findall(r"^\| 16 \| (\w+) \| ([\d,]+) \| [\d.]+ \| [\d.]+ \| (\d+) \| [\d.]+ \|$", result.stdout, re.M)
    assert [name for name, _, _ in rows] == ["satellite", "nginx", "haproxy"]
    assert all(int(rate.replace(",", "")) > 0 and errors == "0" for _, rate, errors in rows)
    for kind in ("nginx", "haproxy"):
        assert f"redeem → first answer by the {kind} front" in result.stdout


def test_workers_bench_smoke_measures_the_spread_and_the_shared_counting():
    result = subprocess.run([sys.executable, str(ROOT / "bench/workers.py"), "--smoke"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    spread = re.findall(r"^\| 2 \| ([^|]+) \| ([^|]+) \| ([^|]+) \|$", result.stdout, re.M)
    assert len(spread) == 1, result.stdout
    counted = [sum(int(n) for n in re.findall(r"\d+", cell.split("(")[0])) for cell in spread[0]]
    assert counted == [100, 20, 100], spread         # every connection and request counted (how the kernel
    #                                                  spreads them is measured, not asserted)
    costs = re.findall(r"^\| (new TLS connections|wrong tokens|admit \+ release|check \+ record)[^|]* \| "
                       r"([\d,.]+) \| ([\d,.]+) \| [\d.]+ \|$", result.stdout, re.M)
    assert [name for name, _, _ in costs] == ["new TLS connections", "wrong tokens", "admit + release",
                                              "check + record"]
    assert all(float(a.replace(",", "")) > 0 and float(b.replace(",", "")) > 0 for _, a, b in costs)
