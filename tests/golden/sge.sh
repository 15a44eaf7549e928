#!/bin/bash
#$ -N satellite-ALIAS
#$ -o $HOME/.satellite/sessions/ALIAS/job.log
#$ -j y
#$ -S /bin/bash
#$ -r n
#$ -l h_rt=00:45:00
#$ -l s_rt=00:44:00
#$ -notify
#$ -pe smp 4
#$ -l h_vmem=4G
#$ -P proj
#$ -q all.q
#$ -ar 42

# Satellite session ALIAS. The link's secrets stay in $HOME/.satellite/sessions/ALIAS/secrets (mode 0600);
# the agent reads them, starts the app, redeems the link, and releases it when the job ends.
set -e
cd /work
exec /usr/bin/python3 /opt/satellite/satellite_client.py agent $HOME/.satellite/sessions/ALIAS --command 'voila --no-browser --Voila.ip={host} --port={port} --Voila.port_retries=0 --Voila.config_file_paths={config_dir} {workdir}'
