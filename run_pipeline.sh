#!/usr/bin/env bash
# run_pipeline.sh — the whole token-rlhf pipeline, one stage after another, each printed as the
# command a student would type:
#
#   sft.py → label.py → discriminator.py (TLCR) → redistribute.py (reward model for RED and the
#   sequence baseline) → ppo_token.py with each reward → eval.py (table + report.html)
#
#   bash run_pipeline.sh                                   # the offline lab: tiny GPT-2, CPU, minutes
#   LAB_DATA=samples bash run_pipeline.sh                  # the lab, discriminator and reward model also on SFT samples
#   TASK=human bash run_pipeline.sh                        # human labels; TLCR labels from REVISER
#   SIZE=gpt2 MODEL=gpt2 bash run_pipeline.sh              # a real model on one GPU
#   SIZE=gpt2 MODEL=gpt2 NPROC=8 bash run_pipeline.sh      # torchrun, 8 GPUs (training stages)
#   NPROC=8 FSDP=1 LORA_RANK=64 MODEL=meta-llama/Llama-2-7b-hf bash run_pipeline.sh   # sharded, LoRA
#   REVISER=openai OPENAI_API_KEY=... bash run_pipeline.sh # GPT-4 revisions for the TLCR labels
#   JUDGE=openai OPENAI_API_KEY=... bash run_pipeline.sh   # GPT-4 as the win-rate judge
#
# Settings (environment variables):
#   TASK      gold | human (default gold). gold, the offline lab (gold.py): a known reward stands in for
#             the human: pairs ranked by it, TLCR labels from its rule reviser, the reward model also
#             trained on the revisions, the gold score logged in PPO and reported by eval.py, and the
#             TLCR ablations of Figure 7 among the PPO runs. human: the data's own labels, and TLCR labels
#             from REVISER (an LLM, or the coarse offline `chosen`)
#   LAB_DATA  TASK=gold: pairs | samples (default pairs). samples: gold_samples.py draws K replies per
#             reward-split prompt from the SFT policy and ranks every two by gold; the discriminator (through
#             the rule reviser's labels) and the reward model train on those beside the split's own pairs
#   LEXICON   TASK=gold: the gold lexicon, a JSON file (format: python gold.py --help), passed as
#             --lexicon to every stage that uses the gold (default data/lexicon-harm.json; also
#             data/lexicon-sentiment.json, or your own)
#   PREFIX_PAIRS  TASK=gold: 1 trains the reward model on gold-ranked prefixes too (redistribute.py
#             --prefix-pairs; not in the R3HF paper; default 0)
#   SIZE      smoke | demo | gpt2   preset of lengths, steps and learning rates (default demo)
#   MODEL     tiny, or any Hugging Face causal LM name or path (default tiny)
#   RUN       output folder (default runs/gold-$SIZE, or runs/$SIZE with TASK=human)
#   NPROC     processes per node for the training stages; >1 launches torchrun (default 1)
#   REVISER   TASK=human: chosen | openai | hf  (label.py --reviser; default chosen: offline, coarse labels)
#   REVISER_MODEL  for REVISER=hf; API_BASE / API_MODEL for REVISER=openai or JUDGE=openai
#   JUDGE     reward-model | openai | none (eval.py --judge; default reward-model)
#   REWARDS   the PPO runs to make (default "seq red tlcr tlcr_no_negative tlcr_no_positive" for the lab,
#             "seq red tlcr" with TASK=human; tlcr_fixed is the other ablation)
#   DATA      preference pairs: bundled (default), a .jsonl(.gz), or hh-rlhf to download
#   DEVICE    auto | cpu | cuda (default auto)
#   SEED      --seed of every stage: initialisation, data order, sampling (default 0; the data split stays put)
#   LORA_RANK LoRA adapters of this rank on every training stage (--lora-rank; default 0: full fine-tuning)
#   FSDP      1: shard the models over the NPROC processes (--fsdp on every training stage; default 0: DDP)
#
# Every stage resumes from its own checkpoint, so running this again after an interruption goes on
# where it stopped (a finished stage only re-saves its result).
set -euo pipefail
case "${LEXICON:-}" in  # a path given from where the script was called
  ""|/*) ;;
  *) LEXICON="$PWD/$LEXICON" ;;
esac
cd "$(dirname "$0")"

SIZE=${SIZE:-demo}
TASK=${TASK:-gold}
LAB_DATA=${LAB_DATA:-pairs}
PREFIX_PAIRS=${PREFIX_PAIRS:-0}
case "$LAB_DATA" in
  pairs|samples) ;;
  *) echo "run_pipeline.sh: LAB_DATA must be pairs or samples, not '$LAB_DATA'" >&2; exit 2 ;;
esac
if [ "$TASK" != gold ] && { [ "$LAB_DATA" != pairs ] || [ "$PREFIX_PAIRS" != 0 ] || [ -n "${LEXICON:-}" ]; }; then
  echo "run_pipeline.sh: LAB_DATA=samples, PREFIX_PAIRS=1 and LEXICON are lab settings (TASK=gold)" >&2; exit 2
fi
LEXICON=${LEXICON:-data/lexicon-harm.json}
case "$TASK" in
  gold)  RUN=${RUN:-runs/gold-$SIZE}; REVISER=gold; REWARDS=${REWARDS:-seq red tlcr tlcr_no_negative tlcr_no_positive} ;;
  human) RUN=${RUN:-runs/$SIZE}; REVISER=${REVISER:-chosen}; REWARDS=${REWARDS:-seq red tlcr} ;;
  *) echo "run_pipeline.sh: TASK must be gold or human, not '$TASK'" >&2; exit 2 ;;
esac
MODEL=${MODEL:-tiny}
NPROC=${NPROC:-1}
JUDGE=${JUDGE:-reward-model}
DATA=${DATA:-bundled}
DEVICE=${DEVICE:-auto}
PYTHON=${PYTHON:-python}
SEED=${SEED:-0}
LORA_RANK=${LORA_RANK:-0}
FSDP=${FSDP:-0}

case "$SIZE" in
  smoke)  # seconds: for the end-to-end test
    SFT="--tiny-layers 1 --tiny-width 32 --tiny-vocab 512 --max-prompt-len 48 --max-response-len 32 --limit 60 --max-steps 6 --lr 3e-3 --batch-size 8 --micro-batch-size 8 --eval-examples 16"
    LABEL="--limit 40 --max-response-len 32"
    SAMPLE="--limit 20 --samples-per-prompt 3 --max-prompt-len 48 --max-new-tokens 12 --batch-size 20"
    DISC="--epochs 1 --lr 1e-3 --max-prompt-len 48 --max-response-len 32 --batch-size 8 --micro-batch-size 8"
    RM="--limit 40 --epochs 1 --lr 1e-3 --max-prompt-len 48 --max-response-len 32 --batch-size 8 --micro-batch-size 8"
    PPO="--iterations 2 --rollout-batch-size 4 --minibatch-size 4 --ppo-epochs 1 --max-prompt-len 48 --max-new-tokens 12 --policy-lr 1e-4 --critic-lr 1e-4"
    EVAL="--num-prompts 8 --max-prompt-len 48 --max-new-tokens 12 --show-prompts 2 --eval-batch-size 8" ;;
  demo)   # minutes on 2 CPU cores
    SFT="--tiny-layers 2 --tiny-width 128 --tiny-vocab 4096 --max-prompt-len 192 --max-response-len 96 --epochs 8 --lr 3e-3 --batch-size 16 --micro-batch-size 16 --eval-every 25 --eval-examples 128 --eval-batch-size 16"
    LABEL="--max-response-len 96"
    SAMPLE="--samples-per-prompt 4 --max-prompt-len 192 --max-new-tokens 48 --batch-size 32"
    DISC="--epochs 2 --lr 1e-3 --max-prompt-len 192 --max-response-len 96 --batch-size 32 --micro-batch-size 32"
    RM="--epochs 2 --lr 3e-4 --max-prompt-len 192 --max-response-len 96 --batch-size 16 --micro-batch-size 16"
    PPO="--iterations 30 --rollout-batch-size 16 --minibatch-size 8 --ppo-epochs 2 --max-prompt-len 192 --max-new-tokens 48 --policy-lr 5e-5 --critic-lr 1e-4"
    EVAL="--num-prompts 64 --max-prompt-len 192 --max-new-tokens 48 --show-prompts 4" ;;
  gpt2)   # one GPU or more: the papers' learning rates scaled for a 124M model
    SFT="--max-prompt-len 512 --max-response-len 256 --epochs 1 --lr 2e-5 --batch-size 64 --micro-batch-size 8"
    LABEL="--max-response-len 256"
    SAMPLE="--samples-per-prompt 4 --max-prompt-len 512 --max-new-tokens 128 --batch-size 16"
    DISC="--epochs 2 --lr 1e-5 --max-prompt-len 512 --max-response-len 256 --batch-size 32 --micro-batch-size 8"
    RM="--epochs 1 --lr 1e-5 --max-prompt-len 512 --max-response-len 256 --batch-size 64 --micro-batch-size 8"
    PPO="--iterations 200 --rollout-batch-size 64 --minibatch-size 16 --micro-batch-size 8 --max-prompt-len 512 --max-new-tokens 128 --policy-lr 1e-6 --critic-lr 5e-6 --gradient-checkpointing"
    EVAL="--num-prompts 256 --max-prompt-len 512 --max-new-tokens 128 --show-prompts 6" ;;
  *) echo "run_pipeline.sh: SIZE must be smoke, demo or gpt2, not '$SIZE'" >&2; exit 2 ;;
esac
LEX=()  # --lexicon for every stage that uses the gold
if [ "$TASK" = gold ]; then  # the lab: gold preferences, gold revisions, gold scores (gold.py)
  LEX=(--lexicon "$LEXICON")
  LABEL+=" --preference gold"
  RM+=" --preference gold --revision-pairs $RUN/labels.jsonl"
  PPO+=" --log-gold"
  EVAL+=" --gold"
  case "$SIZE" in  # the gold labels are sparse (4% of the tokens): the discriminator wants more passes
    smoke) DISC="${DISC/--epochs 1/--epochs 2}" ;;
    demo)  DISC="${DISC/--epochs 2 --lr 1e-3/--epochs 20 --lr 2e-3}"
           RM="${RM/--epochs 2 --lr 3e-4/--epochs 3 --lr 1e-3}"
           EVAL="${EVAL/--num-prompts 64/--num-prompts 115}" ;;  # the whole test split
  esac
  if [ "$LAB_DATA" = samples ]; then  # about 5x the pairs and labels: as many optimizer steps as with
    case "$SIZE" in                   # the data's pairs (93 and ~200), so samples add data, not compute
      demo) DISC="${DISC/--epochs 20/--epochs 4}"; RM="${RM/--epochs 3/--epochs 0.5}" ;;
    esac
  fi
  if [ "$PREFIX_PAIRS" != 0 ]; then  # measured: the prefix term learns with the discriminator's budget
    RM+=" --prefix-pairs"            # (200 steps, lr 2e-3), not with the reward model's 93 steps at 1e-3
    case "$SIZE" in
      demo) RM="${RM/--lr 1e-3/--lr 2e-3} --max-steps 200" ;;
    esac
  fi
fi

if [ "$NPROC" -gt 1 ]; then
  TRAIN=($PYTHON -m torch.distributed.run --nproc_per_node="$NPROC")
else
  TRAIN=($PYTHON)
fi
SCALE=(--seed "$SEED")  # flags of every training stage
[ "$LORA_RANK" != 0 ] && SCALE+=(--lora-rank "$LORA_RANK")
[ "$FSDP" != 0 ] && SCALE+=(--fsdp)
REVISER_ARGS=(--reviser "$REVISER")
[ -n "${REVISER_MODEL:-}" ] && REVISER_ARGS+=(--reviser-model "$REVISER_MODEL")
[ -n "${API_BASE:-}" ] && REVISER_ARGS+=(--api-base "$API_BASE")
[ -n "${API_MODEL:-}" ] && REVISER_ARGS+=(--api-model "$API_MODEL")
JUDGE_ARGS=(--judge "$JUDGE")
if [ "$JUDGE" = openai ]; then
  [ -n "${API_BASE:-}" ] && JUDGE_ARGS+=(--api-base "$API_BASE")
  [ -n "${API_MODEL:-}" ] && JUDGE_ARGS+=(--api-model "$API_MODEL")
fi

step() {  # print the command, then run it
  echo
  echo "+ $*"
  "$@"
}

start=$(date +%s)
# shellcheck disable=SC2086  # the presets are word lists on purpose
step "${TRAIN[@]}" sft.py --model "$MODEL" --data "$DATA" --out "$RUN/sft" --device "$DEVICE" "${SCALE[@]}" $SFT
PAIRS=(--data "$DATA" --split reward)  # what the discriminator's labels and the reward model learn from
if [ "$LAB_DATA" = samples ]; then  # the lab's on-policy data: the reward split's prompts, sampled from SFT
  step $PYTHON gold_samples.py --policy "$RUN/sft" --data "$DATA" --split reward --out "$RUN/samples.jsonl" --device "$DEVICE" --seed "$SEED" "${LEX[@]}" $SAMPLE
  PAIRS=(--data "$RUN/samples.jsonl" --split all)
fi
step $PYTHON label.py "${PAIRS[@]}" --tokenizer "$RUN/sft" --out "$RUN/labels.jsonl" "${REVISER_ARGS[@]}" "${LEX[@]}" $LABEL
step "${TRAIN[@]}" discriminator.py train --sft "$RUN/sft" --labels "$RUN/labels.jsonl" --out "$RUN/discriminator" --device "$DEVICE" "${SCALE[@]}" $DISC
step "${TRAIN[@]}" redistribute.py train --sft "$RUN/sft" "${PAIRS[@]}" --out "$RUN/reward_model" --device "$DEVICE" "${SCALE[@]}" "${LEX[@]}" $RM

POLICIES=(sft="$RUN/sft")
for reward in $REWARDS; do
  step "${TRAIN[@]}" ppo_token.py --policy "$RUN/sft" --reward "$reward" --reward-model "$RUN/reward_model" \
    --discriminator "$RUN/discriminator" --data "$DATA" --out "$RUN/ppo_$reward" --device "$DEVICE" "${SCALE[@]}" "${LEX[@]}" $PPO
  POLICIES+=("$reward=$RUN/ppo_$reward/policy")
done

step $PYTHON eval.py --policies "${POLICIES[@]}" --reference "$RUN/sft" --reward-model "$RUN/reward_model" \
  --discriminator "$RUN/discriminator" --labels "$RUN/labels.jsonl" --data "$DATA" --out "$RUN/eval" \
  --device "$DEVICE" --seed "$SEED" "${JUDGE_ARGS[@]}" "${LEX[@]}" $EVAL

echo
cat "$RUN/eval/results.md"
echo
echo "pipeline finished in $(( $(date +%s) - start )) s; report: $RUN/eval/report.html"
if [ "$TASK" = gold ]; then
  echo "one seed is an example, not a result: its numbers change from machine to machine (RL amplifies"
  echo "floating-point differences). The README's lab figures come from 'python study.py --jobs 2': every"
  echo "method at the same KL targets over 15 upstream seeds, held-out gold with 95% intervals and"
  echo "Holm-adjusted paired tests (runs/study/study.md)."
fi
