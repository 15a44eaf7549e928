#!/bin/bash
#BSUB -J satellite-ALIAS
#BSUB -o $HOME/.satellite/sessions/ALIAS/job.log
#BSUB -W 150
#BSUB -n 4
#BSUB -wa USR1
#BSUB -wt 1
#BSUB -R "span[ptile=2]"
#BSUB -R "rusage[mem=8192MB]"
#BSUB -M 8192MB
#BSUB -P abc123
#BSUB -q normal
#BSUB -U res1
#BSUB -gpu "num=1"
#BSUB -R "select[avx512]"

# Satellite session ALIAS. The link's secrets stay in $HOME/.satellite/sessions/ALIAS/secrets (mode 0600);
# the agent reads them, starts the app, redeems the link, and releases it when the job ends.
set -e
cd /work
exec /usr/bin/python3 /opt/satellite/satellite_client.py agent $HOME/.satellite/sessions/ALIAS --command 'jupyter notebook --no-browser --ServerApp.sock={socket} --KernelManager.transport=ipc --ServerApp.allow_remote_access=True --ServerApp.trust_xheaders=True --ServerApp.root_dir={workdir} --config={config}'
