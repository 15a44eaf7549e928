#!/usr/bin/env python3
"""The job's end of a tunnel, for make bench: what the agent does with --connect tunnel.

    echo KEY | python3 bench/tunnel_end.py https://127.0.0.1:PORT CA.pem APP_PORT

Reads the session key from stdin (never argv, where ps would show it), attaches the tunnel
and carries the link to 127.0.0.1:APP_PORT until SIGTERM. Prints "connected" once attached.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import satellite_client as client  # noqa: E402


def main():
    url, cacert, app_port = sys.argv[1:4]
    key = sys.stdin.readline().strip()
    stop = client.StopFlag()
    keeper = client.TunnelKeeper(client.SatelliteApi(url, cacert), key, client.AppAddress(port=int(app_port)), stop)
    keeper.start(stop)
    print("connected", flush=True)
    while not stop:
        stop.pause(1.0)
    keeper.close()


if __name__ == "__main__":
    main()
