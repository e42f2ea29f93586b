#!/usr/bin/env bash
# LQF on a vision transformer (issue 19): the packaged vit_tiny (pre-trained on Fashion-MNIST classes 0-4 by
# `python run.py experiment=pretrain_vit`, a separate command: README "Rebuilding the source checkpoints"), on the two
# offline target tasks:
#   table    {nlft, lpft} x lr {0.05, 0.01, 0.001} (and 3e-4 on fmnist_target, whose pick was the lowest), wd 1e-4
#            (a ViT has no BatchNorm, so no BN modes), best on val,
#            plus the solved methods {lqf, probe}; the report adds LQF's paired wins-ties-losses per seed
#   ablation MSE -> CE and K-FAC -> none (and both) on GELU, a ViT's own activation (no Leaky-ReLU row); the full-LQF
#            cell is the table's LQF, so the ablation report reads both directories
# Seeds: 0-2 on fmnist_target; seed 0 only on digits and in the ablation, to fit the 2-core box (a solved LQF or
# probe cell on full data does not depend on the seed: closed form, or batch order only). --full runs seeds 0-2
# everywhere. Took 46 min on the 2-core box shared with other work (see docs/results/README.md). --sample re-runs only
# the table's seed-0 LQF and probe cells on fmnist_target (reproduce.sh's sample part checks them) and writes no report.
#   bash docs/results/reproduce_vit.sh [--full | --sample] [output dir]
set -euo pipefail
export OMP_NUM_THREADS=1
cd "$(dirname "$0")/../.."
full=false
sample=false
case "${1:-}" in
  --full) full=true; shift ;;
  --sample) sample=true; shift ;;
  --*) echo "unknown option $1 (expected --full or --sample)" >&2; exit 2 ;;
esac
out=${1:-outputs/repro}/vit
if $full; then digits_seeds=0,1,2; ablation_seeds=0,1,2; else digits_seeds=0; ablation_seeds=0; fi
common="model=vit_tiny logger=csv launcher=joblib callbacks.progress_bar.refresh_rate=0"
per_data='hydra.sweep.subdir=${data.name}/${hydra.job.override_dirname}'
finetune="experiment=nlft,lpft method.bn=choice(train) optim.lr=0.05,0.01,0.001 optim.weight_decay=1e-4"
# fmnist_target's fine-tuning picked the grid's lowest lr (0.001) by validation: the grid goes one step lower there.
low_lr="experiment=nlft,lpft method.bn=choice(train) optim.lr=0.0003 optim.weight_decay=1e-4"
# The solved cells of the table on data $1, seeds $2 (the whole run and --sample: the same command, the same cells).
solved_cells() {
  python run.py -m +sweep=table1_solved data=$1 seed=$2 experiment=lqf,probe $common hydra.sweep.dir=$out/table1
}
if $sample; then
  solved_cells fashion_mnist_target 0
  exit 0
fi
start=$(date +%s)
lap() { echo "[reproduce_vit] $1 done at $(( $(date +%s) - start )) s"; }
for data_seeds in "fashion_mnist_target 0,1,2" "digits $digits_seeds"; do
  read -r data seeds <<< "$data_seeds"
  solved_cells $data $seeds
  python run.py -m +sweep=table1 data=$data seed=$seeds $finetune $common hydra.sweep.dir=$out/table1
  if [[ $data == fashion_mnist_target ]]; then
    python run.py -m +sweep=table1 data=$data seed=$seeds $low_lr $common hydra.sweep.dir=$out/table1
  fi
  lap "table on $data"
done
# The CE cells on digits run their λ path through network passes (CE is not quadratic: no Jacobian cache), far
# beyond the box's budget (> 12 min on the first λ): --full only.
ce_data="fashion_mnist_target"
if $full; then ce_data="fashion_mnist_target digits"; fi
for data in fashion_mnist_target digits; do
  python run.py -m +sweep=ablation data=$data seed=$ablation_seeds hydra.sweeper.params.activation=native \
    loss=mse precond=none $common hydra.sweep.dir=$out/ablation "$per_data"
  if [[ " $ce_data " == *" $data "* ]]; then
    python run.py -m +sweep=ablation data=$data seed=$ablation_seeds hydra.sweeper.params.activation=native \
      loss=ce precond=kfac,none $common hydra.sweep.dir=$out/ablation "$per_data"
  fi
  lap "ablation on $data"
done
python -m lqf_exp.report $out/table1 --out docs/results/vit_table1 --kind table1 --command "bash docs/results/reproduce_vit.sh"
python -m lqf_exp.report $out --out docs/results/vit_ablation --kind ablation --command "bash docs/results/reproduce_vit.sh"
echo "reproduce_vit took $(( $(date +%s) - start )) s"
