#!/usr/bin/env python3
"""The job's end of an isolated direct link, for make bench: what the agent does by default.

    echo KEY | python3 bench/gate_end.py https://127.0.0.1:PORT CA.pem APP_PORT

Reads the session key from stdin (never argv), makes the job's certificate, opens the agent's gate
(satellite_client.Gate: TLS, satellite's proof, then a byte relay) to 127.0.0.1:APP_PORT, redeems the
link with the certificate's fingerprint and proof=1, and relays until SIGTERM. Prints "connected" once
redeemed.
"""
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import satellite_client as client  # noqa: E402


def main():
    url, cacert, app_port = sys.argv[1:4]
    key = sys.stdin.readline().strip()
    stop = client.StopFlag()
    api = client.SatelliteApi(url, cacert)
    session = client.SessionDir(Path(tempfile.mkdtemp(prefix="satellite-gate-")))
    certificate, fingerprint = client.make_certificate(session)
    gate = client.Gate(api.local_address(), certificate, client.AppAddress(port=int(app_port)))
    reply = client.redeem_directly(api, key, gate.port, fingerprint, stop, check=False, proof=True)
    gate.proof = client.upstream_preamble(reply["upstream_proof"])
    print("connected", flush=True)
    while not stop:
        stop.pause(1.0)
    gate.close()


if __name__ == "__main__":
    main()
