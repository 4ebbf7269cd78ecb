#!/usr/bin/env bash
# ./run.sh [flags]        train: python spladvise.py [flags], after installing what is missing
# ./run.sh bench [flags]  the sampler comparison of README "Results" (python spladvise.py --bench [flags])
set -euo pipefail
cd "$(dirname "$0")"
python3 -c "import torch, torchvision, numpy" 2>/dev/null || python3 -m pip install -r requirements.txt
fmnist=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$fmnist" ] && [ ! -d data/FashionMNIST ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  # Debian ships the original idx files; without it spladvise.py falls back to a torchvision download.
  apt-get install -y dataset-fashion-mnist >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y dataset-fashion-mnist >/dev/null; } || true
fi
if [ "${1:-}" = bench ]; then
  shift
  exec python3 spladvise.py --bench "$@"
fi
python3 spladvise.py "$@"
if ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "This was the CPU preset (LeNet student, 20,000 training images, 8 epochs). The paper's configuration"
  echo "(ResNet-18 student, all 60,000 images, 40 epochs) needs a GPU: ./run.sh --dataset fashionmnist --gpu 0"
fi
