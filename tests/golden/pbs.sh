#!/bin/bash
#PBS -N sat-ALIAS
#PBS -o $HOME/.satellite/sessions/ALIAS/job.log
#PBS -j oe
#PBS -r n
#PBS -l walltime=01:30:00
#PBS -l select=2:ncpus=4:mpiprocs=4:mem=512mb:ngpus=2
#PBS -A abc123
#PBS -q workq

# Satellite session ALIAS. The link's secrets stay in $HOME/.satellite/sessions/ALIAS/secrets (mode 0600);
# the agent reads them, starts the app, redeems the link, and releases it when the job ends.
set -e
cd /work
exec /usr/bin/python3 /opt/satellite/satellite_client.py agent $HOME/.satellite/sessions/ALIAS --command 'tensorboard --logdir {workdir} --host {host} --port {port}'
