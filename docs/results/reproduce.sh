#!/usr/bin/env bash
# The offline reproduction committed in docs/results/, on the two offline transfer tasks (small ResNet pre-trained on
# Fashion-MNIST classes 0-4; targets: scikit-learn digits, and Fashion-MNIST classes 5-9 with 100 training images
# per class), every cell trained to convergence (LQF: its solver's stopping rule; fine-tuning: 200-1000 steps with
# early stopping; probe: solved), then the reports. The default regenerates what docs/results/ holds; --full adds
# grids that are not committed. Parts (--only a,b,... runs some of them, in this order):
#   table1       the sweep's whole grid, {nlft, lpft} x BatchNorm {train, eval} x lr {0.05, 0.01, 0.001} x wd {1e-4,
#                1e-5}, best on val, plus the solved methods {lqf, lqf_fc, gaf, probe}; seeds 0-2, with LQF's paired
#                wins-ties-losses per seed
#   lowshot      {lqf, nlft, lpft, probe} x {1, 5, 10, 20, 50} shots x 5 seeds per task
#   lowshot_why  5 and 10 shots x 5 seeds per task: LQF with λ by leave-one-out (the default) and by the validation
#                path, LQF with α in {1, 15, 50} picked on validation, NLFT with lr in {0.05, 0.01, 0.001} picked on
#                validation, the probe; then how far each LQF solve moved from its probe (lqf_exp.influence.movement)
#   ablation     8 cells per task, seeds 0-2, every one-component change paired per seed
#   robustness   {lqf_sgd, nlft} x lr x batch size (Fig. 1 right): lr {0.05, 0.01, 0.001, 1e-4} x batch {16, 64}
#                on fmnist_target (--full: the sweep's 5 x 3 grid on both tasks)
#   spread       the default LQF cell with batch size {16, 64, 256} x seed {0, 1, 2}, precond
#                {kfac, ekfac, none} and solver {adaptive, cg, kernel}, one at a time, each solved to tolerance,
#                beside NLFT's lr x batch grid, on both tasks; on fmnist_target the same factors again with the
#                closed form declined (method.take_closed_form=false), each solve iterating from δ = 0
#   reference    NLFT with BatchNorm frozen at the reference table's low-shot columns, lr {0.01, 0.001} by val
#   linear_only  on one fmnist_target run: exact and K-FAC influence, summarization (0 and 30% dropped), on-line
#                learning, forgetting a class with and without the head refit
#   vit          docs/results/reproduce_vit.sh (its own sweeps and reports)
# Each part prints how long it took. CSV logging keeps it fast; drop logger=csv to track the cells in W&B (offline).
# Re-running skips finished cells (stable cell directories), so an interrupted reproduction resumes. At the end the
# checker compares every regenerated CSV with the copy of docs/results taken before the run, column by column (the
# exit status says whether they agree); parts not run compare with themselves.
#   bash docs/results/reproduce.sh [--full | --quick] [--only part,part] [output dir]
#   --quick: only spread, robustness and linear_only (73 min measured on a fresh clone, 2 idle cores): within 90 min
set -euo pipefail
# Two cells at a time (launcher=joblib), one thread each: on 2 cores this beats one 2-thread cell at a time.
export OMP_NUM_THREADS=1
cd "$(dirname "$0")/../.."
full=false
only=""
while [[ $# -gt 0 && "$1" == --* ]]; do
  case "$1" in
    --full) full=true; shift ;;
    --only) only="$2"; shift 2 ;;
    --quick) only="spread,robustness,linear_only"; shift ;;
    *) echo "unknown option $1 (expected --full, --quick, --only part,part)" >&2; exit 2 ;;
  esac
done
out=${1:-outputs/repro}
parts="table1 lowshot lowshot_why ablation robustness spread reference linear_only vit"
for part in ${only//,/ }; do
  [[ " $parts " == *" $part "* ]] || { echo "unknown part '$part' (expected one of: $parts)" >&2; exit 2; }
done
both="data=digits,fashion_mnist_target"
common="logger=csv launcher=joblib callbacks.progress_bar.refresh_rate=0 trainer.deterministic=true"
per_data='hydra.sweep.subdir=${data.name}/${hydra.job.override_dirname}'
command="bash docs/results/reproduce.sh"
vit_args=()
if $full; then command+=" --full"; vit_args=(--full); fi
report() { python -m lqf_exp.report "$1" --out "$2" --command "$command" "${@:3}" > /dev/null; echo "wrote $2"; }
wanted() { [[ -z "$only" || ",$only," == *",$1,"* ]]; }
start=$(date +%s)
# What docs/results held before this run (the committed results, on a fresh checkout), for the checker at the end.
before=$(mktemp -d)
trap 'rm -rf "$before"' EXIT
cp -r docs/results "$before/results"

part_table1() {
  python run.py -m +sweep=table1 $both seed=0,1,2 $common hydra.sweep.dir=$out/table1
  python run.py -m +sweep=table1_solved $both seed=0,1,2 $common hydra.sweep.dir=$out/table1
  report $out/table1 docs/results/table1 --kind table1
}

part_lowshot() {
  python run.py -m +sweep=lowshot $both $common hydra.sweep.dir=$out/lowshot "$per_data"
  report $out/lowshot docs/results/lowshot
}

part_lowshot_why() {
  local dir=$out/lowshot_why cells="$both data.shots=5,10 seed=0,1,2,3,4"
  python run.py -m $cells experiment=lqf,probe $common hydra.sweep.dir=$dir "$per_data"
  python run.py -m $cells experiment=lqf loss.target_scale=1.0,50.0 $common hydra.sweep.dir=$dir "$per_data"
  # The path spans the λ leave-one-out picks at low shot (10-1000); left out of the cell's name (too long for a path).
  python run.py -m $cells experiment=lqf method.weight_decay_selection.rule=validation \
    'method.weight_decay_selection.path=[1000.0,100.0,10.0,1.0,0.1,0.01,0.001]' $common \
    'hydra.job.config.override_dirname.exclude_keys=[method.weight_decay_selection.path]' \
    hydra.sweep.dir=$dir "$per_data"
  python run.py -m $cells experiment=nlft optim.lr=0.05,0.01,0.001 $common hydra.sweep.dir=$dir "$per_data"
  report $dir docs/results/lowshot_why --kind lowshot
  python -m lqf_exp.influence.movement $dir --out docs/results/lowshot_why --command "$command" > /dev/null
}

part_ablation() {
  python run.py -m +sweep=ablation $both seed=0,1,2 $common hydra.sweep.dir=$out/ablation "$per_data"
  report $out/ablation docs/results/ablation
}

part_robustness() {
  if $full; then
    python run.py -m +sweep=robustness $both $common hydra.sweep.dir=$out/robustness "$per_data"
  else
    python run.py -m +sweep=robustness data=fashion_mnist_target +lr=0.05,0.01,0.001,0.0001 data.batch_size=16,64 \
      $common hydra.sweep.dir=$out/robustness "$per_data"
  fi
  report $out/robustness docs/results/robustness --kind robustness
}

part_spread() {
  local data=fashion_mnist_target,digits
  local dir=$out/spread cells="+sweep=spread data=$data $common hydra.sweep.dir=$out/spread $per_data"
  python run.py -m $cells data.batch_size=16,64,256 seed=0,1,2
  python run.py -m $cells precond=ekfac,none
  python run.py -m $cells solver=cg,kernel  # kernel refuses digits (N·C = 12950 > 6000): a failed cell, listed
  # CG to ‖∇L‖/‖∇L(0)‖ ≤ 1e-6 (the method's 1% gap rule set aside): the optimum the gaps are measured against where
  # the closed form does not fit
  python run.py -m $cells solver=cg method.stop.rel_gap=1e-12 method.stop.grad_norm=1e-6
  # fmnist_target's λ leave-one-out solves the dual system, so the cells above take that closed form (0 passes).
  # The same factors with it declined iterate from δ = 0 to each solver's tolerance: what the solver costs.
  local iterated="+sweep=spread data=fashion_mnist_target method.take_closed_form=false $common"
  iterated+=" hydra.sweep.dir=$out/spread $per_data"
  python run.py -m $iterated data.batch_size=16,64,256 seed=0,1,2
  python run.py -m $iterated precond=ekfac,none
  python run.py -m $iterated solver=cg,kernel
  python run.py -m +sweep=robustness data=$data hydra.sweeper.params.experiment=nlft $common \
    hydra.sweep.dir=$dir "$per_data"
  report $dir docs/results/spread --kind spread
}

part_reference() {
  python run.py -m experiment=nlft method.bn=eval optim.lr=0.01,0.001 data=digits data.shots=5,50 seed=0,1,2 \
    $common hydra.sweep.dir=$out/reference "$per_data"
  python run.py -m experiment=nlft method.bn=eval optim.lr=0.01,0.001 data=fashion_mnist_target \
    data.shots=5,10 seed=0,1,2 $common hydra.sweep.dir=$out/reference "$per_data"
  python docs/results/reference_table.py $out "$command" > docs/results/reference_table.md
}

part_linear_only() {
  local run=$out/linear_only/run dest=docs/results/linear_only
  python run.py data=fashion_mnist_target logger=csv callbacks.progress_bar.refresh_rate=0 \
    trainer.deterministic=true hydra.run.dir=$run
  python -m lqf_exp.influence $run --method both --gallery 8 --out $run/influence > /dev/null
  python -m lqf_exp.influence.summarize $run --fractions 0,0.3 --seeds 0 > /dev/null
  python run.py task=online data=fashion_mnist_target logger=csv callbacks.progress_bar.refresh_rate=0 \
    trainer.deterministic=true hydra.run.dir=$out/linear_only/online
  for refit in "" "--refit-head"; do
    rm -rf "$out/linear_only/forget-class2$refit"
    python -m lqf_exp.forget $run --drop-class 2 $refit --out "$out/linear_only/forget-class2$refit" > /dev/null
  done
  mkdir -p $dest
  cp $run/influence/influence.csv $run/influence/influence.json $run/influence/gallery.png $dest/
  cp $run/summarize/summarize.csv $run/summarize/summarize.md $run/summarize/summarize.png $dest/
  cp $out/linear_only/online/online.csv $out/linear_only/online/online.md $out/linear_only/online/online.png $dest/
  python -m lqf_exp.forget.table $out/linear_only/forget-class2 $out/linear_only/forget-class2--refit-head \
    > $dest/forget.md
}

part_vit() {
  bash docs/results/reproduce_vit.sh ${vit_args[@]+"${vit_args[@]}"} "$out"
}

for part in $parts; do
  if wanted $part; then
    began=$(date +%s)
    "part_$part"
    echo "[reproduce] $part took $(( $(date +%s) - began )) s (total $(( $(date +%s) - start )) s)"
  fi
done
echo "reproduction took $(( $(date +%s) - start )) s"
python -m lqf_exp.report.check docs/results "$before/results"
