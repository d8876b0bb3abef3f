#!/usr/bin/env bash
# The launcher behind one_node.sbatch and multi_node.sbatch (see them for usage). It builds the launch
# command, runs it, and handles the time limit: SLURM sends USR1 to this shell before the wall time
# (#SBATCH --signal=B:USR1@SECONDS); we write RUN_DIR/STOP, the run checkpoints after the step in progress
# and exits, and the job is requeued; the requeued job finds RUN_DIR/config.yaml and resumes the same run.
#
#   run.sh one_node|multi_node [--dry-run] RUN_DIR [hydra overrides...]
#
# Environment: GPUS_PER_NODE (default: the GPUs SLURM gave this node), ACCELERATE_CONFIG (a file from
# conf/accelerate/: launch with `accelerate launch` and that config; default: torchrun, plain DDP),
# MASTER_PORT (multi-node rendezvous port, default 29500), PYTHON (default: python).
set -euo pipefail

mode=${1:?usage: run.sh one_node|multi_node [--dry-run] RUN_DIR [overrides...]}
shift
dry=0
if [[ ${1:-} == --dry-run ]]; then dry=1; shift; fi
run_dir=${1:?usage: $mode [--dry-run] RUN_DIR [overrides...]  (RUN_DIR: where the run lives; resubmitting resumes it)}
shift
[[ $mode == one_node || $mode == multi_node ]] || { echo "run.sh: mode must be one_node or multi_node, not $mode" >&2; exit 2; }

gpus_here() {  # the GPUs this node was given: SLURM's count, else nvidia-smi's, else 8 for a dry run
  if [[ -n ${SLURM_GPUS_ON_NODE:-} ]]; then echo "${SLURM_GPUS_ON_NODE%%(*}"
  elif command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L | wc -l
  else echo 8; fi
}
gpus=${GPUS_PER_NODE:-$(gpus_here)}
nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-2}}
[[ $mode == one_node ]] && nodes=1
python=${PYTHON:-python}
job=${SLURM_JOB_ID:-local}

train=(-m rredcot train "run_dir=$run_dir")
if [[ -f $run_dir/config.yaml ]]; then train+=(resume=true); fi  # a requeued (or resubmitted) job continues its run
train+=("$@")

if [[ -n ${ACCELERATE_CONFIG:-} ]]; then
  launcher=("$python" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG" --num_processes $((gpus * nodes)))
  [[ $mode == multi_node ]] && launcher+=(--num_machines "$nodes" --rdzv_backend c10d)
else
  launcher=("$python" -m torch.distributed.run --nproc_per_node "$gpus")
  [[ $mode == one_node ]] && launcher+=(--standalone)
fi

if [[ $mode == one_node ]]; then
  cmd=("${launcher[@]}" "${train[@]}")
else
  if [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
    hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")  # all of it: `| head -1` would SIGPIPE scontrol (pipefail)
    head=${hosts%%$'\n'*}
  else head=HEAD_NODE; fi
  port=${MASTER_PORT:-29500}
  if [[ -n ${ACCELERATE_CONFIG:-} ]]; then
    rendezvous=(--main_process_ip "$head" --main_process_port "$port")
    per_task='--machine_rank "$SLURM_NODEID"'  # expanded inside each task: every node its own rank
  else
    rendezvous=(--nnodes "$nodes" --rdzv_id "$job" --rdzv_backend c10d --rdzv_endpoint "$head:$port")
    per_task='--local_addr "$(hostname)"'  # expanded inside each task: the c10d store sees each node's own name
  fi
  inner="$(printf '%q ' "${launcher[@]}" "${rendezvous[@]}") $per_task $(printf '%q ' "${train[@]}")"
  cmd=(srun --nodes "$nodes" --ntasks-per-node 1 --kill-on-bad-exit=1 bash -c "$inner")
fi

if (( dry )); then
  echo "# $mode: $nodes node(s) x $gpus GPU(s), run directory $run_dir${ACCELERATE_CONFIG:+, accelerate config $ACCELERATE_CONFIG}"
  if [[ $mode == one_node ]]; then printf '%q ' "${cmd[@]}"; echo
  else printf '%q ' "${cmd[@]:0:${#cmd[@]}-1}"; printf "'%s'\n" "$inner"; fi  # the per-task part, unexpanded
  echo "# on USR1 (before the wall time): touch $run_dir/STOP; the run checkpoints and exits; scontrol requeue $job"
  exit 0
fi

stop=0
on_usr1() {
  echo "rredcot: the job's time is nearly up: asking the run to checkpoint and stop ($run_dir/STOP)"
  stop=1
  mkdir -p "$run_dir" && touch "$run_dir/STOP"
}
trap on_usr1 USR1
"${cmd[@]}" &
pid=$!
status=0
while true; do  # `wait` returns early when the trap runs: keep waiting until the run has really exited
  wait "$pid" && status=0 || status=$?
  kill -0 "$pid" 2>/dev/null || break
done
if [[ -f $run_dir/eval.json ]] && (( status == 0 )); then
  echo "rredcot: the run in $run_dir has finished"
elif (( stop )); then
  echo "rredcot: checkpointed in $run_dir; requeueing job $job to resume it"
  scontrol requeue "$job"
  exit 0
fi
exit "$status"
