#!/bin/bash

# Satellite session ALIAS. The link's secrets stay in $HOME/.satellite/sessions/ALIAS/secrets (mode 0600);
# the agent reads them, starts the app, redeems the link, and releases it when the job ends.
set -e
cd /work
exec /usr/bin/python3 /opt/satellite/satellite_client.py agent $HOME/.satellite/sessions/ALIAS --command 'code-server --socket {socket} .'

# job.sub (submit description):
# Satellite session ALIAS
executable = $HOME/.satellite/sessions/ALIAS/job.sh
output = $HOME/.satellite/sessions/ALIAS/job.log
error = $HOME/.satellite/sessions/ALIAS/job.log
log = $HOME/.satellite/sessions/ALIAS/condor.log
batch_name = satellite-ALIAS
environment = "HOME=$HOME LANG=C.UTF-8 PATH=/usr/local/bin:/usr/bin:/bin"
periodic_remove = (JobStatus == 2) && (time() - EnteredCurrentStatus > 14400)
request_memory = 16384 MB
accounting_group = group_physics
request_cpus = 4
request_gpus = 1
queue
