#!/bin/bash
#SBATCH --job-name=satellite-ALIAS
#SBATCH --output=$HOME/.satellite/sessions/ALIAS/job.log
#SBATCH --time=1-02:00:00
#SBATCH --no-requeue
#SBATCH --signal=B:USR1@60
#SBATCH --mem=32G
#SBATCH --account=abc123
#SBATCH --partition=gpu
#SBATCH --qos=normal
#SBATCH --reservation=res1
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --gpus=1
#SBATCH --gres=gpu:a100:1
#SBATCH --constraint=a100

# Satellite session ALIAS. The link's secrets stay in $HOME/.satellite/sessions/ALIAS/secrets (mode 0600);
# the agent reads them, starts the app, redeems the link, and releases it when the job ends.
set -e
module load cuda python/3.11
eval "$(conda shell.bash hook)"
conda activate torch
cd /work
exec /usr/bin/python3 /opt/satellite/satellite_client.py agent $HOME/.satellite/sessions/ALIAS --command '{container} exec --bind /scratch --bind /data --nv /images/lab.sif jupyter lab --no-browser --ServerApp.sock={socket} --KernelManager.transport=ipc --ServerApp.allow_remote_access=True --ServerApp.trust_xheaders=True --ServerApp.root_dir={workdir} --config={config}'
