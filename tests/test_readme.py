"""The README's API walkthrough is a script: run it verbatim against a real satellite."""
import json
import re
import shlex
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


def readme_launch_examples():
    text = (ROOT / "README.md").read_text()
    block = re.search(r"Examples for each scheduler.*?```sh\n(.*?)```", text, re.S).group(1)
    return [line for line in block.replace("\\\n", " ").splitlines() if line.startswith("satellite-client launch")]


def test_readme_scheduler_examples_render_what_they_say(tmp_path, job_satellite):
    from conftest import Client
    fakebin = tmp_path / "bin"
    fakebin.mkdir()
    (fakebin / "sbatch").symlink_to("/bin/false")            # a Slurm site, as the first example assumes
    client = Client(tmp_path / "home", job_satellite, {"PATH": f"{fakebin}:/usr/bin:/bin"})
    examples = readme_launch_examples()
    assert len(examples) == 7
    outputs = []
    for line in examples:
        args = shlex.split(line)[2:]
        result = client.run("launch", "--dry-run", *args)
        assert result.returncode == 0, (line, result.stderr)
        outputs.append(result.stdout)
    slurm, pbs, lsf, condor, sge, local, container = outputs
    assert "#SBATCH --gpus=1" in slurm and "#SBATCH --gres=gpu:a100:1" in slurm
    assert "#PBS -l select=2:ncpus=4:mpiprocs=4:mem=512mb:ngpus=2" in pbs
    assert "#BSUB -W 150" in lsf and '#BSUB -R "rusage[mem=8192MB]"' in lsf and "#BSUB -M 8192MB" in lsf
    assert "# job.sub (submit description):" in condor and "request_gpus = 1" in condor
    assert "#$ -pe smp 4" in sge and "#$ -l h_vmem=4G" in sge
    assert [l for l in local.splitlines() if l.startswith("#") and not l.startswith("# ")] == ["#!/bin/bash"]
    assert "{container} exec --bind /scratch --bind /data --nv" in container


def test_the_readme_gives_the_hostile_corpus_size_once_and_right():
    """One figure for the hostile corpus, in the security table, equal to the corpus (it said 89 in one place
    and 234 in another)."""
    corpus = json.loads((ROOT / "tests/corpus/hostile_requests.json").read_text())
    figures = re.findall(r"(\d+) (?:crafted|hostile) requests", (ROOT / "README.md").read_text())
    assert figures == [str(len(corpus))]
