#!/usr/bin/env python3
"""make bench: satellite side by side with the proxies people would use instead, same run, same machine.

Small keep-alive requests (wrk) at several concurrencies, TLS on the browser side for every path:

    direct       nginx serving the fixed answer itself over TLS (no proxy: the floor)
    satellite    satellite (workers = 1: one process) -> backend
    satellite_w2 satellite with workers = 2 (a supervisor, two processes on one listening socket) -> backend
    chp         configurable-http-proxy (JupyterHub's proxy, npm) -> backend
    nginx       nginx as a TLS reverse proxy (upstream keep-alive) -> backend

The backend is nginx returning a fixed 3-byte body over plain HTTP on loopback. Rounds are interleaved
(each round runs every path at every concurrency) so drift hits all alike; the table shows medians
and ratios. Results go to stdout and bench/results.md. Loopback only.

    python3 bench/bench.py [--seconds 5] [--rounds 3] [--concurrency 1,16,64,256] [--smoke]

Needs wrk, nginx and npm (configurable-http-proxy is installed into .bench/ on first use).
Numbers, not verdicts: nothing here asserts on time.
"""
import argparse
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import SatelliteServer, wait_for  # noqa: E402

CHP_DIR = ROOT / ".bench"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port, timeout=20):
    def up():
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return True
        except OSError:
            return False
    wait_for(up, timeout=timeout, what=f"port {port}")


def start_nginx(work, certs, backend, direct, front, big_file=None, jupyter=None, jupyter_front=None):
    for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (work / sub).mkdir(exist_ok=True)
    conf = work / "nginx.conf"
    conf.write_text(f"""daemon off; worker_processes 1; pid {work}/nginx.pid; error_log {work}/nginx-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off; client_body_temp_path {work}/body; proxy_temp_path {work}/proxy;
  fastcgi_temp_path {work}/fastcgi; uwsgi_temp_path {work}/uwsgi; scgi_temp_path {work}/scgi;
  keepalive_requests 1000000;
  upstream backend {{ server 127.0.0.1:{backend}; keepalive 64; }}
  server {{ listen 127.0.0.1:{backend}; location / {{ return 200 "ok\\n"; }} location = /big {{ alias {big_file}; }} }}
  server {{ listen 127.0.0.1:{direct} ssl; ssl_certificate {certs}/cert.pem; ssl_certificate_key {certs}/key.pem;
           location / {{ return 200 "ok\\n"; }} location = /big {{ alias {big_file}; }} }}
  server {{ listen 127.0.0.1:{front} ssl; ssl_certificate {certs}/cert.pem; ssl_certificate_key {certs}/key.pem;
           location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection "";
                        proxy_set_header Host $host; }} }}
  map $http_upgrade $connection_upgrade {{ default upgrade; '' ''; }}
  server {{ listen 127.0.0.1:{jupyter_front} ssl; ssl_certificate {certs}/cert.pem; ssl_certificate_key {certs}/key.pem;
           location / {{ proxy_pass http://127.0.0.1:{jupyter}; proxy_http_version 1.1; proxy_set_header Host $host;
                        proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection $connection_upgrade; }} }}
}}
""")
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(work)])
    for port in (backend, direct, front, jupyter_front):
        wait_listening(port)
    return proc


def start_jupyterlab(work, port):
    """JupyterLab for the page-load figure. No token of its own (loopback only, a benchmark): every path then
    loads the same page, and satellite still checks its link's token in front of it."""
    home = work / "jupyter"
    home.mkdir()
    env = dict(os.environ, HOME=str(home), JUPYTER_RUNTIME_DIR=str(home / "rt"), JUPYTER_CONFIG_DIR=str(home / "cfg"),
               JUPYTER_DATA_DIR=str(home / "data"))
    proc = subprocess.Popen([str(Path(sys.executable).parent / "jupyter-lab"), "--no-browser", "--allow-root",
                             "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
                             f"--ServerApp.root_dir={home}", "--ServerApp.allow_remote_access=True",
                             "--IdentityProvider.token=", "--ServerApp.disable_check_xsrf=True"],
                            env=env, stdout=subprocess.DEVNULL, stderr=open(work / "jupyter.log", "w"))
    wait_listening(port, timeout=120)
    return proc


def page_load_figures(urls, rounds):
    """Cold loads of JupyterLab in Chromium (a new profile each time) until its main area is drawn, through each
    path in turn: (median ms, requests the page made) per path. A first warm-up load per path is not counted."""
    from playwright.sync_api import sync_playwright
    chromium_path = shutil.which("chromium") or "/usr/bin/chromium"
    times, requests = {name: [] for name in urls}, {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--host-resolver-rules=MAP *.sat.test 127.0.0.1"])
        try:
            for attempt in range(rounds + 1):
                for name, url in urls.items():
                    context = browser.new_context(ignore_https_errors=True)
                    page = context.new_page()
                    seen = []
                    page.on("request", lambda request: seen.append(request.url))
                    start = time.perf_counter()
                    page.goto(url, wait_until="load", timeout=120_000)
                    page.wait_for_selector("#jp-main-dock-panel", timeout=120_000)
                    elapsed = (time.perf_counter() - start) * 1000
                    context.close()
                    if attempt:
                        times[name].append(elapsed)
                        requests[name] = len(seen)
        finally:
            browser.close()
    return {name: (statistics.median(times[name]), requests[name]) for name in urls}


def start_chp(certs, port, backend):
    binary = CHP_DIR / "node_modules/.bin/configurable-http-proxy"
    if not binary.exists():
        CHP_DIR.mkdir(exist_ok=True)
        subprocess.run(["npm", "install", "--silent", "--prefix", str(CHP_DIR), "configurable-http-proxy@5"],
                       check=True)
    env = dict(os.environ, CONFIGPROXY_AUTH_TOKEN="bench")
    proc = subprocess.Popen([str(binary), "--ip", "127.0.0.1", "--port", str(port), "--api-ip", "127.0.0.1",
                             "--api-port", str(free_port()), "--ssl-key", str(certs / "key.pem"),
                             "--ssl-cert", str(certs / "cert.pem"), "--default-target",
                             f"http://127.0.0.1:{backend}", "--log-level", "error"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(port)
    return proc


def wrk(port, connections, seconds, headers, path="/"):
    threads = 1 if connections == 1 else 2
    args = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds:g}s", "--latency"]
    for header in headers:
        args += ["-H", header]
    result = subprocess.run(args + [f"https://127.0.0.1:{port}{path}"], capture_output=True, text=True,
                            timeout=seconds + 60)
    out = result.stdout
    found = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not found:
        raise RuntimeError(f"wrk against port {port} at {connections} connections gave no result:\n"
                           f"{out}\n{result.stderr}")
    rate = float(found.group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)

    def percentile(p):
        value, unit = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]
    return {"rate": rate, "p50": percentile(50), "p99": percentile(99), "errors": int(errors.group(1)) if errors else 0}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,16,64,256")
    parser.add_argument("--smoke", action="store_true", help="one short round at concurrency 1 (CI)")
    parser.add_argument("--output", default=str(ROOT / "bench/results.md"))
    parser.add_argument("--bulk-mb", type=int, default=1024, help="size of the bulk download (default 1 GB)")
    parser.add_argument("--idle-websockets", type=int, default=2000)
    args = parser.parse_args()
    if args.smoke:
        args.seconds, args.rounds, args.concurrency, args.bulk_mb, args.idle_websockets = 1, 1, "1", 20, 50
    for tool in ("wrk", "nginx", "npm"):
        if not shutil.which(tool):
            sys.exit(f"bench needs {tool} (apt-get install wrk nginx npm)")
    work = Path(tempfile.mkdtemp(prefix="satellite-bench-"))
    subprocess.run([str(ROOT / "contrib/dev-ca.sh"), str(work / "certs"), "sat.test"], check=True)
    certs = work / "certs"
    ports = {name: free_port() for name in ("backend", "direct", "nginx", "chp", "jupyter", "nginx_lab", "chp_lab")}
    big_file = work / "big"
    with open(big_file, "wb") as f:
        f.truncate(args.bulk_mb << 20)                       # sparse: served from the page cache
    work.chmod(0o755)                                        # nginx's workers run unprivileged
    big_file.chmod(0o644)
    procs = [start_jupyterlab(work, ports["jupyter"])]
    procs += [start_nginx(work, certs, ports["backend"], ports["direct"], ports["nginx"], big_file,
                          ports["jupyter"], ports["nginx_lab"]),
              start_chp(certs, ports["chp"], ports["backend"]), start_chp(certs, ports["chp_lab"], ports["jupyter"])]
    satellite = start_satellite(certs, work, 1)
    satellite_w2 = start_satellite(certs, work / "w2", 2)
    try:
        paths = {
            "direct": (ports["direct"], []),
            "satellite": satellite_path(satellite, ports["backend"]),
            "satellite_w2": satellite_path(satellite_w2, ports["backend"]),
            "chp": (ports["chp"], []),
            "nginx": (ports["nginx"], []),
        }
        levels = [int(c) for c in args.concurrency.split(",")]
        runs = {(name, c): [] for name in paths for c in levels}
        for _ in range(args.rounds):
            for c in levels:
                for name, (port, headers) in paths.items():
                    runs[(name, c)].append(wrk(port, c, args.seconds, headers))
        report = render(runs, paths, levels, args)
        report += issue_figures({"workers=1": satellite, "workers=2": satellite_w2}, args)
        report += other_figures(satellite, paths, ports, work, args)
        report += jupyterlab_table(satellite, ports, args)
    finally:
        satellite.stop()
        satellite_w2.stop()
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(10)
    print(report)
    if not args.smoke:
        Path(args.output).write_text(report)
    return 0


def start_satellite(certs, work, workers):
    work.mkdir(exist_ok=True)
    return SatelliteServer(certs, work, ["--workers", str(workers), "--access-log", "off",
                                         "--redeem-from", "127.0.0.0/8", "--max-connections", "8192",
                                         "--getlink-rate", "0", "--max-live-per-source", "0", "--max-live-per-user", "0",
                                         # wrk's connections all come from 127.0.0.1: many clients, one address
                                         "--max-connections-per-address", "0"]).start()


def satellite_path(satellite, backend):
    """(port, wrk headers) of a link of `satellite` redeemed for the backend."""
    link = satellite.getlink()
    status, _ = satellite.api("redeem", key=link["key"], port=backend)
    assert status == 200
    return satellite.port, [f"Host: {link['alias']}.sat.test:{satellite.port}", f"Authorization: token {link['token']}"]


def issue_rate(satellite, seconds, clients=4):
    """getlink + redeem pairs per second from `clients` keep-alive clients at once (each pair: two SQLite
    write transactions). The clients are Python threads on the same machine: a floor, not a ceiling."""
    import threading
    count, stop = [0], time.perf_counter() + seconds

    def client():
        login, node = satellite.connection("127.0.0.1"), satellite.connection("127.0.0.1", source="127.0.0.2")
        while time.perf_counter() < stop:
            login.request("GET", "/api/getlink")
            response = login.getresponse()
            key = re.search(r"^key=(\S+)$", response.read().decode(), re.M).group(1)
            node.request("GET", f"/api/redeem?key={key}&port=8000")
            response = node.getresponse()
            response.read()
            assert response.status == 200, response.status
            count[0] += 1
    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return count[0] / (time.perf_counter() - start)


def issue_figures(servers, args):
    """Issuing links with one and two workers: getlink alone (wrk, 16 connections) and getlink + redeem pairs."""
    lines = ["", "| issuing links | " + " | ".join(servers) + " | ratio |", "|---|" + "---:|" * (len(servers) + 1)]
    getlinks, pairs = {name: [] for name in servers}, {name: [] for name in servers}
    for _ in range(args.rounds):
        for name, server in servers.items():
            getlinks[name].append(wrk(server.port, 16, args.seconds, ["Host: 127.0.0.1"], "/api/getlink")["rate"])
            pairs[name].append(issue_rate(server, args.seconds))
    for label, runs in (("getlink per second (wrk, 16 keep-alive connections)", getlinks),
                        ("getlink + redeem pairs per second (4 Python keep-alive clients)", pairs)):
        rates = [statistics.median(runs[name]) for name in servers]
        lines.append(f"| {label} | " + " | ".join(f"{rate:,.0f}" for rate in rates) + f" | {rates[-1] / rates[0]:.2f} |")
    return "\n".join(lines) + "\n"


def download_mb_per_s(port, headers, size, path="/big"):
    args = ["curl", "-skf", "-o", "/dev/null", "-w", "%{speed_download} %{size_download}"]
    for header in headers:
        args += ["-H", header]
    out = subprocess.run(args + [f"https://127.0.0.1:{port}{path}"], capture_output=True, text=True, timeout=600)
    speed, received = out.stdout.split() if out.returncode == 0 else ("0", "0")
    if int(received) != size:
        raise RuntimeError(f"bulk download from port {port} got {received} of {size} bytes: {out.stderr}")
    return float(speed) / 1e6


def rss_mb(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def websocket_rtt_ms(connect, count=2000):
    ws = connect()
    times = []
    for i in range(count):
        start = time.perf_counter()
        ws.send("x")
        ws.recv()
        times.append(time.perf_counter() - start)
    ws.close()
    return statistics.median(times) * 1000


def other_figures(satellite, paths, ports, work, args):
    """The rest of issue #6's figures: bulk transfer, WebSocket round trips, idle WebSockets, mapping speed."""
    from conftest import App
    lines = ["", "| figure | value |", "|---|---:|"]
    for name, (port, headers) in paths.items():
        rate = download_mb_per_s(port, headers, args.bulk_mb << 20)
        lines.append(f"| bulk download {args.bulk_mb} MB, {name} | {rate:,.0f} MB/s |")
    # WebSocket round trips: the echo app directly over TLS, and through satellite
    tls_app = subprocess.Popen([sys.executable, str(ROOT / "tests/apps/echo_app.py"), "--host", "127.0.0.1",
                                "--certfile", str(work / "certs/cert.pem"), "--keyfile", str(work / "certs/key.pem")],
                               stdout=subprocess.PIPE, text=True)
    tls_port = int(tls_app.stdout.readline().split()[2])
    plain_app = App(work, host="127.0.0.1")
    try:
        return measure_other_figures(satellite, paths, ports, work, args, lines, tls_port, plain_app)
    finally:
        plain_app.stop()
        tls_app.terminate()
        tls_app.wait()


def measure_other_figures(satellite, paths, ports, work, args, lines, tls_port, plain_app):
    import websocket
    link = satellite.getlink()
    satellite.api("redeem", key=link["key"], port=plain_app.port)
    host = f"{link['alias']}.sat.test"
    import ssl as ssl_module
    insecure = {"cert_reqs": ssl_module.CERT_NONE, "check_hostname": False}
    direct_rtt = websocket_rtt_ms(lambda: websocket.create_connection(f"wss://127.0.0.1:{tls_port}/ws", sslopt=insecure))
    via_rtt = websocket_rtt_ms(lambda: websocket.create_connection(
        f"wss://{host}:{satellite.port}/ws", socket=satellite.tls_socket(host),
        header=[f"Authorization: token {link['token']}"]))
    lines.append(f"| WebSocket round trip, direct (TLS) | {direct_rtt:.3f} ms |")
    lines.append(f"| WebSocket round trip through satellite | {via_rtt:.3f} ms (+{via_rtt - direct_rtt:.3f}) |")
    lines += tunnel_figures(satellite, paths, ports, plain_app, work, args, via_rtt)
    lines += isolation_figures(satellite, paths, ports, plain_app, work, args, via_rtt)
    # idle WebSockets: satellite's memory, and whether it still answers at once
    before = rss_mb(satellite.proc.pid)
    idle = [websocket.create_connection(f"wss://{host}:{satellite.port}/ws", socket=satellite.tls_socket(host),
                                        header=[f"Authorization: token {link['token']}"]) for _ in range(args.idle_websockets)]
    during = rss_mb(satellite.proc.pid)
    start = time.perf_counter()
    status = satellite.request("127.0.0.1", "/healthz")[0]
    answer_ms = (time.perf_counter() - start) * 1000
    for ws in idle:
        ws.close()
    lines.append(f"| satellite RSS with {args.idle_websockets:,} idle WebSockets | {during:.0f} MB "
                 f"(+{during - before:.0f} MB over {before:.0f}) |")
    lines.append(f"| a new request meanwhile (new TLS connection) | {answer_ms:.1f} ms, status {status} |")
    # from redeem to the first proxied answer, and getlink calls per second
    timings = []
    for _ in range(20):
        new = satellite.getlink()
        start = time.perf_counter()
        satellite.api("redeem", key=new["key"], port=plain_app.port)
        satellite.request(f"{new['alias']}.sat.test", "/?token=" + new["token"])
        timings.append(time.perf_counter() - start)
    lines.append(f"| redeem → first proxied response | {statistics.median(timings) * 1000:.1f} ms (median of 20) |")
    conn = satellite.connection("127.0.0.1")
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < max(1.0, args.seconds) and count < 100_000:
        conn.request("GET", "/api/getlink")
        response = conn.getresponse()
        response.read()
        assert response.status == 201, response.status
        count += 1
    lines.append(f"| getlink calls per second (one keep-alive client) | {count / (time.perf_counter() - start):,.0f} |")
    return "\n".join(lines) + "\n"


def job_end_link(satellite, app_port, work, script, fails):
    """A link whose job's end is `script` (bench/tunnel_end.py: through a tunnel; bench/gate_end.py: through the
    agent's gate), started with the link's key on stdin; returned once it says it is connected."""
    link = satellite.getlink()
    end = subprocess.Popen([sys.executable, str(ROOT / "bench" / script), f"https://127.0.0.1:{satellite.port}",
                            str(work / "certs/ca.pem"), str(app_port)], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    end.stdin.write(link["key"] + "\n")
    end.stdin.close()
    for line in end.stdout:                       # the agent's own progress lines come first
        if line.strip() == "connected":
            return link, end
    end.wait(10)
    raise RuntimeError(fails)


def tunneled_link(satellite, app_port, work):
    """A link whose app is reached through a tunnel."""
    return job_end_link(satellite, app_port, work, "tunnel_end.py", "the tunnel's end exited before connecting")


def gated_link(satellite, app_port, work):
    """A link whose app is reached through the agent's gate."""
    return job_end_link(satellite, app_port, work, "gate_end.py", "the gate's end exited before redeeming")


def isolation_figures(satellite, paths, ports, echo_app, work, args, open_ws_rtt):
    """Isolated direct (satellite -> TLS + proof -> the agent's gate -> app) vs today's open direct
    (satellite -> the app in plain HTTP), in the same run: small requests, bulk download, WebSocket round trip."""
    return end_figures(gated_link, "isolated / open direct", satellite, paths, ports, echo_app, work, args, open_ws_rtt)


def tunnel_figures(satellite, paths, ports, echo_app, work, args, direct_ws_rtt):
    """Tunnel vs direct, both through satellite: small requests, bulk download, WebSocket round trip."""
    return end_figures(tunneled_link, "tunnel / direct", satellite, paths, ports, echo_app, work, args, direct_ws_rtt)


def end_figures(make_link, names, satellite, paths, ports, echo_app, work, args, direct_ws_rtt):
    """A job's end (`make_link`: the tunnel's, the gate's) vs satellite straight to the app, interleaved in the
    same run: small requests at concurrency 1 and 16, bulk download, WebSocket round trip."""
    import websocket
    rows, ends = [], []
    try:
        link, end = make_link(satellite, ports["backend"], work)
        ends.append(end)
        echo_link, echo_end = make_link(satellite, echo_app.port, work)
        ends.append(echo_end)
        other = (satellite.port, [f"Host: {link['alias']}.sat.test:{satellite.port}",
                                  f"Authorization: token {link['token']}"])
        for c in (1, 16):
            direct, via = [], []
            for _ in range(args.rounds):                  # interleaved, like the main table
                direct.append(wrk(paths["satellite"][0], c, args.seconds, paths["satellite"][1]))
                via.append(wrk(other[0], c, args.seconds, other[1]))
            d_rate, v_rate = (statistics.median(r["rate"] for r in runs) for runs in (direct, via))
            d_p50, v_p50 = (statistics.median(r["p50"] for r in runs) for runs in (direct, via))
            rows.append(f"| small requests at concurrency {c}, {names} | {v_rate:,.0f} / {d_rate:,.0f} "
                        f"req/s = {v_rate / d_rate:.2f}; p50 {v_p50:.2f} / {d_p50:.2f} ms |")
        v_rate = download_mb_per_s(*other, args.bulk_mb << 20)
        d_rate = download_mb_per_s(*paths["satellite"], args.bulk_mb << 20)
        rows.append(f"| bulk download {args.bulk_mb} MB, {names} | {v_rate:,.0f} / {d_rate:,.0f} MB/s "
                    f"= {v_rate / d_rate:.2f} |")
        host = f"{echo_link['alias']}.sat.test"
        rtt = websocket_rtt_ms(lambda: websocket.create_connection(
            f"wss://{host}:{satellite.port}/ws", socket=satellite.tls_socket(host),
            header=[f"Authorization: token {echo_link['token']}"]))
        rows.append(f"| WebSocket round trip through satellite, {names} | {rtt:.3f} / {direct_ws_rtt:.3f} ms "
                    f"(+{rtt - direct_ws_rtt:.3f}) |")
    finally:
        for process in ends:
            process.terminate()
            process.wait(10)
    return rows


def jupyterlab_table(satellite, ports, args):
    link = satellite.getlink()
    satellite.api("redeem", key=link["key"], port=ports["jupyter"])
    urls = {"direct (plain HTTP)": f"http://127.0.0.1:{ports['jupyter']}/lab",
            "satellite": f"https://{link['alias']}.sat.test:{satellite.port}/lab?token={link['token']}",
            "chp": f"https://127.0.0.1:{ports['chp_lab']}/lab",
            "nginx": f"https://127.0.0.1:{ports['nginx_lab']}/lab"}
    rounds = 1 if args.smoke else 5
    loads = page_load_figures(urls, rounds)
    lines = ["", f"JupyterLab page load in Chromium (headless, a cold profile each time, until the main area is drawn; "
                 f"median of {rounds}):", "", "| path | load ms | requests | vs chp | vs nginx |", "|---|---:|---:|---:|---:|"]
    for name, (ms, count) in loads.items():
        lines.append(f"| {name} | {ms:,.0f} | {count} | {ms / loads['chp'][0]:.2f} | {ms / loads['nginx'][0]:.2f} |")
    return "\n".join(lines) + "\n"


def machine_and_command(script, args):
    """Where and how a table was measured: the machine, Python, the date, the command to run it again."""
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return (f"{os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, {time.strftime('%Y-%m-%d')}. "
            f"Command: python3 {script} --seconds {args.seconds:g} --rounds {args.rounds} "
            f"--concurrency {args.concurrency}")


def medians(runs):
    """median(path, concurrency, figure) over the rounds."""
    return lambda name, c, key: statistics.median(r[key] for r in runs[(name, c)])


def render(runs, paths, levels, args):
    median = medians(runs)
    lines = [f"Small keep-alive requests, TLS to each path; wrk, {args.rounds} interleaved rounds of "
             f"{args.seconds:g}s, medians. {machine_and_command('bench/bench.py', args)}", "",
             "| concurrency | path | req/s | p50 ms | p99 ms | errors |", "|---:|---|---:|---:|---:|---:|"]
    for c in levels:
        for name in paths:
            errors = sum(r["errors"] for r in runs[(name, c)])
            lines.append(f"| {c} | {name} | {median(name, c, 'rate'):,.0f} | {median(name, c, 'p50'):.2f} | "
                         f"{median(name, c, 'p99'):.2f} | {errors} |")
    lines += ["", "| concurrency | satellite / chp (req/s) | satellite_w2 / chp (req/s) | satellite_w2 / satellite "
                  "| satellite / nginx (req/s) | p50 added over direct (ms) | p50, p99 ms: satellite / satellite_w2 "
                  "/ chp |", "|---:|---:|---:|---:|---:|---:|---|"]
    for c in levels:
        sat, w2, chp = (median(name, c, "rate") for name in ("satellite", "satellite_w2", "chp"))
        latency = " / ".join(f"{median(name, c, 'p50'):.2f}, {median(name, c, 'p99'):.2f}"
                             for name in ("satellite", "satellite_w2", "chp"))
        lines.append(f"| {c} | {sat / chp:.2f} | {w2 / chp:.2f} | {w2 / sat:.2f} | "
                     f"{sat / median('nginx', c, 'rate'):.2f} | "
                     f"{median('satellite', c, 'p50') - median('direct', c, 'p50'):.2f} | {latency} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
