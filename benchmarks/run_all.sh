#!/usr/bin/env bash
# The benchmarks behind docs/results.md, in the order they were run. Each command is resumable:
# rerun this script after an interruption and finished parts are reused.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TQDM_DISABLE=${TQDM_DISABLE:-1}

$PY benchmarks/swin.py --size 112
$PY benchmarks/vision.py --model mobilenet_v2 --width 0.25 --epochs 3 --finetune-epochs 0.5 --preset default --threads 1
$PY benchmarks/vision.py --model vgg16_bn --width 16 --epochs 5 --finetune-epochs 0.25 --preset default --threads 1
$PY benchmarks/nlp.py --preset default --epochs 1 --finetune-epochs 0.25 --threads 1
$PY benchmarks/vision.py --model resnet18 --width 16 --epochs 9 --finetune-epochs 0.25 --preset both --threads 1
$PY benchmarks/ranking_stability.py --run runs/bench/fashion-mnist-resnet18-w16 --sizes 128 1024 --threads 1
$PY benchmarks/vision.py --model resnet18 --width 16 --epochs 9 --finetune-epochs 1.0 --preset both --tag=-ft1 --threads 1
$PY benchmarks/nlp.py --preset default --epochs 1 --finetune-epochs 0.25 --target-speedup 1.3 --tag=-x1.3 --threads 1
$PY benchmarks/ranking_stability.py --run runs/bench/rotten-tomatoes-minilm --sizes 128 1024 --threads 1
$PY benchmarks/vision.py --model vgg16_bn --width 16 --epochs 5 --finetune-epochs 0.25 --preset both --threads 1
$PY benchmarks/vision.py --model mobilenet_v2 --width 0.25 --epochs 3 --finetune-epochs 0.5 --preset paper --paper-max-steps 1 --threads 1
$PY benchmarks/vision.py --model resnet18 --width 16 --epochs 9 --finetune-epochs 1.0 --preset paper --paper-max-steps 6 --tag=-ft1 --threads 1
$PY benchmarks/vision.py --model vgg16_bn --width 16 --epochs 15 --base-tag=-e15 --finetune-epochs 0.25 --preset paper --threads 1
$PY benchmarks/vision.py --model vgg16_bn --width 16 --epochs 15 --base-tag=-e15 --finetune-epochs 0.25 --preset default --threads 1
$PY benchmarks/vision.py --model vgg16_bn --width 16 --epochs 15 --base-tag=-e15 --finetune-epochs 0.25 --finetune-lr 0.001 --tag=-lr0.001 --preset default --threads 1
# each preset's per-step fine-tuning alone, on the uncollapsed base models
$PY benchmarks/vision.py --model vgg16_bn --width 16 --epochs 15 --base-tag=-e15 --finetune-epochs 0.25 --preset both --finetune-alone --threads 1
$PY benchmarks/vision.py --model vgg16_bn --width 16 --epochs 15 --base-tag=-e15 --finetune-epochs 0.25 --finetune-lr 0.001 --tag=-lr0.001 --preset default --finetune-alone --threads 1
$PY benchmarks/vision.py --model vgg16_bn --width 16 --epochs 5 --finetune-epochs 0.25 --preset both --finetune-alone --threads 1
$PY benchmarks/vision.py --model mobilenet_v2 --width 0.25 --epochs 3 --finetune-epochs 0.5 --preset both --finetune-alone --threads 1
$PY benchmarks/vision.py --model resnet18 --width 16 --epochs 9 --finetune-epochs 1.0 --tag=-ft1 --preset both --finetune-alone --threads 1
# the paper preset retraining each step as long as the base was trained (15 epochs), as the official code does
$PY benchmarks/vision.py --model vgg16_bn --width 16 --epochs 15 --base-tag=-e15 --finetune-epochs 1.0 --paper-finetune-epochs 15 --tag=-ft1-p15 --preset paper --paper-max-steps 3 --threads 1
$PY benchmarks/vision.py --model vgg16_bn --width 16 --epochs 15 --base-tag=-e15 --finetune-epochs 1.0 --paper-finetune-epochs 15 --tag=-ft1-p15 --preset default --threads 1
# residual branches removed whole (branch_removal, the default) against TLC's channel split alone, one base model
$PY benchmarks/vision.py --model resnet18 --width 16 --epochs 9 --finetune-epochs 1.0 --preset default --tag=-ft1-split --no-branch-removal --threads 1
$PY benchmarks/vision.py --model resnet18 --width 16 --epochs 9 --finetune-epochs 1.0 --preset default --tag=-ft1-branch --threads 1
# the latency merge policy priced by an ONNX Runtime table (batch 1), on the same bases
$PY benchmarks/vision.py --model vgg16_bn --width 16 --epochs 15 --base-tag=-e15 --finetune-epochs 0.25 --preset default --set policy=latency --latency-table onnxruntime --tag=-latency-ort --threads 1
$PY benchmarks/vision.py --model resnet18 --width 16 --epochs 9 --finetune-epochs 1.0 --preset default --set policy=latency --latency-table onnxruntime --tag=-ft1-latency-ort --threads 1
$PY benchmarks/vision.py --model resnet18 --width 16 --epochs 9 --finetune-epochs 1.0 --preset default --distill --set policy=latency --latency-table onnxruntime --tag=-ft1-kd-latency-ort --threads 1
$PY benchmarks/vision.py --model mobilenet_v2 --width 0.25 --epochs 15 --base-tag=-e15 --finetune-epochs 0.5 --preset default --set policy=latency --latency-table onnxruntime --tag=-latency-ort --threads 1
$PY benchmarks/latency_policy.py --threads 1 --models tlc:cifar_resnet18 tlc:cifar_mobilenet_v2 tlc:cifar_vgg16_bn torchvision:resnet50 torchvision:mobilenet_v2 hf:bert-tiny
$PY benchmarks/vision.py --model resnet18 --width 16 --epochs 9 --finetune-epochs 1.0 --method lacoot --preset default --threads 1
$PY benchmarks/vision.py --model resnet18 --width 16 --epochs 9 --finetune-epochs 1.0 --paper-finetune-epochs 5 --method lacoot --preset paper --threads 1
$PY benchmarks/vision.py --model resnet18 --width 16 --epochs 9 --finetune-epochs 1.0 --method lacoot --preset default --set train_first=2 --tag=-tf2 --threads 1
# every method side by side, with Torch-Pruning's width pruning at the MACs of the best depth result: compressed
# at one thread beside other work, then timed again (--resume times only) at two threads on the quiet machine
$PY benchmarks/methods.py --model resnet18 --baseline torch-pruning --threads 1
$PY benchmarks/methods.py --model resnet18 --baseline torch-pruning --threads 2 --resume
for model in vgg16_bn minilm mobilenet_v2 swin; do
  $PY benchmarks/methods.py --model $model --baseline torch-pruning --threads 1
  $PY benchmarks/methods.py --model $model --baseline torch-pruning --threads 2 --resume
done
OMP_NUM_THREADS=1 $PY benchmarks/distributed.py --repeats 2
$PY benchmarks/results.py
