#!/usr/bin/env bash
# LQF on a vision transformer (issue 19): the packaged vit_tiny (pre-trained on Fashion-MNIST classes 0-4 by
# `python run.py experiment=pretrain_vit`, a separate command: README "Rebuilding the source checkpoints"), on the two
# offline target tasks, 3 seeds each:
#   table    {nlft, lpft} x lr {0.05, 0.01, 0.001} (wd 1e-4; a ViT has no BatchNorm, so no BN modes), best on val,
#            plus the solved methods {lqf, probe}; the report adds LQF's paired wins-ties-losses per seed
#   ablation MSE -> CE and K-FAC -> none (and both) on GELU, a ViT's own activation (no Leaky-ReLU row); the full-LQF
#            cell is the table's LQF, so the ablation report reads both directories
# Called by reproduce.sh; alone: bash docs/results/reproduce_vit.sh [output dir]
set -euo pipefail
export OMP_NUM_THREADS=1
cd "$(dirname "$0")/../.."
out=${1:-outputs/repro}/vit
both="data=fashion_mnist_target,digits"
vit="model=vit_tiny seed=0,1,2"
common="logger=csv launcher=joblib callbacks.progress_bar.refresh_rate=0"
per_data='hydra.sweep.subdir=${data.name}/${hydra.job.override_dirname}'
start=$(date +%s)
lap() { echo "[reproduce_vit] $1 done at $(( $(date +%s) - start )) s"; }
python run.py -m +sweep=table1_solved $both $vit experiment=lqf,probe $common hydra.sweep.dir=$out/table1
lap "table (solved)"
python run.py -m +sweep=ablation $both $vit hydra.sweeper.params.activation=native loss=ce precond=kfac,none \
  $common hydra.sweep.dir=$out/ablation "$per_data"
python run.py -m +sweep=ablation $both $vit hydra.sweeper.params.activation=native loss=mse precond=none \
  $common hydra.sweep.dir=$out/ablation "$per_data"
lap "ablation"
python run.py -m +sweep=table1 $both $vit experiment=nlft,lpft method.bn=train optim.lr=0.05,0.01,0.001 \
  optim.weight_decay=1e-4 $common hydra.sweep.dir=$out/table1
lap "table (fine-tuning)"
python -m lqf_exp.report $out/table1 --out docs/results/vit_table1 --kind table1
python -m lqf_exp.report $out --out docs/results/vit_ablation --kind ablation
echo "reproduce_vit took $(( $(date +%s) - start )) s"
