"""`make demo` as a user runs it: the printed link answers with the app's page via curl."""
import subprocess
import sys

from conftest import ROOT


def test_demo_link_works():
    subprocess.run([sys.executable, str(ROOT / "build_zipapp.py")], check=True, capture_output=True)
    result = subprocess.run([sys.executable, str(ROOT / "contrib/demo.py"), "--check", "--port", "0",
                             "--queue-wait", "1"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo works" in result.stdout
    assert "curl --cacert .demo/certs/ca.pem 'https://" in result.stdout
