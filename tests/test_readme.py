"""The README's API walkthrough is a script: run it verbatim against a real satellite."""
import re
import subprocess

from conftest import ROOT, SatelliteServer


def readme_api_block():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(SAT=.*?)```", text, re.S)
    assert len(blocks) == 1, "expected one API walkthrough block starting with SAT="
    return blocks[0]


def test_readme_api_walkthrough_runs(tmp_path):
    # as the demo runs it: domain sat.localhost (curl resolves *.localhost), redeem from loopback
    subprocess.run([str(ROOT / "contrib/dev-ca.sh"), str(tmp_path / "certs"), "sat.localhost"], check=True)
    satellite = SatelliteServer(tmp_path / "certs", tmp_path, ["--domain", "sat.localhost",
                                                               "--redeem-from", "127.0.0.0/8"]).start()
    try:
        run_walkthrough(satellite, tmp_path)
    finally:
        satellite.stop()


def run_walkthrough(satellite, tmp_path):
    script = readme_api_block()
    script = re.sub(r"^SAT=\S+", f"SAT=https://127.0.0.1:{satellite.port}", script, flags=re.M)
    script = re.sub(r"^CA=\S+", f"CA={satellite.certs / 'ca.pem'}", script, flags=re.M)
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert re.search(r"^alias=[a-z]+-[a-z]+-[a-z]+$", out, re.M)
    assert '"jobid": "4242"' in out
    assert "state=mapped" in out and "target=127.0.0.1:8888" in out
    lines = out.splitlines()
    assert "404" in lines and "state=ended" in lines and lines[-1] == "410"
