"""The shipped artefacts: reproducible .pyz files that run on a bare Python >= 3.9."""
import glob
import hashlib
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import DOMAIN, ROOT, SatelliteServer, build_zipapps

# source file -> the modules outside the standard library it may import (the client's .pyz carries satellite.py)
RUNTIME_FILES = {"satellite.py": [], "satellite_client.py": ["satellite"]}
# archive -> its members; every .py but __main__.py is the source file of that name, byte for byte
ARCHIVES = {"satellite.pyz": ["__main__.py", "satellite.py"],
            "satellite-client.pyz": ["__main__.py", "satellite.py", "satellite_client.py"]}


def build(output_dir):
    build_zipapps(output_dir)
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in output_dir.glob("*.pyz")}


def test_build_is_reproducible(tmp_path):
    first, second = build(tmp_path / "a"), build(tmp_path / "b")
    assert set(first) == {"satellite.pyz", "satellite-client.pyz"}
    assert first == second
    head = (tmp_path / "a/satellite.pyz").read_bytes()[:40]
    assert head.startswith(b"#!/usr/bin/env python3\n")


def test_archives_are_built_executable_and_run_as_commands(tmp_path):
    """Users run ./dist/satellite.pyz: the build sets the run bit itself (0755), whatever the umask."""
    subprocess.run(["sh", "-c", f"umask 077 && {sys.executable} {ROOT / 'build_zipapp.py'} --output-dir {tmp_path}"],
                   check=True, capture_output=True)
    for name, expected in (("satellite.pyz", "satellite "), ("satellite-client.pyz", "satellite-client ")):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o755, name
        result = subprocess.run([f"./{name}", "--version"], cwd=tmp_path, capture_output=True, text=True)
        assert result.returncode == 0 and result.stdout.startswith(expected), result.stderr


def test_each_archive_carries_its_sources_as_they_are(tmp_path):
    build(tmp_path)
    for name, members in ARCHIVES.items():
        with zipfile.ZipFile(tmp_path / name) as archive:
            assert archive.namelist() == members
            for member in members[1:]:
                assert archive.read(member) == (ROOT / member).read_bytes(), (name, member)


def test_pyz_runs_without_site_packages(tmp_path):
    build(tmp_path)
    result = subprocess.run([sys.executable, "-I", "-S", str(tmp_path / "satellite.pyz"), "--version"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("satellite ")
    result = subprocess.run([sys.executable, "-I", "-S", str(tmp_path / "satellite.pyz"), "serve", "--help"],
                            capture_output=True, text=True)
    assert "--redeem-from" in result.stdout
    result = subprocess.run([sys.executable, "-I", "-S", str(tmp_path / "satellite-client.pyz"), "launch", "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and "--time-limit" in result.stdout


def test_runtime_is_standard_library_for_python_39():
    vermin = shutil.which("vermin") or str(ROOT / ".venv/bin/vermin")
    result = subprocess.run([vermin, "--target=3.9-", "--violations", "--no-tips",
                             *[str(ROOT / f) for f in RUNTIME_FILES]], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    for name, own_modules in RUNTIME_FILES.items():
        imports = subprocess.run([sys.executable, "-c", f"""
import ast, sys
tree = ast.parse(open({str(ROOT / name)!r}).read())
mods = {{a.name.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}}
mods |= {{n.module.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module and not n.level}}
print(sorted(m for m in mods - {{'__future__'}} if m not in sys.stdlib_module_names))
"""], capture_output=True, text=True)
        assert imports.stdout.strip() == str(own_modules), (name, imports.stdout)


def python39():
    """A Python 3.9 interpreter if this machine has one (pyenv's shim may exist but refuse)."""
    candidates = [shutil.which("python3.9"), *sorted(glob.glob("/root/.pyenv/versions/3.9*/bin/python3.9"))]
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "--version"], capture_output=True).returncode == 0:
            return candidate
    return None


@pytest.mark.skipif(python39() is None, reason="no Python 3.9 on this machine")
def test_satellite_pyz_serves_under_python_39(certs, tmp_path):
    build(tmp_path / "dist")
    server = SatelliteServer(certs, tmp_path)
    server.command = lambda: [python39(), "-I", "-S", str(tmp_path / "dist/satellite.pyz"), "serve",
                              "--domain", DOMAIN, "--listen", "127.0.0.1:0", "--cert", str(certs / "cert.pem"),
                              "--key", str(certs / "key.pem"), "--db", str(tmp_path / "s.db")]
    server.start()
    try:
        status, fields = server.api("getlink")
        assert status == 201 and fields["alias"]
    finally:
        server.stop()


@pytest.mark.skipif(python39() is None, reason="no Python 3.9 on this machine")
def test_client_pyz_runs_under_python_39(tmp_path):
    build(tmp_path / "dist")
    pyz = tmp_path / "dist/satellite-client.pyz"
    result = subprocess.run([python39(), "-I", "-S", str(pyz), "launch", "--dry-run", "--scheduler", "local",
                             "--satellite", "https://manage.sat.test", "--command", "app --port {port}"],
                            capture_output=True, text=True, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f" {pyz} agent " in result.stdout               # the job runs this same archive
