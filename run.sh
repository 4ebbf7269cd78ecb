#!/usr/bin/env bash
# ./run.sh [flags]        train: python spladvise.py [flags], after installing what is missing
# ./run.sh test           the test suite (what CI runs), after installing what is missing
# ./run.sh bench [flags]  the benchmark of README "Where it helps" (python spladvise.py --bench [flags])
set -euo pipefail
cd "$(dirname "$0")"
python3 -c "import torch, torchvision, numpy, pytest" 2>/dev/null || python3 -m pip install -r requirements.txt
fmnist=/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
if [ ! -f "$fmnist" ] && [ ! -d data/FashionMNIST ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  # Debian ships the original idx files; without them training falls back to a download and the tests skip real data.
  apt-get install -y dataset-fashion-mnist >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y dataset-fashion-mnist >/dev/null; } || true
fi
case "${1:-}" in
  test)
    python3 -c "import matplotlib" 2>/dev/null || python3 -m pip install matplotlib  # the optional extra --plot tests
    exec python3 -m pytest -q test_spladvise.py ;;
  bench)
    shift
    exec python3 spladvise.py --bench "$@" ;;
esac
python3 spladvise.py "$@"
if ! python3 -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "This was the CPU preset (LeNet student, 20,000 training images, 8 epochs). The paper's configuration"
  echo "(ResNet-18 student, all 60,000 images, 40 epochs) needs a GPU: ./run.sh --dataset fashionmnist --gpu 0"
fi
