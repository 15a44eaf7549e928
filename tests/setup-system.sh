#!/bin/sh
# Install the system packages the tests drive for real (when run as root on Debian/Ubuntu).
# Already-installed packages are skipped, so `make test` stays quick on a prepared machine.
set -eu
PACKAGES="curl wget openssl ca-certificates procps slurmctld slurmd slurm-client munge nginx haproxy logrotate ruby systemd chromium wrk lmod gridengine-master gridengine-exec gridengine-client"
missing=""
for package in $PACKAGES; do
    dpkg -s "$package" >/dev/null 2>&1 || missing="$missing $package"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "tests need:$missing (install them, or run make test as root on Debian/Ubuntu)" >&2
    exit 1
fi
[ -n "${SATELLITE_APT_UPDATED:-}" ] || apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
