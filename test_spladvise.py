"""Tests for spladvise.py, in the file's section order. Math is checked against slow, plainly correct
references (loops, float64, tiny sizes); the training system through the CLI on real Fashion-MNIST subsets, on
the CPU.

Run: python -m pytest -q test_spladvise.py
"""
import ast
import collections
import copy
import dataclasses
import datetime
import gzip
import inspect
import io
import itertools
import json
import math
import os
import pickle
import queue
import random
import signal
import socket
import subprocess
import sys
import re
import shlex
import time

import numpy as np
import pytest
import torch

import spladvise as S

HERE = os.path.dirname(os.path.abspath(__file__))
FMNIST = os.environ.get("SPLADVISE_TEST_DATA", "/usr/share/datasets/fashion-mnist")  # real idx .gz files
needs_fmnist = pytest.mark.skipif(not os.path.exists(f"{FMNIST}/train-images-idx3-ubyte.gz"),
                                  reason="real Fashion-MNIST missing: apt-get install dataset-fashion-mnist")
# A run small enough for seconds on 2 CPU cores: 600 training and 300 test images,
# LeNet student and embedding.
TINY = ["--dataset", "fashionmnist", "--gpu", "-1", "--data-dir", FMNIST, "--no-download",
        "--train-size", "600", "--test-size", "300", "--batch-size", "64", "--embed-dim", "8", "--k", "3",
        "--m", "4", "--d", "4", "--score-batch", "600", "--lr", "0.05", "--embed-warmup", "1"]


def cli(args, out, env=None, timeout=300):
    """Run spladvise.py in a subprocess -> CompletedProcess (text)."""
    return subprocess.run([sys.executable, os.path.join(HERE, "spladvise.py"), *args, "--out", str(out)],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def start(args, out, env=None, slow_checkpoint=0.0):
    """spladvise.py in a subprocess, not waited for; slow_checkpoint: seconds each checkpoint's rename waits
    (the test patches os.replace in that process), so that a kill can land inside a checkpoint write."""
    patch = (f"import os, sys, time; sys.path.insert(0, {HERE!r}); rename = os.replace; "
             f"os.replace = lambda a, b: (time.sleep({slow_checkpoint}), rename(a, b)); import spladvise; "
             f"sys.argv[0] = 'spladvise.py'; sys.exit(spladvise.main(sys.argv[1:]))")
    command = ["-c", patch] if slow_checkpoint else [os.path.join(HERE, "spladvise.py")]
    return subprocess.Popen([sys.executable, *command, *args, "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})


def read_metrics(out):
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def pid_alive(pid):
    """True if pid runs and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for_line(proc, needle, timeout):
    """Read proc's stdout until a line contains needle; -> that line."""
    deadline = time.time() + timeout
    for line in proc.stdout:
        if needle in line:
            return line
        assert time.time() < deadline, f"no '{needle}' within {timeout}s"
    raise AssertionError(f"process ended before printing '{needle}': {proc.stderr.read()}")


# ---- 3. data ---------------------------------------------------------------------------------------------
def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with (gzip.open if path.endswith(".gz") else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_tiny_idx_set(folder, gz=True, n=20):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    parts = {"train-images-idx3-ubyte": rng.integers(0, 256, (n, 28, 28)),
             "train-labels-idx1-ubyte": np.arange(n) % 10,
             "t10k-images-idx3-ubyte": rng.integers(0, 256, (10, 28, 28)),
             "t10k-labels-idx1-ubyte": np.arange(10)}
    for stem, array in parts.items():
        write_idx(os.path.join(folder, stem + (".gz" if gz else "")), array)
    return parts


@pytest.mark.parametrize("layout,gz", [("", True), ("FashionMNIST/raw", False), ("FashionMNIST/raw", True)])
def test_load_dataset_reads_idx_files_in_raw_and_torchvision_layouts(tmp_path, layout, gz):
    """Data: --data-dir may hold the raw idx (.gz) files or torchvision's FashionMNIST/raw layout."""
    parts = write_tiny_idx_set(os.path.join(tmp_path, layout), gz)
    data = S.load_dataset("fashionmnist", str(tmp_path), download=False)
    assert data["x_train"].shape == (20, 1, 28, 28) and data["x_train"].dtype == torch.uint8
    assert np.array_equal(data["x_train"][:, 0].numpy(), parts["train-images-idx3-ubyte"])
    assert np.array_equal(data["y_test"].numpy(), parts["t10k-labels-idx1-ubyte"])


def test_load_dataset_reads_cifar_pickles(tmp_path):
    """Data: torchvision's cifar-10-batches-py layout, rows of 3072 bytes in CHW order."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rows = np.arange(2 * 3072).reshape(2, 3072) % 256
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": rows, b"labels": [3, 7]}, f)
    data = S.load_dataset("cifar10", str(tmp_path), download=False)
    assert data["x_train"].shape == (10, 3, 32, 32)
    assert data["x_train"][0, 1, 0, 0] == 1024 % 256 and data["y_train"].tolist() == [3, 7] * 5


def test_truncated_idx_file_is_named_in_the_error(tmp_path):
    """Bad input: a truncated data file raises ConfigError naming that file."""
    write_tiny_idx_set(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(S.ConfigError, match="train-images-idx3-ubyte.gz"):
        S.load_dataset("fashionmnist", str(tmp_path), download=False)


def test_missing_data_exits_2_naming_the_paths_tried(tmp_path):
    """Data: no local copy and no download -> exit 2, the folders tried and how to get the data, no
    traceback."""
    r = cli(["--dataset", "mnist", "--gpu", "-1", "--data-dir", str(tmp_path), "--no-download",
             "--updates", "5"],
            tmp_path / "out")
    assert r.returncode == 2, r.stderr
    assert str(tmp_path) in r.stderr and "--data-dir" in r.stderr and "Traceback" not in r.stderr


def test_balanced_subset_takes_equal_class_shares():
    labels = torch.arange(100) % 10
    idx, balanced = S.balanced_subset(labels, 25, torch.Generator().manual_seed(0))
    counts = torch.bincount(labels[idx], minlength=10)
    assert balanced and len(idx.unique()) == 25 and counts.max() - counts.min() <= 1


def test_balanced_subset_of_an_unequal_split_is_stratified_and_the_whole_split_at_full_size():
    """MNIST's test set has 980 zeros but 1,135 ones: a 'balanced' 10,000 cannot exist. The whole split is
    taken at full size; a smaller size that cannot be balanced gets shares ∝ class sizes (largest
    remainder)."""
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    idx, balanced = S.balanced_subset(labels, 100, torch.Generator().manual_seed(0))
    assert not balanced and torch.equal(idx, torch.arange(100))
    idx, balanced = S.balanced_subset(labels, 45, torch.Generator().manual_seed(0))
    assert not balanced and len(idx.unique()) == 45 and torch.bincount(labels[idx]).tolist() == [27, 14, 4]
    idx, balanced = S.balanced_subset(labels, 30, torch.Generator().manual_seed(0))
    assert balanced and torch.bincount(labels[idx]).tolist() == [10, 10, 10]


@pytest.mark.parametrize("dataset,flips", [("mnist", False), ("svhn", False), ("fashionmnist", True),
                                           ("cifar10", True)])
def test_cpu_preset_never_flips_digits(dataset, flips):
    cfg = S.resolve_config(S.parse_args(["--dataset", dataset, "--gpu", "-1", "--preset", "cpu"]))
    assert S.parse_augment(cfg.augment)["hflip"] == flips and not S.parse_augment(cfg.augment)["vflip"]


def test_amp_auto_is_resolved_per_process_bf16_for_the_embedding_only_on_a_cpu_with_native_bf16(monkeypatch):
    """--amp auto is decided by each process from its own device: on a CPU, bf16 for the embedding network
    only and only where the CPU has it natively (emulated bf16 is slower than float32); on, off and embed as
    named."""
    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
        assert (S.bf16_enabled("auto", cpu, "embedding") == native
                and not S.bf16_enabled("auto", cpu, "student"))
    assert S.resolve_config(S.parse_args(["--gpu", "-1"])).amp == "auto"  # resolved where it is used
    assert [S.bf16_enabled(a, cpu, n) for a in ("on", "off", "embed") for n in ("student", "embedding")] == [
        True, True, False, False, False, True]

def test_augment_shift_moves_pixels_by_whole_pixels_and_flips_mirror():
    """Augmentation: translation is an exact pad-and-crop (black border), a flip an exact mirror."""
    torch.manual_seed(0)
    x = torch.zeros(64, 1, 8, 8)
    x[:, 0, 3, 4] = 1.0
    shifted = S.augment(x, hflip=False, vflip=False, shift=2, rotate=0.0)
    assert torch.all(shifted.sum((1, 2, 3)) == 1)  # one pixel, moved whole
    rows, cols = shifted[:, 0].nonzero()[:, 1], shifted[:, 0].nonzero()[:, 2]
    assert set((rows - 3).tolist()) <= {-2, -1, 0, 1, 2} and len(set((cols - 4).tolist())) > 1
    flipped = S.augment(x, hflip=True, vflip=False, shift=0, rotate=0.0)
    assert set(flipped[:, 0, 3].argmax(1).tolist()) == {4, 3}  # column 4 or its mirror 8-1-4


def test_symmetric_noise_flips_rate_of_labels_uniformly_to_other_classes():
    """Co-teaching's symmetric noise: a share RATE of labels changes (within 4 binomial standard errors),
    never to itself, and the changed ones spread uniformly over the other C − 1 classes (chi-square, 8 d.o.f.,
    p < 0.001)."""
    labels = torch.arange(60000) % 10
    noisy = S.noisy_labels(labels, 0.4, "symmetric", 10, torch.Generator().manual_seed(0))
    changed = noisy != labels
    assert abs(changed.double().mean().item() - 0.4) < 4 * math.sqrt(0.4 * 0.6 / 60000)
    offsets = ((noisy - labels) % 10)[changed]  # 1..9: which other class
    assert offsets.min() >= 1
    counts = torch.bincount(offsets, minlength=10)[1:].double()
    expected = changed.sum().item() / 9
    assert ((counts - expected) ** 2 / expected).sum() < 27.88  # chi-square(8) at p = 0.001


def test_pairflip_noise_moves_each_changed_label_to_the_next_class():
    labels = torch.arange(5000) % 10
    noisy = S.noisy_labels(labels, 0.45, "pairflip", 10, torch.Generator().manual_seed(1))
    changed = noisy != labels
    assert torch.equal(noisy[changed], (labels[changed] + 1) % 10)
    assert abs(changed.double().mean().item() - 0.45) < 4 * math.sqrt(0.45 * 0.55 / 5000)


@needs_fmnist
def test_label_noise_is_the_same_for_every_seed_and_sampler_and_spares_the_test_labels():
    base = TINY + ["--updates", "5", "--label-noise", "0.4"]
    a, b = (S.prepare_data(S.resolve_config(S.parse_args(base + extra)), torch.device("cpu"))
            for extra in (["--seed", "0"], ["--seed", "3", "--sampler", "random"]))
    clean = S.prepare_data(S.resolve_config(S.parse_args(TINY + ["--updates", "5"])), torch.device("cpu"))
    assert torch.equal(a["y_train"], b["y_train"]) and torch.equal(a["x_train"], clean["x_train"])
    assert torch.equal(a["y_clean"], clean["y_train"]) and torch.equal(a["y_test"], clean["y_test"])
    assert 0.3 < (a["y_train"] != a["y_clean"]).double().mean() < 0.5


@needs_fmnist
def test_label_precision_of_the_first_pass_is_the_share_of_correct_labels(tmp_path):
    args = TINY + ["--updates", "20", "--label-noise", "0.4", "--sampler", "spl", "--f-max", "0.5",
                   "--f0", "0.4"]
    r = cli(args, tmp_path / "run")
    assert r.returncode == 0, r.stderr
    data = S.prepare_data(S.resolve_config(S.parse_args(args)), torch.device("cpu"))
    metrics = read_metrics(tmp_path / "run")
    assert metrics[0]["label_precision"] == pytest.approx(
        (data["y_train"] == data["y_clean"]).double().mean().item())
    # --f-max 0.5: SPL keeps at most the 0.5-quantile
    assert all(m["selected_frac"] <= 0.5 for m in metrics[1:])


# ---- 4. networks -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,size,channels", [("lenet", 28, 1), ("vgg16", 28, 1), ("resnet18", 32, 3),
                                                ("wrn-10-2", 32, 3)])
def test_every_net_maps_a_batch_to_n_outputs_and_trains(name, size, channels):
    """Networks of paper §4 accept 28x28 and 32x32 images and give finite gradients."""
    net = S.make_net(name, channels, 7, size, dropout=0.3)
    out = net(torch.randn(2, channels, size, size))
    out.sum().backward()
    assert out.shape == (2, 7) and all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_lenet_pools_before_its_relus_with_the_textbook_function_and_gradient():
    """LeNet's max-pool before ReLU equals conv-ReLU-pool (ReLU is monotone), outputs and gradients,
    float64."""
    net = S.make_net("lenet-4", 1, 5, 28).double()
    conv1, conv2 = net.features[0], net.features[3]
    x = torch.randn(6, 1, 28, 28, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    textbook = net.head(torch.max_pool2d(torch.relu(conv2(torch.max_pool2d(torch.relu(conv1(x)), 2))), 2))
    ours = net(x)
    grads = [torch.autograd.grad(out.square().sum(), list(net.parameters())) for out in (textbook, ours)]
    assert [type(m).__name__ for m in net.features] == ["Conv2d", "MaxPool2d", "ReLU"] * 2
    assert torch.allclose(ours, textbook, rtol=0, atol=1e-12)
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(*grads))


# ---- 5. K-Means++ and the cluster index ------------------------------------------------------------------
def blobs(centres, n_per, spread, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.as_tensor(centres, dtype=torch.float64)
    x = centres.repeat_interleave(n_per, 0) + spread * torch.randn(len(centres) * n_per, centres.shape[1],
                                                                     generator=g, dtype=torch.float64)
    return x, torch.arange(len(centres)).repeat_interleave(n_per)


def inertia(x, centroids, assign):
    return ((x - centroids[assign]) ** 2).sum().item()


def test_kmeanspp_recovers_well_separated_blobs_exactly():
    """K-Means++: separated clusters are found exactly, up to a permutation of labels."""
    x, truth = blobs([[0, 0], [10, 0], [0, 10], [10, 10], [5, 20]], 30, 0.5, 0)
    for seed in range(5):
        _, assign = S.kmeans_pp(x, 5, generator=torch.Generator().manual_seed(seed))
        pairs = set(zip(truth.tolist(), assign.tolist()))
        assert len(pairs) == 5 and len({a for _, a in pairs}) == 5


def test_kmeanspp_beats_random_initialisation_on_overlapping_blobs():
    """K-Means++ seeding (Arthur & Vassilvitskii 2007): lower mean inertia than Lloyd from random points."""
    x, _ = blobs(torch.randn(12, 4, generator=torch.Generator().manual_seed(3)) * 3, 40, 1.0, 1)
    pp, rand = [], []
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        pp.append(inertia(x, *S.kmeans_pp(x, 12, iters=3, generator=g)))
        start = x[torch.randperm(len(x), generator=g)[:12]].clone()
        rand.append(inertia(x, *S.lloyd(x, start, iters=3)))
    assert np.mean(pp) < 0.9 * np.mean(rand), (np.mean(pp), np.mean(rand))


def test_kmeanspp_plain_seeding_draws_proportional_to_squared_distance():
    """D² seeding: with one candidate, the second centre is drawn with p ∝ D² to the first (exact
    probabilities on 4 points, 6000 draws; a chi-square bound far above chance yet far below a uniform draw's
    statistic)."""
    x = torch.tensor([[0.0], [1.0], [3.0], [7.0]], dtype=torch.float64)
    counts = np.zeros((4, 4))
    for seed in range(6000):
        first, second = S.kmeanspp_seed(x, 2, candidates=1,
                                        generator=torch.Generator().manual_seed(seed)).tolist()
        counts[first, second] += 1
    expected = np.zeros((4, 4))
    for i in range(4):
        d2 = ((x - x[i]) ** 2).flatten().numpy()
        expected[i] = 0.25 * 6000 * d2 / d2.sum()
    mask = expected > 0
    assert counts[~mask].sum() == 0  # never the first centre again
    chi2 = (((counts - expected) ** 2)[mask] / expected[mask]).sum()
    uniform = np.where(mask, 6000 / 12, 0)
    chi2_uniform = (((uniform - expected) ** 2)[mask] / expected[mask]).sum()
    assert chi2 < 40 and chi2_uniform > 400, (chi2, chi2_uniform)  # 11 dof: P(chi2 > 40) < 1e-4


def test_kmeanspp_never_picks_a_point_twice_even_with_duplicates():
    x = torch.tensor([[0.0, 0], [0, 0], [0, 0], [1, 1], [1, 1], [5, 5]])
    for seed in range(20):
        idx = S.kmeanspp_seed(x, 3, generator=torch.Generator().manual_seed(seed))
        assert len({tuple(x[i].tolist()) for i in idx.tolist()}) == 3


def test_kmeanspp_result_is_a_lloyd_fixed_point_and_deterministic():
    """Lloyd: each point goes to its nearest centroid and each centroid is its members' mean (brute force);
    the same generator seed gives the same clustering."""
    x, _ = blobs(torch.randn(6, 3, generator=torch.Generator().manual_seed(5)) * 2, 25, 1.0, 2)
    c, a = S.kmeans_pp(x, 6, iters=100, generator=torch.Generator().manual_seed(1))
    for i in range(len(x)):
        assert a[i] == min(range(6), key=lambda j: ((x[i] - c[j]) ** 2).sum().item())
    for j in range(6):
        assert torch.allclose(c[j], x[a == j].mean(0))
    c2, a2 = S.kmeans_pp(x, 6, iters=100, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, a2) and torch.equal(c, c2)


def test_lloyd_reseeds_an_empty_cluster():
    x = torch.tensor([[0.0], [0.1], [10.0], [10.1]])
    centroids, assign = S.lloyd(x, torch.tensor([[0.05], [100.0]]), iters=5)  # the 2nd starts far from all
    assert torch.bincount(assign, minlength=2).min() > 0


def test_kmeans_in_half_precision_runs_in_float32():
    """bf16 embeddings (a bf16 embedding net) are clustered in float32: the same centres and assignment as the
    same values given in float32, not bf16's 8-bit-mantissa distances."""
    x = torch.randn(400, 16, generator=torch.Generator().manual_seed(0)).bfloat16()
    half = S.kmeans_pp(x, 6, 10, torch.Generator().manual_seed(1))
    full = S.kmeans_pp(x.float(), 6, 10, torch.Generator().manual_seed(1))
    assert torch.equal(half[1], full[1]) and torch.equal(half[0], full[0]) and half[0].dtype == torch.float32
    labels = torch.arange(400) % 2
    assert torch.equal(S.build_cluster_index(x, labels, 3, 10, torch.Generator().manual_seed(2))[0],
                       S.build_cluster_index(x.float(), labels, 3, 10, torch.Generator().manual_seed(2))[0])


def test_build_cluster_index_clusters_within_each_class():
    """Paper §3.1: K-Means++ per class -> C*K clusters, every cluster holding one class only."""
    x, labels = blobs([[0, 0], [0.3, 0], [10, 0]], 20, 1.0, 0)
    labels = labels % 2  # two classes, one spread over two blobs
    assign, centroids, cluster_class = S.build_cluster_index(x, labels, 3,
                                                             generator=torch.Generator().manual_seed(0))
    assert centroids.shape == (6, 2) and cluster_class.tolist() == [0, 0, 0, 1, 1, 1]
    assert torch.equal(cluster_class[assign], labels)


def test_build_cluster_index_fitted_on_a_subset_assigns_every_member_to_its_class_nearest_centroid():
    """fit (N,) bool: each class's centroids are K-Means++ on its fitted members alone (the same generator
    draws the same ones), and every member, fitted or not, goes to the nearest centroid of its class (brute
    force, float64); a class with fewer than k fitted members is fitted on all of them. The sampler then draws
    only eligible examples."""
    x, labels = blobs([[0, 0], [4, 0], [0, 4], [4, 4]], 15, 0.5, 0)
    x, labels = x.double(), labels % 2
    fit = torch.rand(len(x), generator=torch.Generator().manual_seed(1)) < 0.6
    fit[labels == 1] = False
    fit[(labels == 1).nonzero()[:2]] = True  # class 1: 2 fitted members, fewer than k = 3
    assign, centroids, cluster_class = S.build_cluster_index(x, labels, 3, generator=torch.Generator()
                                                             .manual_seed(0), fit=fit)
    alone = S.kmeans_pp(x[(labels == 0) & fit], 3, generator=torch.Generator().manual_seed(0))[0]
    assert torch.allclose(centroids[:3], alone)
    for i in range(len(x)):
        c = int(labels[i])
        d2 = [float(((x[i] - centroids[c * 3 + j]) ** 2).sum()) for j in range(3)]
        assert int(assign[i]) == c * 3 + int(np.argmin(d2))
    everyone = S.build_cluster_index(x, labels, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(S.build_cluster_index(x, labels, 3, generator=torch.Generator().manual_seed(0),
                                             fit=torch.ones(len(x), dtype=torch.bool))[0], everyone[0])
    sampler = S.NeighbourhoodSampler(assign, centroids, cluster_class)
    losses = torch.where(fit, 1.0, 100.0).double() * (1 + torch.arange(len(x)) % 3)  # ineligible: large
    sampler.record(torch.arange(len(x)), losses)
    sampler.reindex(assign, centroids, cluster_class, eligible=fit)
    drawn = torch.cat([sampler.sample(2, 4, torch.Generator().manual_seed(s))[0] for s in range(50)])
    class0 = drawn[labels[drawn] == 0]
    assert len(class0) and fit[class0].all()  # class 0: only fitted examples; class 1 falls back where empty
    for c in range(6):  # a seed cluster is drawn by the losses of the examples its batches may draw
        members = (assign == c) & (fit if (fit & (assign == c)).any() else torch.ones_like(fit))
        assert sampler.cluster_loss[c].item() == pytest.approx(losses[members].mean().item())
    sampler.record(torch.tensor([int((~fit).nonzero()[0])]), torch.tensor([5000.0]))  # not drawable: ignored
    assert sampler.cluster_loss[:3].max() < 100


@pytest.mark.parametrize("call,message", [
    (lambda: S.kmeans_pp(torch.randn(3, 2), 4), "k=4 for N=3"),
    (lambda: S.kmeans_pp(torch.randn(3), 1), r"\(N, d\)"),
    (lambda: S.build_cluster_index(torch.randn(10, 2), torch.tensor([0] * 8 + [1] * 2), 3), "class 1 has 2"),
    (lambda: S.build_cluster_index(torch.randn(10, 2), torch.zeros(9, dtype=torch.long), 2), "labels"),
    (lambda: S.magnet_loss(torch.randn(4, 2), torch.zeros(3, dtype=torch.long),
                           torch.zeros(4, dtype=torch.long)),
     "classes"),
    (lambda: S.spld_select(torch.rand(4), torch.zeros(5, dtype=torch.long), 1.0, 1.0), "groups"),
])
def test_bad_input_raises_value_error_naming_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---- 6. Magnet Loss and neighbourhood sampling -----------------------------------------------------------
def magnet_loss_reference(r, classes, clusters, alpha):
    """Eq. 1 written out with loops and plain floats."""
    r = r.tolist()
    ids = sorted(set(clusters.tolist()))
    mu = {m: [sum(r[b][j] for b in range(len(r)) if clusters[b] == m) / int((clusters == m).sum())
              for j in range(len(r[0]))] for m in ids}
    cls = {m: int(classes[clusters == m][0]) for m in ids}
    sq = lambda u, v: sum((a - b) ** 2 for a, b in zip(u, v))
    var = sum(sq(r[b], mu[int(clusters[b])]) for b in range(len(r))) / (len(r) - 1)
    losses = []
    for b in range(len(r)):
        own = sq(r[b], mu[int(clusters[b])])
        den = sum(math.exp(-sq(r[b], mu[m]) / (2 * var)) for m in ids if cls[m] != int(classes[b]))
        losses.append(max(0.0, own / (2 * var) + alpha + math.log(den)))
    return sum(losses) / len(losses), losses, var


def magnet_batch(m, d, dim, n_classes, seed):
    g = torch.Generator().manual_seed(seed)
    clusters = torch.arange(m).repeat_interleave(d)
    classes = (torch.arange(m) % n_classes).repeat_interleave(d)  # several clusters per class when m > C
    r = (torch.randn(m * d, dim, generator=g, dtype=torch.float64)
         + 2 * torch.randn(m, dim, generator=g, dtype=torch.float64)[clusters])
    return r, classes, clusters * 7 + 3  # cluster ids need not be 0..M-1


@pytest.mark.parametrize("m,d,dim,n_classes,alpha", [(2, 3, 2, 2, 1.0), (4, 4, 5, 2, 0.5), (8, 8, 3, 5, 1.0),
                                                     (5, 2, 4, 3, 2.0)])
def test_magnet_loss_matches_naive_loop(m, d, dim, n_classes, alpha):
    """Eq. 1: σ² (not σ⁴), denominator over other classes' clusters only, hinge, mean."""
    r, classes, clusters = magnet_batch(m, d, dim, n_classes, seed=m * 10 + d)
    loss, per, var = S.magnet_loss(r, classes, clusters, alpha)
    ref_loss, ref_per, ref_var = magnet_loss_reference(r, classes, clusters, alpha)
    assert math.isclose(loss.item(), ref_loss, rel_tol=1e-10)
    assert np.allclose(per.numpy(), ref_per, rtol=1e-10, atol=1e-12)
    assert math.isclose(var.item(), ref_var, rel_tol=1e-12)
    assert (per == 0).any() or (per > 0).all()  # hinge is applied per example


def test_magnet_loss_of_half_precision_embeddings_is_computed_in_float32():
    """Eq. 1 on bf16/float16 embeddings (a net under autocast) equals Eq. 1 on the same values in float32 (in
    float16 σ² overflows and the loss would be a constant); a batch of one, whose σ² divides by B − 1 = 0, is
    refused."""
    r = torch.randn(32, 8, generator=torch.Generator().manual_seed(0)) * 20  # (B, d)
    classes, clusters = torch.arange(32) // 8, torch.arange(32) // 4
    for dtype in (torch.float16, torch.bfloat16):
        low = r.to(dtype).requires_grad_()
        loss, _, sigma2 = S.magnet_loss(low, classes, clusters)
        assert torch.isfinite(sigma2) and loss.item() == pytest.approx(
            S.magnet_loss(low.detach().float(), classes, clusters)[0].item(), rel=1e-6)
        loss.backward()
        assert low.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="B >= 2"):
        S.magnet_loss(r[:1], classes[:1], clusters[:1])


def test_magnet_loss_is_invariant_to_scaling_the_embedding():
    """With σ² (not σ⁴) in Eq. 1 the loss does not change when r is scaled."""
    r, classes, clusters = magnet_batch(6, 4, 3, 3, seed=1)
    base = S.magnet_loss(r, classes, clusters)[0]
    for scale in (0.01, 100.0):
        assert math.isclose(S.magnet_loss(r * scale, classes, clusters)[0].item(), base.item(), rel_tol=1e-9)


def test_magnet_loss_gradients_pass_gradcheck():
    """Gradients flow through μ and σ² (autograd vs finite differences, float64)."""
    r, classes, clusters = magnet_batch(3, 3, 2, 2, seed=4)
    r.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: S.magnet_loss(x, classes, clusters, 3.0)[0], (r,))


def toy_index(n_classes=3, k=3, per_cluster=5, seed=0):
    """An index with known geometry: centroids on a line, members around them."""
    g = torch.Generator().manual_seed(seed)
    centroids = torch.randn(n_classes * k, 2, generator=g) * 5  # (C*K, 2)
    cluster_class = torch.arange(n_classes).repeat_interleave(k)
    assign = torch.arange(n_classes * k).repeat_interleave(per_cluster)[
        torch.randperm(n_classes * k * per_cluster, generator=g)]
    return assign, centroids, cluster_class


def test_sampler_impostors_are_the_nearest_other_class_clusters():
    """Alg. 1: the M−1 impostors are exactly the nearest clusters (by centroid) of other classes."""
    assign, centroids, cluster_class = toy_index()
    sampler = S.NeighbourhoodSampler(assign, centroids, cluster_class)
    for seed in range(30):
        idx, ids = sampler.sample(4, 3, torch.Generator().manual_seed(seed))
        chosen = ids[::3].tolist()
        seed_c = chosen[0]
        others = [c for c in range(9) if cluster_class[c] != cluster_class[seed_c]]
        nearest = sorted(others, key=lambda c: ((centroids[c] - centroids[seed_c]) ** 2).sum().item())[:3]
        assert sorted(chosen[1:]) == sorted(nearest)
        assert all(cluster_class[c] != cluster_class[seed_c] for c in chosen[1:])
        assert torch.equal(assign[idx], ids)  # each example comes from its batch cluster
        for j in range(4):  # D distinct examples when the cluster has at least D
            assert len(set(idx[3 * j:3 * j + 3].tolist())) == 3


def test_sampler_seed_frequencies_follow_cluster_losses():
    """Alg. 1: I_1 ~ p_I ∝ cluster loss = mean recorded loss of its members (4000 draws, chi-square bound)."""
    assign, centroids, cluster_class = toy_index()
    sampler = S.NeighbourhoodSampler(assign, centroids, cluster_class)
    losses = torch.linspace(0.0, 2.0, 9)[assign]  # cluster c has loss 2c/8; cluster 0 has zero
    sampler.record(torch.arange(len(assign)), losses)
    assert torch.allclose(sampler.cluster_loss, torch.linspace(0.0, 2.0, 9, dtype=torch.float64))
    counts = np.zeros(9)
    g = torch.Generator().manual_seed(0)
    for _ in range(4000):
        counts[int(sampler.sample(2, 1, g)[1][0])] += 1
    expected = 4000 * np.linspace(0, 2, 9) / np.linspace(0, 2, 9).sum()
    assert counts[0] == 0
    chi2 = ((counts[1:] - expected[1:]) ** 2 / expected[1:]).sum()
    assert chi2 < 30, chi2  # 7 dof: P(chi2 > 30) < 1e-4; a uniform draw scores ~ 700


def test_sampler_draws_uniformly_before_any_loss_and_reindex_recomputes_cluster_losses():
    """Alg. 1: uniform before any loss; after a refresh, cluster losses follow the new assignment."""
    assign, centroids, cluster_class = toy_index(n_classes=2, k=2)
    sampler = S.NeighbourhoodSampler(assign, centroids, cluster_class)
    assert torch.all(sampler.cluster_loss == sampler.cluster_loss[0])
    example = torch.arange(len(assign), dtype=torch.float64)
    sampler.record(torch.arange(len(assign)), example)
    new_assign = torch.arange(len(assign)) % 4  # a refreshed clustering
    sampler.reindex(new_assign, centroids, cluster_class)
    expected = [example[new_assign == c].mean().item() for c in range(4)]
    assert np.allclose(sampler.cluster_loss.numpy(), expected)


def test_sampler_incremental_cluster_losses_equal_a_recomputation_with_repeated_examples():
    """The per-cluster sums kept by record() equal the plain mean of each cluster's last recorded losses, also
    when a batch draws an example twice (with replacement) and examples are recorded again later."""
    assign, centroids, cluster_class = toy_index(n_classes=3, k=2, per_cluster=3)
    sampler = S.NeighbourhoodSampler(assign, centroids, cluster_class)
    g = torch.Generator().manual_seed(0)
    last = {}
    for _ in range(40):
        idx, _ = sampler.sample(3, 5, g)  # D = 5 > 3 members: drawn with replacement
        losses = torch.rand(len(idx), generator=g, dtype=torch.float64)
        sampler.record(idx, losses)
        last.update(zip(idx.tolist(), losses.tolist()))  # a later occurrence overwrites an earlier one
    for c in range(6):
        members = [i for i in last if assign[i] == c]
        if members:
            assert math.isclose(sampler.cluster_loss[c].item(), np.mean([last[i] for i in members]),
                                rel_tol=1e-9)


def test_a_collapsed_embedding_leaves_empty_clusters_that_are_never_drawn():
    """Two classes of identical points: K-Means leaves 3 of each class's 4 clusters empty. The sampler never
    seeds a batch with an empty cluster nor takes one as an impostor, before and after losses are recorded."""
    emb = torch.cat([torch.zeros(20, 4), torch.ones(20, 4)])  # (40, 4) every point on its class's one spot
    labels = torch.arange(40) // 20
    gen = torch.Generator().manual_seed(0)
    assign, centroids, cluster_class = S.build_cluster_index(emb, labels, 4, 5, gen)
    sizes = torch.bincount(assign, minlength=8)
    assert (sizes == 0).sum() == 6
    sampler = S.NeighbourhoodSampler(assign, centroids, cluster_class)
    gen = torch.Generator().manual_seed(1)
    for step in range(50):
        idx, clusters = sampler.sample(2, 4, gen)
        assert (sizes[clusters] > 0).all() and torch.equal(assign[idx], clusters)
        sampler.record(idx, torch.rand(8, generator=gen))


def test_sampler_refuses_more_clusters_than_impostors_exist():
    assign, centroids, cluster_class = toy_index(n_classes=2, k=2)
    with pytest.raises(ValueError, match="impostor"):
        S.NeighbourhoodSampler(assign, centroids, cluster_class).sample(4, 2)


def test_magnet_predict_matches_naive_soft_vote():
    """Rippel et al. §3.2: c* = argmax_c Σ over the L nearest centres of class c of exp(−‖r−μ‖²/(2σ̄²))."""
    g = torch.Generator().manual_seed(0)
    emb, centroids = torch.randn(40, 3, generator=g, dtype=torch.float64), torch.randn(12, 3, generator=g,
                                                                                       dtype=torch.float64)
    cluster_class = torch.tensor([0, 1, 2] * 4)
    predicted = S.magnet_predict(emb, centroids, cluster_class, 0.7, 5)
    for b in range(40):
        d2 = ((centroids - emb[b]) ** 2).sum(1)
        votes = [0.0, 0.0, 0.0]
        for j in d2.argsort()[:5].tolist():
            votes[int(cluster_class[j])] += math.exp(-d2[j].item() / 1.4)
        assert predicted[b] == int(np.argmax(votes))


# ---- 7. other deep-metric-learning objectives (paper §5) -------------------------------------------------
def pairs_batch(seed, b=12, d=4, c=3):
    gen = torch.Generator().manual_seed(seed)
    emb = torch.randn(b, d, generator=gen, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(b, c, generator=gen, dtype=torch.float64, requires_grad=True)
    return emb, torch.arange(b) % c, logits


def osm_caa_reference(emb, labels, logits, margin, lam, sigma):
    f = emb / emb.norm(dim=1, keepdim=True)
    a = logits.softmax(1)[torch.arange(len(labels)), labels].detach()
    num_p = den_p = num_n = den_n = 0.0
    for i in range(len(f)):
        for j in range(i + 1, len(f)):
            d = (f[i] - f[j]).norm()
            if labels[i] == labels[j]:
                w = (torch.exp(-d ** 2 / sigma ** 2) * min(a[i], a[j])).detach()
                num_p, den_p = num_p + w * d ** 2, den_p + w
            else:
                w = (torch.clamp(margin - d, min=0) * min(a[i], a[j])).detach()
                num_n, den_n = num_n + w * torch.clamp(margin - d, min=0) ** 2, den_n + w
    return (1 - lam) * 0.5 * num_p / den_p + lam * 0.5 * num_n / den_n


def test_magnet_predict_takes_every_centre_when_asked_for_more_neighbours_than_there_are():
    """L larger than the C·K centres (a copier's L = 8 with 4 clusters): the soft vote over all of them; bf16
    embeddings against build_cluster_index's float32 centres vote in float32."""
    centroids, cluster_class = torch.tensor([[0.0], [1.0], [5.0], [6.0]]), torch.tensor([0, 0, 1, 1])
    emb = torch.tensor([[0.4], [5.6]])
    assert torch.equal(S.magnet_predict(emb, centroids, cluster_class, 1.0, 8),
                       S.magnet_predict(emb, centroids, cluster_class, 1.0, 4))
    votes = S.magnet_predict(emb.bfloat16(), centroids, cluster_class, 1.0, 2)
    assert torch.equal(votes, torch.tensor([0, 1]))


def test_osm_caa_loss_matches_the_pair_loop_and_no_gradient_flows_through_its_weights():
    """Every pair i < j with the paper's OSM × CAA weights, which are constants: the same value and embedding
    gradient as a loop that detaches them, and no gradient at all into the attention's logits."""
    for seed, (margin, lam, sigma) in enumerate([(1.2, 0.5, 0.8), (1.5, 0.3, 0.5)]):
        emb, labels, logits = pairs_batch(seed)
        loss = S.osm_caa_loss(emb, labels, logits, margin, lam, sigma)
        ref = osm_caa_reference(emb, labels, logits, margin, lam, sigma)
        assert abs(loss.item() - ref.item()) < 1e-10
        g, g_logits = torch.autograd.grad(loss, (emb, logits), allow_unused=True)
        assert torch.allclose(g, torch.autograd.grad(ref, emb)[0], atol=1e-10) and torch.isfinite(g).all()
        assert g_logits is None or not g_logits.any()


def test_triplet_global_loss_matches_the_triplet_loop():
    gen = torch.Generator().manual_seed(0)
    a, p, n = (torch.randn(9, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    d_pos = [((a[t] - p[t]) ** 2).sum() for t in range(9)]
    d_neg = [((a[t] - n[t]) ** 2).sum() for t in range(9)]
    hinge = sum(torch.clamp(dp - dn + 0.3, min=0) for dp, dn in zip(d_pos, d_neg)) / 9
    mu_p, mu_n = sum(d_pos) / 9, sum(d_neg) / 9
    var_p, var_n = sum((x - mu_p) ** 2 for x in d_pos) / 9, sum((x - mu_n) ** 2 for x in d_neg) / 9
    ref = hinge + var_p + var_n + 0.7 * torch.clamp(mu_p - mu_n + 0.4, min=0)
    loss = S.triplet_global_loss(a, p, n, margin=0.3, t=0.4, lam=0.7)
    assert abs(loss.item() - ref.item()) < 1e-10
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(loss, (a, p, n)))


def test_dml_crc_loss_matches_each_examples_own_ridge_solve():
    """For each i: D = the other examples as columns, c = (DᵀD + κI)⁻¹Dᵀz_i, residual per class present among
    the others, cross-entropy of softmax(−r/τ), averaged over the batch."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(10, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
    for ridge, tau in ((1.0, 1.0), (0.1, 0.5)):
        losses = []
        for i in range(10):
            others = [j for j in range(10) if j != i]
            D = z[others].T  # (d, B−1) columns
            c = torch.linalg.solve(D.T @ D + ridge * torch.eye(9, dtype=torch.float64), D.T @ z[i])
            classes = sorted(set(labels[others].tolist()))
            r = torch.stack([((z[i] - sum(D[:, k] * c[k] for k in range(9)
                                          if labels[others[k]] == cls)) ** 2).sum()
                             for cls in classes])
            losses.append(-torch.log_softmax(-r / tau, 0)[classes.index(int(labels[i]))])
        ref = sum(losses) / 10
        loss = S.dml_crc_loss(z, labels, ridge, tau)
        assert abs(loss.item() - ref.item()) < 1e-10
        assert torch.allclose(torch.autograd.grad(loss, z)[0], torch.autograd.grad(ref, z)[0], atol=1e-10)


def test_mine_triplets_returns_the_brute_force_hardest_also_in_small_chunks():
    """Hard negative: the nearest other-class example; hard positive: the farthest of the n nearest same-class
    examples, the anchor excluded. Chunks smaller than N must give the same answer."""
    gen = torch.Generator().manual_seed(0)
    emb, labels = (torch.randn(60, 3, generator=gen, dtype=torch.float64),
                   torch.randint(0, 3, (60,), generator=gen))
    anchors = torch.tensor([0, 5, 17, 33, 59])
    positives, negatives = [], []
    for a in anchors.tolist():
        dist = ((emb - emb[a]) ** 2).sum(1)
        same = [j for j in dist.argsort().tolist() if labels[j] == labels[a] and j != a]
        other = [j for j in dist.argsort().tolist() if labels[j] != labels[a]]
        positives.append(same[:4][-1])
        negatives.append(other[0])
    for chunk in (4096, 7, 1):
        pos, neg = S.mine_triplets(emb, labels, anchors, n_neighbours=4, chunk=chunk)
        assert pos.tolist() == positives and neg.tolist() == negatives, chunk


def test_mine_triplets_refuses_a_single_class_and_dml_crc_runs_in_half_precision():
    """With one class there is no negative: mine_triplets raises instead of returning same-class
    "negatives". dml_crc_loss on bf16 embeddings solves its ridge systems in float32 (no bf16 kernel)."""
    emb = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="two classes"):
        S.mine_triplets(emb, torch.zeros(6, dtype=torch.long), torch.arange(6), 2)
    z, labels = torch.randn(8, 4, generator=torch.Generator().manual_seed(1)), torch.arange(8) % 2
    assert S.dml_crc_loss(z.bfloat16(), labels).item() == pytest.approx(
        S.dml_crc_loss(z.bfloat16().float(), labels).item(), rel=1e-6)


def test_triplet_margin_controller_moves_toward_the_target_share():
    assert S.triplet_margin_step(0.2, 0.2, target=0.5) > 0.2
    assert S.triplet_margin_step(0.2, 0.9, target=0.5) < 0.2
    assert S.triplet_margin_step(0.2, 0.5, target=0.5) == 0.2


def test_recall_at_1_and_nmi_against_hand_computed_values():
    points = torch.tensor([[0.0], [1.0], [3.0], [4.0], [10.0]])
    for chunk in (4096, 2):
        assert S.recall_at_1(points, torch.tensor([0, 0, 1, 1, 1]), chunk) == 1.0
        assert S.recall_at_1(points, torch.tensor([0, 1, 1, 1, 0]), chunk) == pytest.approx(0.4)  # 3 ↔ 4 only
    labels = torch.arange(12) % 3
    assert S.nmi(torch.tensor([2, 0, 1] * 4), labels) == pytest.approx(1.0)  # a relabelled perfect clustering
    assert S.nmi(torch.arange(12) // 6, torch.arange(12) % 2) == pytest.approx(0.0, abs=1e-12)  # independent
    # by hand: I = ½ln(4/3) + ¼ln(2/3) + ¼ln 2 = 0.215762, H(U) = 0.562335, H(V) = ln 2; 2I / (H(U) + H(V))
    assert S.nmi(torch.tensor([0, 0, 0, 1]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.343712, abs=1e-6)


def train_tiny_embedding(loss_name, steps=300):
    """A small MLP trained with one objective on 3 classes whose signal lies in 2 of 22 dimensions (the other
    20 are wide noise, so raw nearest neighbours mostly miss) -> Recall@1 on held-out points before and
    after."""
    gen = torch.Generator().manual_seed(0)
    def make(n):
        y = torch.arange(n) % 3
        centres = torch.tensor([[0.0, 0.0], [4.0, 0.0], [2.0, 3.5]])
        x = torch.cat([centres[y] + 0.5 * torch.randn(n, 2, generator=gen),
                       3 * torch.randn(n, 20, generator=gen)], 1)
        return x, y
    (x, y), (x_test, y_test) = make(300), make(300)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(22, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    head = torch.nn.Linear(8, 3)
    opt = torch.optim.Adam([*net.parameters(), *head.parameters()], lr=1e-2)
    by_class = [(y == c).nonzero().flatten() for c in range(3)]
    embed = (lambda v: torch.nn.functional.normalize(net(v), dim=1)) if loss_name == "osm_caa" else net
    before = S.recall_at_1(embed(x_test).detach(), y_test)
    for step in range(steps):
        if loss_name == "triplet_global" and step % 50 == 0:
            with torch.no_grad():
                pos, neg = S.mine_triplets(net(x), y, torch.arange(300), n_neighbours=5)
        idx = S.class_balanced_batch(by_class, 3, 10, gen)
        r = net(x[idx])
        if loss_name == "magnet":
            loss = S.magnet_loss(r, y[idx], y[idx])[0]
        elif loss_name == "osm_caa":
            logits = head(torch.nn.functional.normalize(r, dim=1))
            loss = S.osm_caa_loss(r, y[idx], logits) + torch.nn.functional.cross_entropy(logits, y[idx])
        elif loss_name == "triplet_global":
            loss = S.triplet_global_loss(r, net(x[pos[idx]]), net(x[neg[idx]]))
        else:
            loss = S.dml_crc_loss(r, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return before, S.recall_at_1(embed(x_test).detach(), y_test)


@pytest.mark.parametrize("loss_name", ["magnet", "osm_caa", "triplet_global", "dml_crc"])
def test_each_objective_learns_an_embedding_that_separates_the_classes(loss_name):
    before, after = train_tiny_embedding(loss_name)
    assert before < 0.8 and after >= 0.95, (before, after)


@needs_fmnist
@pytest.mark.parametrize("loss_name", ["osm_caa", "triplet_global", "dml_crc"])
def test_embed_loss_runs_spladvise_end_to_end_and_judges_each_index(tmp_path, loss_name):
    """--embed-loss X: the child trains that objective, the curriculum selects on its clusters, and every
    published index carries soft-vote accuracy, Recall@1 and NMI; Smart Mining logs its margin and share."""
    out = tmp_path / loss_name
    r = cli(TINY + ["--updates", "150", "--embed-loss", loss_name], out)
    assert r.returncode == 0, r.stderr
    selecting = [m for m in read_metrics(out) if m["selected_frac"] < 1 and m["embed_version"]]
    assert selecting and all(0 < m["embed_recall1"] <= 1 and 0 <= m["embed_nmi"] <= 1 for m in selecting)
    assert selecting[-1]["embed_recall1"] > 0.5  # chance is 0.1
    if loss_name == "triplet_global":
        assert re.search(r"triplet_active=(0\.\d+|1\.0+) margin=0\.\d+", r.stdout)


# ---- 8. SPLD selector (and InfoBatch) --------------------------------------------------------------------
def spld_objective(losses, groups, w, lam, gamma):
    """Eq. 2's objective for a binary W: Σ W_i L_i − λ Σ W_i − γ Σ_k ‖W^k‖₂; lam a float or one λ_k per
    group."""
    lam_of = (lambda k: lam) if isinstance(lam, float) else (lambda k: lam[k])
    total = sum(wi * (li - lam_of(gi)) for wi, li, gi in zip(w, losses, groups))
    return total - gamma * sum(math.sqrt(sum(wi for wi, gi in zip(w, groups) if gi == k))
                               for k in set(groups))


def test_spld_select_gives_the_global_optimum_of_eq2_by_enumeration():
    """Alg. 2 steps 7-13 / Eq. 2: the closed form's W attains the minimum over all 2^N binary W."""
    rng = np.random.default_rng(0)
    for case in range(60):
        n = int(rng.integers(1, 13))
        losses = rng.exponential(1.0, n)
        groups = rng.integers(0, int(rng.integers(1, 5)), n)
        lam, gamma = float(rng.uniform(0, 1.5)), float(rng.uniform(0, 1.5))
        # the rank pace's per-group λ_k: Eq. 2 separates over groups, so the closed form still holds
        if case % 2:
            lam = rng.uniform(0, 1.5, int(groups.max()) + 1).tolist()
        w = S.spld_select(torch.tensor(losses), torch.tensor(groups),
                          torch.tensor(lam) if isinstance(lam, list) else lam, gamma).int().tolist()
        best = min(spld_objective(losses, groups, v, lam, gamma) for v in itertools.product((0, 1), repeat=n))
        assert math.isclose(spld_objective(losses, groups, w, lam, gamma), best, abs_tol=1e-9), case


def test_spld_select_matches_the_per_group_rank_rule_loop():
    """The vectorised rule equals a per-group loop over ranks (N = 500, 17 groups, ties included)."""
    g = torch.Generator().manual_seed(1)
    losses = torch.rand(500, generator=g).mul(10).round().div(10)  # ties
    groups = torch.randint(0, 17, (500,), generator=g)
    mask = S.spld_select(losses, groups, 0.3, 0.8)
    expected = torch.zeros(500, dtype=torch.bool)
    for k in range(17):
        members = (groups == k).nonzero().flatten()
        for rank, i in enumerate(members[torch.argsort(losses[members], stable=True)].tolist(), start=1):
            expected[i] = losses[i] < 0.3 + 0.8 / (math.sqrt(rank) + math.sqrt(rank - 1))
    assert torch.equal(mask, expected)


def test_spld_pace_quantile_selects_f_t_by_easiness_and_grows():
    """Quantile pace (Alg. 2 step 16): with γ = 0, W keeps f_t = f0 (1+β1)^t of the samples;
    λ and γ grow with t."""
    losses = torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    groups = torch.zeros(1000, dtype=torch.long)
    fractions, lams = [], []
    for t in range(8):
        lam, gamma = S.spld_pace(losses, t, "quantile", 0.3, 0.0, 0.2, 0.1)
        fractions.append(S.spld_select(losses, groups, lam, gamma).double().mean().item())
        lams.append(lam)
    assert np.allclose(fractions, [min(1.0, 0.3 * 1.2 ** t) for t in range(8)], atol=2e-3)
    assert all(a < b for a, b in zip(lams, lams[1:]))
    for t in range(4):  # γ_t = ρ0 (1+β2)^t λ_t
        lam, gamma = S.spld_pace(losses, t, "quantile", 0.3, 0.5, 0.2, 0.1)
        assert math.isclose(gamma, 0.5 * 1.1 ** t * lam)


def test_losses_tied_at_the_quantile_are_kept_and_nan_losses_are_refused():
    """Equal losses are equally easy: plain SPL on tied losses keeps every one tied at λ_t's quantile (Eq. 2
    keeps L < λ, so λ = the quantile itself would keep none), within the cap when there is one; a NaN loss
    cannot be ranked and is refused with a message."""
    tied = torch.tensor([0.5] * 10 + [2.0] * 10, dtype=torch.float64)
    assert S.SPLDSelector(f0=0.3).select(tied).sum() == 10
    assert S.SPLDSelector(f0=0.7).select(torch.ones(10)).all()
    assert S.SPLDSelector(f0=0.7, f_max=0.5).select(torch.ones(10)).sum() == 5
    with pytest.raises(ValueError, match="1 NaN"):
        S.SPLDSelector().select(torch.tensor([0.1, float("nan"), 0.3]))


def test_spld_pace_rank_keeps_the_k_t_lowest_of_each_cluster_then_eq2_adds_its_bonus():
    """--pace rank (the authors' count pace): K_t = ⌈f0 (1+β1)^t · mean cluster size⌉; λ_k is the
    (K_t+1)-th lowest loss of cluster k, so its K_t lowest are kept, and Eq. 2's rank term, with γ_t = ρ_t
    times the quantile-pace λ_t, may keep more. Compared with a plain loop over clusters."""
    rng = np.random.default_rng(3)
    for case in range(30):
        n, n_groups = int(rng.integers(20, 200)), int(rng.integers(1, 9))
        losses = torch.tensor(rng.permutation(n) / n + rng.uniform(0, 1e-3, n))  # distinct
        groups = torch.tensor(rng.integers(0, n_groups, n))
        t, f0, rho0 = (int(rng.integers(0, 12)), float(rng.uniform(0.1, 0.9)),
                       float(rng.choice([0.0, 0.5, 1.0])))
        lam, gamma = S.spld_pace(losses, t, "rank", f0, rho0, 0.1, 0.2, groups=groups)
        mask = S.spld_select(losses, groups, lam, gamma)
        sizes = [int((groups == k).sum()) for k in range(int(groups.max()) + 1)]
        f = f0 * 1.1 ** t
        quota = math.ceil(f * n / sum(1 for m in sizes if m))
        assert gamma == pytest.approx(rho0 * 1.2 ** t * np.quantile(losses.numpy(), min(f, 1.0)))
        expected = torch.zeros(n, dtype=torch.bool)
        for k, size in enumerate(sizes):
            members = sorted((groups == k).nonzero().flatten().tolist(), key=lambda i: float(losses[i]))
            lam_k = float(losses[members[quota]]) if quota < size else math.inf
            for rank, i in enumerate(members, start=1):
                expected[i] = losses[i] < lam_k + gamma / (math.sqrt(rank) + math.sqrt(rank - 1))
                assert expected[i] or rank > quota  # the K_t lowest always stay
        assert torch.equal(mask, expected), case
        assert S.pace_keeps_all(t, "rank", f0, 0.1, torch.tensor(sizes)) == (quota >= max(sizes))
    sizes = torch.tensor([30, 10, 20])
    quotas = [S.rank_quota(0.2 * 1.5 ** t, sizes) for t in range(8)]
    assert quotas == [math.ceil(0.2 * 1.5 ** t * 20) for t in range(8)] and quotas == sorted(quotas)


def test_pace_keeps_all_exactly_when_no_sample_can_be_left_out():
    """The scoring pass is skipped only when the pace keeps every sample whatever the losses: quantile once
    f_t ≥ 1, rank once K_t reaches the largest cluster."""
    losses, groups = torch.rand(300, dtype=torch.float64), torch.randint(0, 5, (300,))
    for t in range(10):
        for mode in ("quantile", "rank"):
            lam, gamma = S.spld_pace(losses, t, mode, 0.4, 0.0, 0.2, 0.2, groups=groups)
            keeps_all = bool(S.spld_select(losses, groups, lam, gamma).all())
            assert S.pace_keeps_all(t, mode, 0.4, 0.2, torch.bincount(groups)) == keeps_all, (t, mode)


def test_infobatch_keeps_a_random_one_minus_r_of_the_below_mean_samples_and_all_others():
    """InfoBatch (Qin et al., ICLR 2024): candidates are the samples below the mean score; (1 − r) of them are
    kept, drawn at random (not the lowest or highest), with weight 1/(1 − r); every other sample is kept at
    weight 1."""
    scores = torch.rand(100_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) ** 2
    candidates = scores < scores.mean()
    kept, weights = S.infobatch_select(scores, 0.3, 0.0, generator=torch.Generator().manual_seed(1))
    assert kept[~candidates].all() and (weights[~candidates] == 1).all()
    assert (weights[candidates] == 1 / 0.7).all()
    # a count, not a coin per sample
    assert kept[candidates].double().mean().item() == pytest.approx(0.7, abs=1e-4)
    # a random subset: its scores have the candidates' mean (±1e-3 is over 3 standard errors; the lowest 70 %
    # would miss by 0.057), and another generator draws another subset
    assert scores[kept & candidates].mean().item() == pytest.approx(scores[candidates].mean().item(),
                                                                    abs=1e-3)
    other, _ = S.infobatch_select(scores, 0.3, 0.0, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(kept, other)


def test_infobatch_prunes_nothing_on_equal_scores_and_everything_is_used_once_annealing():
    """The first pass (every score equal) and every pass from δ of the epochs on use all samples at weight
    1."""
    equal = torch.zeros(50)
    scores = torch.arange(50.0)
    for progress, s in ((0.0, equal), (0.875, scores), (0.95, scores)):
        kept, weights = S.infobatch_select(s, 0.5, progress, 0.875)
        assert kept.all() and (weights == 1).all(), progress
    kept, _ = S.infobatch_select(scores, 0.5, 0.874, 0.875)
    assert kept.sum() == 50 - 13  # 25 candidates below the mean 24.5, 12 of them pruned (round(12.5) = 12)


def test_infobatch_rescaled_gradient_is_unbiased_on_a_linear_model():
    """E over the random pruning of Σ_kept w_i ∇ℓ_i equals the full Σ_i ∇ℓ_i (squared loss, linear model,
    float64): within 4 standard errors over 20,000 draws, while the same pruning without the rescaling misses
    by > 40."""
    gen = torch.Generator().manual_seed(0)
    x, y, theta = (torch.randn(40, 3, generator=gen, dtype=torch.float64), torch.randn(40, generator=gen,
                   dtype=torch.float64), torch.randn(3, generator=gen, dtype=torch.float64))
    per_sample = torch.autograd.functional.jacobian(lambda th: (x @ th - y) ** 2, theta)  # (40, 3): ∇ℓ_i
    scores = torch.randperm(40, generator=gen).double()  # 20 candidates: (1 − r) N_c whole, 1/(1 − r) exact
    draws = [S.infobatch_select(scores, 0.5, 0.0, generator=gen) for _ in range(20_000)]
    kept = torch.stack([k for k, _ in draws]).double()  # (T, 40)
    weighted = kept @ (draws[0][1][:, None] * per_sample)  # (T, 3): the pruned pass's gradient
    full = per_sample.sum(0)  # (3,)
    se = weighted.std(0) / math.sqrt(len(draws))  # (3,)
    assert ((weighted.mean(0) - full).abs() < 4 * se).all(), (weighted.mean(0), full, se)
    assert ((kept @ per_sample).mean(0) - full).abs().max() > 40 * se.max()


def test_f_max_caps_the_quantile_and_the_rank_pace():
    """--f-max F: f_t = min(F, f0 (1+β1)^t): λ_t stays the F-quantile however late t, the rank pace's K_t
    stays ⌈F · mean cluster size⌉, and the pace never keeps every sample."""
    gen = torch.Generator().manual_seed(0)
    losses, groups = torch.rand(1000, generator=gen, dtype=torch.float64), torch.arange(1000) % 5
    lam, _ = S.spld_pace(losses, 30, "quantile", 0.7, 0.5, 0.1, 0.1, f_max=0.6)
    assert lam == pytest.approx(torch.quantile(losses, 0.6).item())
    assert (losses < lam).double().mean() == pytest.approx(0.6, abs=0.002)
    lam_k, _ = S.spld_pace(losses, 30, "rank", 0.7, 0.0, 0.1, 0.1, groups=groups, f_max=0.6)
    assert int(S.spld_select(losses, groups, lam_k, 0.0).sum()) == 5 * 120  # K_t = 0.6 · 200 per cluster
    assert (not S.pace_keeps_all(30, "quantile", 0.7, 0.1, f_max=0.6)
            and S.pace_keeps_all(30, "quantile", 0.7, 0.1))


def test_a_capped_pace_never_selects_more_late_than_when_f_t_reached_the_cap():
    """--f-max F holds for every pass: over 150 SPLD selections on drifting losses (ρ_t alone would grow
    1.1^150 times), no pass keeps more than it did once f_t reached F, nor more than ⌈F·N⌉; without the cap
    the same pace keeps every sample within a few passes."""
    gen = torch.Generator().manual_seed(0)
    n, groups = 1000, torch.arange(1000) % 20
    capped, free = S.SPLDSelector(f0=0.3, f_max=0.6), S.SPLDSelector(f0=0.3)
    shares, free_shares = [], []
    for t in range(150):
        losses = torch.rand(n, generator=gen, dtype=torch.float64) * (1 + groups) / (1 + 0.05 * t)  # (N,)
        shares.append(capped.select(losses, groups).double().mean().item())
        free_shares.append(free.select(losses, groups).double().mean().item())
    at_cap = S.cap_iteration(0.3, 0.1, 0.6)
    assert at_cap == math.ceil(math.log(2) / math.log(1.1)) and capped.t == 150
    assert max(shares[at_cap:]) <= shares[at_cap] and max(shares) <= 0.6
    assert min(shares[at_cap:]) >= 0.59  # λ_t alone keeps the 0.6-quantile: the cap is a floor as well
    assert free_shares[-1] == 1.0 and free.keeps_all(torch.bincount(groups)) and not capped.keeps_all()
    lam, gamma = S.spld_pace(losses, 149, "quantile", 0.3, 0.5, 0.1, 0.1, groups, 0.6)
    assert gamma == pytest.approx(0.5 * 1.1 ** at_cap * lam)  # ρ_t stopped growing at the cap

def test_a_cap_or_a_cap_still_to_be_estimated_never_counts_as_keeping_every_sample():
    """Under f_max < 1 no pass keeps every sample, whatever the pace (the rank pace's K_t may pass the largest
    cluster), and f_max="auto" has no cap yet: neither may stop the embedding or skip the scoring pass."""
    sizes = torch.tensor([100, 100, 100])
    assert S.pace_keeps_all(40, "rank", 0.7, 0.1, sizes)
    assert not S.pace_keeps_all(40, "rank", 0.7, 0.1, sizes, 0.99)
    assert not S.SPLDSelector(f0=1.0, f_max="auto").keeps_all() and S.SPLDSelector(f0=1.0).keeps_all()
    assert S.clean_share_estimate(torch.full((50,), 0.3)) == 1.0  # equal losses: nothing looks noisy


def test_spld_select_max_keep_keeps_the_largest_margins_of_eq2():
    """max_keep: of Eq. 2's selection, the samples with the largest margin λ + γ/(√i + √(i−1)) − L_i, counted
    by a plain loop over groups."""
    rng = np.random.default_rng(1)
    losses, groups = torch.tensor(rng.uniform(0, 1, 60)), torch.tensor(rng.integers(0, 4, 60))
    lam, gamma = 0.5, 0.4
    margin = {}
    for k in range(4):
        members = sorted((groups == k).nonzero().flatten().tolist(), key=lambda i: float(losses[i]))
        for rank, i in enumerate(members, start=1):
            margin[i] = lam + gamma / (math.sqrt(rank) + math.sqrt(rank - 1)) - float(losses[i])
    kept = [i for i in margin if margin[i] > 0]
    best = sorted(kept, key=lambda i: -margin[i])[:20]
    mask = S.spld_select(losses, groups, lam, gamma, max_keep=20)
    assert len(kept) > 20 and sorted(mask.nonzero().flatten().tolist()) == sorted(best)
    assert torch.equal(S.spld_select(losses, groups, lam, gamma, max_keep=1000),
                       S.spld_select(losses, groups, lam, gamma))


def test_clean_share_estimate_recovers_the_weight_of_a_two_mode_loss_mixture():
    """DivideMix's two-component mixture on losses: 70 % from a low mode and 30 % from a high one give a clean
    share within 0.02 of 0.7, whatever the scale; f_max="auto" caps the selector at the estimate of every
    select(); a state saved before the auto flag was stored loads."""
    gen = torch.Generator().manual_seed(0)
    low = torch.randn(7000, generator=gen, dtype=torch.float64).abs() * 0.2
    high = 2.5 + 0.4 * torch.randn(3000, generator=gen, dtype=torch.float64)
    losses = torch.cat([low, high])[torch.randperm(10000, generator=gen)]
    assert S.clean_share_estimate(losses) == pytest.approx(0.7, abs=0.02)
    assert S.clean_share_estimate(100 * losses) == pytest.approx(S.clean_share_estimate(losses))
    selector = S.SPLDSelector(f0=0.95, f_max="auto")  # f0 above the clean share: the estimate decides
    mask = selector.select(losses)
    assert selector.f_max == selector.clean_share_estimate == pytest.approx(0.7, abs=0.02)
    assert mask.double().mean().item() == pytest.approx(selector.f_max, abs=1e-3)
    cleaner = torch.cat([low, high[:1000], low[:2000]])  # the next pass: 90 % from the low mode
    mask = selector.select(cleaner)  # re-estimated at every select()
    assert selector.f_max == pytest.approx(0.9, abs=0.02)
    assert mask.double().mean().item() == pytest.approx(selector.f_max, abs=1e-3)
    restored = S.SPLDSelector(f0=0.95, f_max=1.0)
    restored.load_state_dict(selector.state_dict())  # auto survives a checkpoint
    restored.select(losses)
    assert restored.auto and restored.f_max == pytest.approx(0.7, abs=0.02) and restored.t == 3
    restored.select(torch.full((100,), 0.3, dtype=torch.float64))  # no sign of noise: still a cap below 1
    assert restored.clean_share_estimate == 1.0 and restored.f_max == 0.99
    old = S.SPLDSelector(f0=0.3, f_max=0.6)
    old.load_state_dict({"t": 4, "f_max": 0.6, "clean_share_estimate": None})  # before "auto" was stored
    assert old.t == 4 and not old.auto and old.clean_share_estimate is None


def test_small_loss_keeps_exactly_the_r_t_smallest_losses_of_a_batch_and_ramps_as_co_teaching():
    """Co-teaching with one network: a batch updates on its ⌊R(T)·B⌋ smallest losses,
    R(T) = 1 − τ·min(T/T_k, 1)."""
    per_sample = torch.tensor([0.9, 0.1, 0.5, 0.3, 2.0, 0.2, 0.7, 1.1, 0.05, 0.6])
    assert sorted(S.small_loss_keep(per_sample, 0.6).tolist()) == [1, 2, 3, 5, 8, 9]
    assert S.small_loss_keep(per_sample, 0.01).tolist() == [8]  # at least one
    assert [S.small_loss_rate(e, 0.4, 10) for e in (0, 5, 10, 30)] == pytest.approx([1.0, 0.8, 0.6, 0.6])
    net = torch.nn.Linear(3, 2)
    x, y = torch.randn(10, 3), torch.tensor([0, 1] * 5)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)
    losses = S.student_step(net, opt, x, y, 0.0, False, keep_rate=0.5)
    keep = S.small_loss_keep(losses, 0.5)
    net.zero_grad()
    torch.nn.functional.cross_entropy(net(x[keep]), y[keep]).backward()
    expected = net.weight.grad.clone()
    S.student_step(net, opt, x, y, 0.0, False, keep_rate=0.5)
    assert torch.allclose(net.weight.grad, expected)  # the update's gradient: the kept half's mean loss


def test_every_mini_batch_of_a_pass_has_the_configured_size():
    """The last batch of a pass is filled from the pass's own first samples (cuDNN tunes per shape)."""
    idx = torch.arange(10, 23)
    filled = S.fill_batches(idx, 5)
    assert len(filled) == 15 and torch.equal(filled[:13], idx) and filled[13:].tolist() == [10, 11]
    assert S.fill_batches(torch.tensor([4]), 3).tolist() == [4, 4, 4]
    assert torch.equal(S.fill_batches(idx[:10], 5), idx[:10])

def test_spld_pixel_clusters_are_exact_below_the_memory_cap_and_projected_above_it():
    """SPLD's groups: per-class K-Means++ on the normalised pixels themselves while they fit max_bytes;
    above it, on a random projection, still one cluster set per class (ids c*k .. c*k + k − 1)."""
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(120) % 3
    x = (y.view(-1, 1, 1, 1) * 80 + torch.randint(0, 40, (120, 1, 6, 6), generator=gen)).to(torch.uint8)
    data = {"x_train": x, "y_train": y, "mean": torch.full((1, 1, 1, 1), 0.4),
            "std": torch.full((1, 1, 1, 1), 0.3)}
    exact = S.fixed_pixel_clusters(data, 4, 10, seed=1)
    pixels = S.to_input(x, data["mean"], data["std"]).flatten(1)
    assert torch.equal(exact, S.build_cluster_index(pixels, y, 4, 10, torch.Generator().manual_seed(1))[0])
    projected = S.fixed_pixel_clusters(data, 4, 10, seed=1, max_bytes=120 * 4 * 20)  # 20 of 36 dimensions fit
    assert torch.equal(projected // 4, y) and len(projected.unique()) == 12


def loop_inputs(sampler, n=500, **flags):
    cfg = dataclasses.replace(S.Config(), sampler=sampler, batch_size=50, **flags)
    y = torch.arange(n) % 5
    return cfg, S.LoopState(budget=100, epochs=S.Fraction(10)), {"y_train": y, "y_clean": y}


def test_random_pace_trains_on_uniform_subsets_of_the_quantile_pace_size_without_scoring():
    """--sampler random-pace (Wu et al.'s control, ICLR 2021): from the second pass, round(f_t · N) distinct
    samples, f_t = min(f_max, f0 (1+β1)^t), drawn uniformly (each sample's inclusion count over 400 draws is
    binomial: chi-square over the samples); no scoring pass (net=None would fail), t_score 0."""
    cfg, st, data = loop_inputs("random-pace", f0=0.3, f_max=0.8)
    selector = S.SPLDSelector(f0=0.3, f_max=0.8)
    # the first pass: every sample
    assert len(S.choose_samples(cfg, st, selector, None, data, None).idx) == 500
    sizes = []
    for t in range(15):
        st.passes = 1 + t
        chosen = S.choose_samples(cfg, st, selector, None, data, None)
        sizes.append(len(chosen.idx))
        assert chosen.t_score == 0 and len(set(chosen.idx.tolist())) == len(chosen.idx)
    assert sizes == [round(min(0.8, 0.3 * 1.1 ** t) * 500) for t in range(15)] and selector.t == 15
    torch.manual_seed(0)
    st.passes, counts = 1, torch.zeros(500)
    for _ in range(400):
        selector.t = 0
        counts[S.choose_samples(cfg, st, selector, None, data, None).idx] += 1  # t = 0: 150 of 500
    chi2 = ((counts - 400 * 0.3) ** 2 / (400 * 0.3 * 0.7)).sum().item()
    assert 500 - 4 * math.sqrt(1000) < chi2 < 500 + 4 * math.sqrt(1000)  # about chi-square(499): sd 31.6


def cross_entropy(logits, y):
    return torch.nn.functional.cross_entropy(logits, y, reduction="none")


def test_scores_for_eq2_are_float32_whatever_amp_says_where_bf16_logits_would_tie():
    """--amp on: the selection is the one --amp off gives, on a case where bf16 logits tie (logits 8 + 1e-3 x:
    one bf16 value, 40 float32 ones), where selecting on bf16 losses would break the ties by index instead."""
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    with torch.no_grad():
        net[1].weight.zero_()
        net[1].bias.copy_(torch.tensor([8.0, 0.0, 0.0]))
        net[1].weight[0, 0] = 1e-3
    x = torch.arange(40, dtype=torch.uint8).view(40, 1, 1, 1).expand(40, 1, 2, 2) * 6
    data = {"x_train": x, "y_train": torch.ones(40, dtype=torch.long), "mean": torch.zeros(1, 1, 1, 1),
            "std": torch.ones(1, 1, 1, 1)}
    data["y_clean"] = data["y_train"]
    bf16 = cross_entropy(S.forward_all(net, x, data["mean"], data["std"], 16, amp=True), data["y_train"])
    fp32 = cross_entropy(S.forward_all(net, x, data["mean"], data["std"], 16), data["y_train"])
    assert len(bf16.unique()) < 5 and len(fp32.unique()) == 40  # a real tie in bf16
    picks = []
    for amp in ("on", "off"):
        cfg = dataclasses.replace(S.Config(), sampler="spl", amp=amp, score_batch=16, f0=0.5, batch_size=10)
        st = S.LoopState(100, S.Fraction(10), passes=1)
        picks.append(S.choose_samples(cfg, st, S.SPLDSelector(f0=0.5), net, data, None).idx)
    assert torch.equal(picks[0], picks[1])
    assert (torch.equal(picks[0], (fp32 < torch.quantile(fp32, 0.5)).nonzero().flatten())
            and len(picks[0]) == 20)
    one = torch.zeros(40, dtype=torch.long)
    assert not torch.equal(S.spld_select(bf16, one, torch.quantile(bf16, 0.5).item(), 0.0),
                           S.spld_select(fp32, one, torch.quantile(fp32, 0.5).item(), 0.0))


# ---- 9. SPL-ADVisE in your own loop: a Sampler (Alg. 2 steps 3-16) -----------------------------------------
def toy_losses(n: int, n_groups: int, seed: int):
    """Distinct per-sample losses (N,) and cluster ids (N,) from a fixed generator."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g).mul(3), torch.randint(0, n_groups, (n,), generator=g)


def reference_mask(losses, groups, t, f0=0.7, rho0=0.5, beta1=0.1, beta2=0.1, f_max=1.0):
    """Eq. 2 at the pace of Alg. 2 step 16 for SPL iteration t, straight from the building blocks;
    groups=None is plain SPL: one group, ρ0 = 0."""
    if groups is None:
        groups, rho0 = torch.zeros(len(losses), dtype=torch.long), 0.0
    lam, gamma = S.spld_pace(losses, t, "quantile", f0, rho0, beta1, beta2, groups, f_max)
    return S.spld_select(losses, groups, lam, gamma)


@pytest.mark.parametrize("with_groups", [True, False])
def test_sampler_yields_every_sample_then_exactly_the_samples_eq2_keeps_at_t(with_groups):
    """Alg. 2: the first epoch trains on every sample; after select() number t + 1 the sampler yields exactly
    Eq. 2's selection at the step-16 pace of iteration t (SPLD with groups, SPL without), once each."""
    n = 40
    sampler = S.SPLADVisESampler(range(n), seed=3)
    assert sorted(sampler) == list(range(n))
    for t in range(4):
        losses, groups = toy_losses(n, 4, seed=t)
        groups = groups if with_groups else None
        mask = sampler.select(losses, groups)
        want = reference_mask(losses, groups, t)
        assert torch.equal(mask, want) and sampler.selector.t == t + 1
        assert 0 < int(want.sum()) < n or t == 3  # the pace leaves samples out, so the check can fail
        assert t == 0 or not torch.equal(want, reference_mask(losses, groups, t - 1))  # and t matters
        assert sorted(sampler) == want.nonzero().flatten().tolist()


def test_sampler_len_is_the_next_epochs_count_as_soon_as_select_returns():
    """InfoBatch's sampler reported the previous epoch's length, so OneCycleLR(steps_per_epoch=len(loader))
    overran (NUS-HPC-AI-Lab/InfoBatch#27): len(sampler) and len(loader) must count the epoch that follows
    select(), for one or two ranks; fixed_length=True keeps N (⌈N / world⌉ per rank)."""
    n = 41
    losses, groups = toy_losses(n, 3, seed=0)
    for world in (1, 2):
        for fixed in (False, True):
            sampler = S.SPLADVisESampler(range(n), num_replicas=world, rank=world - 1, fixed_length=fixed)
            loader = torch.utils.data.DataLoader(range(n), batch_size=4, sampler=sampler)
            sampler.select(losses, groups)
            kept = int(reference_mask(losses, groups, 0).sum())
            assert len(sampler) == math.ceil((n if fixed else kept) / world) == len(list(sampler))
            assert len(loader) == len(list(loader))
            assert kept < n


def test_sampler_order_comes_from_seed_and_epoch_only_and_leaves_global_rngs_alone():
    """The epoch's order is drawn from a private generator seeded from (seed, epoch): equal seeds and epochs
    give one order, another epoch or seed another, and torch, NumPy and random states are never touched."""
    n = 50
    losses, groups = toy_losses(n, 4, seed=1)
    torch_state, np_state, py_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    orders = {}
    for seed, epoch in [(0, 3), (0, 3), (0, 4), (1, 3), (1, 2)]:
        sampler = S.SPLADVisESampler(range(n), seed=seed)
        sampler.select(losses, groups)
        sampler.set_epoch(epoch)
        orders.setdefault((seed, epoch), []).append(list(sampler))
    assert orders[(0, 3)][0] == orders[(0, 3)][1]
    distinct = {tuple(o[0]) for o in orders.values()}
    assert len(distinct) == 4  # (0, 3), (0, 4), (1, 3), (1, 2) all differ
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), np_state))
    assert random.getstate() == py_state


def test_sampler_resumes_from_state_dict_with_the_same_order_and_the_next_t():
    """state_dict() holds the pace's t, the selection and the epoch: a fresh sampler loaded from it (through
    torch.save / torch.load, as a checkpoint) yields the same sequence, and its next select() paces at the
    next t (Alg. 2 step 16), as the original's does."""
    n = 60
    sampler = S.SPLADVisESampler(range(n), seed=7)
    for t in range(2):
        sampler.select(*toy_losses(n, 5, seed=10 + t))
    sampler.set_epoch(5)
    buffer = io.BytesIO()
    torch.save(sampler.state_dict(), buffer)
    resumed = S.SPLADVisESampler(range(n), seed=7)
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue())))
    assert list(resumed) == list(sampler) and len(resumed) == len(sampler) < n
    losses, groups = toy_losses(n, 5, seed=20)
    mask = resumed.select(losses, groups)
    assert torch.equal(mask, sampler.select(losses, groups)) and resumed.selector.t == 3
    assert torch.equal(mask, reference_mask(losses, groups, 2))
    assert not torch.equal(mask, reference_mask(losses, groups, 0))  # t matters here, so the check can fail


@pytest.mark.parametrize("fixed_length", [False, True])
def test_two_ranks_get_equal_disjoint_shards_of_the_selection_up_to_padding(fixed_length):
    """DistributedSampler's sharding of the selection: both ranks yield the same count, their union is the
    selection, and only the padding to a multiple of the world size repeats an index (fixed_length: the
    selection cycled to N, each index as often as another within one)."""
    n = 41
    losses, groups = toy_losses(n, 3, seed=2)
    shards = []
    for rank in (0, 1):
        sampler = S.SPLADVisESampler(range(n), seed=5, num_replicas=2, rank=rank, fixed_length=fixed_length)
        sampler.select(losses, groups)
        sampler.set_epoch(2)
        shards.append(list(sampler))
    selected = reference_mask(losses, groups, 0).nonzero().flatten().tolist()
    per_rank = math.ceil((n if fixed_length else len(selected)) / 2)
    assert len(selected) % 2 == 1 and len(selected) < n  # odd, so one index must pad
    assert len(shards[0]) == len(shards[1]) == per_rank
    assert set(shards[0]) | set(shards[1]) == set(selected)
    counts = sorted(collections.Counter(shards[0] + shards[1]).values())
    if fixed_length:
        assert counts[-1] - counts[0] <= 1 and sum(counts) == n + 1
    else:
        assert counts == [1] * (len(selected) - 1) + [2]
        assert all(len(set(shard)) == len(shard) for shard in shards)


def test_score_losses_is_float32_cross_entropy_in_dataset_order_in_eval_mode():
    """Alg. 2 steps 5-6: each sample's cross-entropy, in dataset order over ragged batches, with dropout off
    (eval mode) and the model's training mode restored after; an edit of the result in place works."""
    data = toy_dataset(23)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Dropout(0.5), torch.nn.Linear(16, 4))
    losses = S.score_losses(model, data, batch_size=5)
    assert model.training and losses.dtype == torch.float32 and losses.device.type == "cpu"
    model.eval()
    with torch.no_grad():
        want = torch.stack([torch.nn.functional.cross_entropy(model(x[None]), y[None]) for x, y in data])
    torch.testing.assert_close(losses, want, rtol=1e-5, atol=1e-6)
    losses[0] = 0.0


def toy_dataset(n: int):
    """A tiny classification set: x (N, 6), y (N,) in 4 classes, from a fixed generator."""
    g = torch.Generator().manual_seed(123)
    x, y = torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)  # (N, 6), (N,)
    return torch.utils.data.TensorDataset(x, y)


def toy_model():
    """Linear, BatchNorm (buffers DDP broadcasts) and Linear, initialised from a fixed seed."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                               torch.nn.Linear(8, 4))


def ddp_worker(rank: int, world: int, port: int, out_dir: str):
    """One rank of a 2-process gloo run: score one sample (rank 1's shard is empty), then all 37 (batch 6:
    shards of 19 and 18 make 4 and 3 batches), then two DDP epochs with select() at epoch 1. Writes what it
    saw to out_dir/rank{rank}.pt."""
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=40))
    data = toy_dataset(37)
    model = toy_model()
    model.load_state_dict(torch.load(os.path.join(out_dir, "model.pt")))
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    seen = {"one": S.score_losses(ddp, torch.utils.data.Subset(data, [0]))}  # rank 1 scores no sample
    seen["losses0"] = S.score_losses(ddp, data, batch_size=6)
    sampler = S.SPLADVisESampler(data, seed=0)
    seen["world_rank"] = (sampler.world, sampler.rank)
    loader = torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler, drop_last=False)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        if epoch == 1:  # Alg. 2 steps 5-16
            seen["losses1"] = S.score_losses(ddp, data, batch_size=6)
            seen["mask"] = sampler.select(seen["losses1"], data.tensors[1])
        seen[f"idx{epoch}"], seen[f"len{epoch}"] = list(sampler), len(loader)
        steps = 0
        for x, y in loader:
            opt.zero_grad()
            torch.nn.functional.cross_entropy(ddp(x), y).backward()
            opt.step()
            steps += 1
        seen[f"steps{epoch}"] = steps
    seen["params"] = [p.detach().clone() for p in model.parameters()]
    torch.distributed.destroy_process_group()
    torch.save(seen, os.path.join(out_dir, f"rank{rank}.pt"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_score_losses_feeds_a_bf16_model_its_dtype_and_restores_each_modules_mode():
    """A bf16 model gets bf16 inputs (float32 ones would not match its weights); a BatchNorm frozen in eval
    mode inside a training model comes back frozen."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    model.train()
    model[1].eval()  # frozen statistics
    data = torch.utils.data.TensorDataset(torch.randn(10, 3), torch.arange(10) % 2)
    full = S.score_losses(model, data, 4)
    assert model.training and not model[1].training and model[2].training
    half = S.score_losses(model.bfloat16(), data, 4)
    assert half.dtype == torch.float32 and half.shape == (10,) and torch.allclose(half, full, atol=0.1)
    with pytest.raises(RuntimeError):  # a forward that fails (float64 inputs to a bf16 model's Linear)
        S.score_losses(torch.nn.Sequential(model, torch.nn.Linear(3, 2).double()), data, 4)
    assert model.training and not model[1].training  # restored after the failure too


def test_two_gloo_processes_score_select_and_train_alike_without_hanging(tmp_path):
    """Under torch.distributed (gloo, 2 processes): score_losses gives both ranks all N losses of a single
    process (also when a rank's shard is empty), both select the same Eq. 2 mask, shard it disjointly (up
    to padding) and train 2 DDP epochs with equal step counts, ending with equal parameters, within 60 s."""
    data, model = toy_dataset(37), toy_model()
    torch.save(model.state_dict(), tmp_path / "model.pt")
    single = S.score_losses(model, data, batch_size=6)  # (N,) one process
    args = (2, free_port(), str(tmp_path))
    context = torch.multiprocessing.spawn(ddp_worker, args=args, nprocs=2, join=False)
    deadline = time.monotonic() + 60
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the 2-process gloo run did not finish within 60 s")
    seen = [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]
    assert [s["world_rank"] for s in seen] == [(2, 0), (2, 1)]
    for s in seen:  # the shards' batches differ from one process's, so float32 sums may round apart
        torch.testing.assert_close(s["losses0"], single, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(s["one"], single[:1], rtol=1e-6, atol=1e-6)
    assert torch.equal(seen[0]["losses0"], seen[1]["losses0"])
    assert torch.equal(seen[0]["losses1"], seen[1]["losses1"])
    assert torch.equal(seen[0]["mask"], seen[1]["mask"])
    want = S.SPLDSelector().select(seen[0]["losses1"], data.tensors[1])
    assert torch.equal(seen[0]["mask"], want) and 0 < int(want.sum()) < len(data)
    for epoch, selected in [(0, set(range(len(data)))), (1, set(want.nonzero().flatten().tolist()))]:
        shard0, shard1 = seen[0][f"idx{epoch}"], seen[1][f"idx{epoch}"]
        assert len(shard0) == len(shard1) == math.ceil(len(selected) / 2)
        assert set(shard0) | set(shard1) == selected
        assert len(set(shard0) & set(shard1)) == 2 * len(shard0) - len(selected)
        assert seen[0][f"steps{epoch}"] == seen[1][f"steps{epoch}"] == seen[0][f"len{epoch}"]
    for p0, p1 in zip(seen[0]["params"], seen[1]["params"]):
        assert torch.equal(p0, p1)


# ---- 10-12. the training system, end to end on real Fashion-MNIST ----------------------------------------
@needs_fmnist
def test_process_mode_trains_while_the_embedding_child_publishes_new_indexes(tmp_path):
    """Alg. 2 step 2: the child trains in parallel and publishes indexes; the student reads several versions;
    outputs are well formed; accuracy is far above chance (10 %); the child is gone afterwards."""
    out = tmp_path / "run"
    r = cli(TINY + ["--updates", "200", "--refresh", "3"], out)  # the child's start and warm-up take seconds
    assert r.returncode == 0, r.stderr
    metrics = read_metrics(out)
    versions = [m["embed_version"] for m in metrics if m["embed_version"] is not None]
    assert len(set(versions)) >= 2 and max(versions) >= 2, versions
    keys = {"updates", "epoch", "train_loss", "test_acc", "selected_frac", "label_precision", "clusters_used",
            "embed_version", "embed_acc", "wall_s", "t_train", "t_score", "t_select", "t_embed", "t"}
    assert all(keys <= set(m) for m in metrics)
    assert ([m["updates"] for m in metrics] == sorted({m["updates"] for m in metrics})
            and metrics[-1]["updates"] == 200)
    assert metrics[0]["selected_frac"] == 1.0 and min(m["selected_frac"] for m in metrics) < 1.0
    summary = json.load(open(out / "summary.json"))
    assert summary["updates"] == 200 and summary["complete"] and summary["final_acc"] > 0.4
    assert summary["embed_cpu_s"] > 0 and summary["cpu_s"] > 0
    assert json.load(open(out / "config.json"))["sampler"] == "spladvise"
    ckpt = torch.load(out / "ckpt.pt", weights_only=False)
    assert ckpt["state"]["updates"] == 200 and ckpt["index"]["assign"].shape == (600,)
    assert (ckpt["embedding"] is None
            and torch.load(out / "embed_state.pt", weights_only=False)["net"])  # its own file
    # a resume keeps the live child's CPU time
    assert 0 < ckpt["state"]["embed_cpu_s"] <= summary["embed_cpu_s"]
    pid = int(r.stdout.split("[embedding] pid=")[1].split()[0])
    assert (not pid_alive(pid)
            and r.stdout.index("[embedding] pid=") < r.stdout.index("[student] device="))  # first


def warmup_iterations(epochs, n=600, magnet_batch=16):
    return math.ceil(epochs * math.ceil(n / magnet_batch))


@needs_fmnist
def test_the_student_never_waits_and_its_curriculum_starts_on_the_warmed_up_embedding(tmp_path):
    """Alg. 2 step 2 in parallel: a warm-up (3 embedding epochs) that cannot finish within the first pass
    makes no pass wait (t_embed < 1 s: reading the index only); the student trains on every sample until it
    arrives, the curriculum starts at a later pass (t = 0 there), and every curriculum pass selects on an
    index from after the warm-up, judged on the test set."""
    out = tmp_path / "process"
    r = cli(TINY + ["--updates", "200", "--embed-warmup", "3", "--refresh", "10", "--f0", "0.3"], out)
    assert r.returncode == 0, r.stderr
    metrics = read_metrics(out)
    assert all(m["t_embed"] < 1 and m["t_embed_train"] == 0 for m in metrics), [m["t_embed"] for m in metrics]
    start = json.load(open(out / "summary.json"))["curriculum_start"]
    assert start >= 2 and f"curriculum starts at pass {start + 1}" in r.stdout
    handover = re.search(r"warm-up index out \(iteration (\d+)\); the student now uses",  # its cores
                         r.stdout)
    assert handover and int(handover[1]) >= warmup_iterations(3)
    assert all(m["selected_frac"] == 1 and m["t"] is None for m in metrics[:start])
    curriculum = metrics[start:]
    assert [m["t"] for m in curriculum] == list(range(len(curriculum))) and curriculum[0]["selected_frac"] < 1
    assert all(m["embed_iter"] >= warmup_iterations(3) and m["embed_acc"] is not None for m in curriculum)
    assert curriculum[0]["embed_version"] >= 1 + warmup_iterations(3) // 10  # refreshed every R on the way


@needs_fmnist
def test_inline_mode_trains_the_warm_up_itself_as_work_and_selects_from_the_second_pass(tmp_path):
    out = tmp_path / "inline"
    r = cli(TINY + ["--updates", "60", "--embed-warmup", "3", "--refresh", "10", "--embed-mode", "inline"],
            out)
    assert r.returncode == 0, r.stderr
    metrics = read_metrics(out)
    assert metrics[1]["t_embed_train"] > 0 and all(m["t_embed"] == 0 for m in metrics)
    assert metrics[1]["selected_frac"] < 1 and metrics[1]["embed_iter"] == warmup_iterations(3)


@needs_fmnist
def test_a_warm_up_that_never_arrives_leaves_random_sampling_and_says_so(tmp_path):
    """A curriculum whose budget ends before its first selection is random sampling, and the summary says
    why: SPL-ADVisE's warm-up index never came, or SPL's budget was shorter than its first, unselected
    pass. A run cut short (here by --max-minutes) has no such note: its resume may still select."""
    out = tmp_path / "late"
    r = cli(TINY + ["--updates", "20", "--embed-warmup", "1000"], out)
    assert r.returncode == 0, r.stderr
    summary = json.load(open(out / "summary.json"))
    assert (summary["curriculum_start"] is None and "random sampling" in summary["note"]
            and "warm-up index" in summary["note"] and summary["note"] in r.stdout)
    assert "the student now uses" not in r.stdout  # it kept half the cores: the child never throttled
    assert all(m["selected_frac"] == 1 and m["t_score"] == 0 for m in read_metrics(out))
    r = cli(TINY + ["--updates", "5", "--sampler", "spl"], tmp_path / "short")  # 600 / 64: 10 per pass
    note = json.load(open(tmp_path / "short" / "summary.json"))["note"]
    assert r.returncode == 0 and "within the first pass" in note and "random sampling" in note, r.stderr
    r = cli(TINY + ["--updates", "20", "--embed-warmup", "1000", "--max-minutes", "0.001"], tmp_path / "cut")
    summary = json.load(open(tmp_path / "cut" / "summary.json"))
    assert r.returncode == 0 and not summary["complete"] and "note" not in summary, r.stderr


@needs_fmnist
def test_embed_warmup_0_selects_on_the_first_index_it_finds(tmp_path):
    r = cli(TINY + ["--updates", "150", "--embed-warmup", "0"], tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert any(m["selected_frac"] < 1 and m["embed_version"] >= 1 for m in read_metrics(tmp_path / "run"))


@needs_fmnist
@pytest.mark.parametrize("mode", ["process", "inline"])
def test_refresh_minus_1_freezes_the_index_after_the_warmup(tmp_path, mode):
    """--refresh -1 (the authors' schedule): every selection uses the one index published at the end of the
    warm-up; in process mode the child is stopped once the student has it."""
    out = tmp_path / mode
    r = cli(TINY + ["--updates", "150" if mode == "process" else "60", "--embed-warmup", "1",
                    "--refresh", "-1", "--f0", "0.3", "--embed-mode", mode], out)
    assert r.returncode == 0, r.stderr
    metrics = read_metrics(out)
    # every curriculum pass
    used = {(m["embed_version"], m["embed_iter"]) for m in metrics if m["t"] is not None}
    assert used == {(2, warmup_iterations(1))}, used  # version 1 is the untrained net's, 2 the warm-up's
    assert any(m["selected_frac"] < 1 for m in metrics)
    assert mode == "inline" or "the index is frozen" in r.stdout


@needs_fmnist
def test_after_the_curriculum_no_scoring_and_the_child_has_exited_while_the_student_trains(tmp_path):
    """No wasted work: once f_t ≥ 1 (f0 = 0.9, β1 = 0.1: from t = 2), passes do no scoring pass, and the
    embedding child is stopped (its pid gone) before the last selecting pass (t = 1) trains, while the student
    goes on."""
    out = tmp_path / "run"
    proc = start(TINY + ["--updates", "300", "--f0", "0.9", "--embed-warmup", "0.5"], out)
    pid = int(wait_for_line(proc, "[embedding] pid=", 60).split("pid=")[1].split()[0])
    line = wait_for_line(proc, "[embedding] stopped", 120)
    assert "keeps every sample after this pass" in line and not pid_alive(pid)
    last = int(line.split("before pass ")[1].split()[0])
    wait_for_line(proc, f"pass={last + 1} ", 60)  # the student trains on after the child is gone
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130, proc.stderr.read()
    metrics = read_metrics(out)
    assert metrics[last - 1]["t"] == 1 and metrics[last - 1]["t_score"] > 0  # it scored and selected
    assert all(m["t_score"] == 0 and m["selected_frac"] == 1 for m in metrics[last:])
    resumed = cli(TINY + ["--updates", "300", "--f0", "0.9", "--embed-warmup", "0.5", "--resume"], out)
    # not respawned
    assert resumed.returncode == 0 and "[embedding] pid=" not in resumed.stdout, resumed.stdout
    metrics = read_metrics(out)
    selecting = [i for i, m in enumerate(metrics) if m["selected_frac"] < 1]
    assert len(selecting) == 2 and selecting[1] == selecting[0] + 1 and metrics[selecting[0]]["t"] == 0
    assert all(m["t_score"] == 0 and m["selected_frac"] == 1 for m in metrics[selecting[1] + 1:])
    assert len(metrics) > selecting[1] + 3 and metrics[-1]["updates"] == 300
    inline = cli(TINY + ["--updates", "80", "--f0", "0.9", "--embed-warmup", "0.5", "--embed-mode", "inline"],
                 tmp_path / "inline")  # inline mode stops training the embedding at the same point
    assert inline.returncode == 0 and "keeps every sample after this pass" in inline.stdout, inline.stderr
    metrics = read_metrics(tmp_path / "inline")
    done = next(i for i, m in enumerate(metrics) if m["t"] == 2)  # the first pass to keep every sample
    assert metrics[1]["t_embed_train"] > 0.05 and all(m["t_embed_train"] < 0.01 for m in metrics[done:])


def test_next_refresh_follows_r_and_ends_the_warmup_exactly():
    """The refresh schedule shared by the child and inline mode: every R iterations, once at the warm-up's
    end, and with R = -1 only at the warm-up's end."""
    points, it = [], 0
    while (it := S.next_refresh(it, 10, 25)) is not None and it <= 50:
        points.append(it)
    assert points == [10, 20, 25, 30, 40, 50]
    assert S.next_refresh(0, -1, 25) == 25 and S.next_refresh(25, -1, 25) is None
    assert S.next_refresh(0, 10, 0) == 10


def comparable(metrics):
    return [{k: v for k, v in m.items() if k != "wall_s" and not k.startswith("t_")} for m in metrics]


@needs_fmnist
def test_inline_mode_with_one_seed_gives_identical_metrics(tmp_path):
    """Determinism: --embed-mode inline, same seed -> byte-identical metrics.jsonl apart from wall-clock
    fields."""
    runs = [cli(TINY + ["--updates", "30", "--embed-mode", "inline", "--refresh", "3"], tmp_path / f"r{i}")
            for i in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr
    a, b = read_metrics(tmp_path / "r0"), read_metrics(tmp_path / "r1")
    assert comparable(a) == comparable(b) and len(a) >= 3 and len({m["embed_version"] for m in a}) >= 2


@needs_fmnist
def test_amp_embed_puts_only_the_embedding_in_bf16(tmp_path):
    """--amp embed: the embedding's indexes differ from float32's, while the student's first pass (every
    sample, before any index is used) is float32's to the last digit; --amp on changes that pass too."""
    metrics = {}
    for amp in ("off", "embed", "on"):
        r = cli(TINY + ["--updates", "30", "--embed-mode", "inline", "--refresh", "3", "--amp", amp],
                tmp_path / amp)
        assert r.returncode == 0, r.stderr
        metrics[amp] = read_metrics(tmp_path / amp)
    first = {amp: (rows[0]["train_loss"], rows[0]["test_acc"]) for amp, rows in metrics.items()}
    assert first["embed"] == first["off"] != first["on"]
    quality = {amp: [(m["embed_acc"], m["embed_recall1"]) for m in rows if m["embed_acc"] is not None]
               for amp, rows in metrics.items()}
    assert quality["off"] and quality["embed"] and quality["embed"] != quality["off"]

@needs_fmnist
@pytest.mark.parametrize("sampler", ["spld", "spl", "random"])
def test_each_baseline_sampler_runs(tmp_path, sampler):
    """§4 baselines: SPLD's pixel clusters are fixed once (the index never changes), SPL uses one group,
    Random trains on every sample every pass."""
    out = tmp_path / sampler
    r = cli(TINY + ["--updates", "30", "--sampler", sampler], out)
    assert r.returncode == 0, r.stderr
    later = read_metrics(out)[1:]
    assert later and read_metrics(out)[-1]["updates"] == 30
    if sampler == "spld":
        assert {m["embed_version"] for m in read_metrics(out)} == {0}
        cfg = S.resolve_config(S.parse_args(TINY + ["--updates", "30", "--sampler", "spld"]))
        fixed = S.fixed_pixel_clusters(S.prepare_data(cfg, torch.device("cpu")), cfg.k, cfg.kmeans_iters,
                                       cfg.seed)
        assert torch.equal(torch.load(out / "ckpt.pt", weights_only=False)["index"]["assign"], fixed)
        assert all(m["clusters_used"] > 1 for m in later)
    if sampler == "spl":
        assert all(m["clusters_used"] == 1 for m in later)
    if sampler == "random":
        assert all(m["selected_frac"] == 1.0 and m["t_score"] == 0 for m in read_metrics(out))


@needs_fmnist
def test_infobatch_trains_random_s_epochs_in_fewer_updates(tmp_path):
    """--sampler infobatch: the epochs random trains for (8), the first and the last (δ = 0.875) passes on
    every sample, the ones between pruned; fewer updates, the LR milestone (0.7) at 70 % of the epochs."""
    out = tmp_path / "infobatch"
    r = cli(TINY + ["--epochs", "8", "--sampler", "infobatch", "--milestones", "0.7"], out)
    assert r.returncode == 0, r.stderr
    metrics, summary = read_metrics(out), json.load(open(out / "summary.json"))
    assert [m["epoch"] for m in metrics] == list(range(1, 9))
    assert metrics[0]["selected_frac"] == 1 and metrics[-1]["selected_frac"] == 1
    assert all(0.5 < m["selected_frac"] < 1 for m in metrics[1:-1])
    assert summary["complete"] and summary["updates"] < summary["budget"] == 8 * 10
    assert [m["lr"] for m in metrics] == pytest.approx([0.05] * 5 + [0.005] * 3)


@needs_fmnist
def test_max_minutes_stops_cleanly_and_resume_finishes_the_same_budget(tmp_path):
    """--max-minutes ends with a checkpoint and summary; a resume under the same --max-minutes gets it afresh
    and trains on; --resume continues to the same number of updates as an uninterrupted run."""
    out = tmp_path / "run"
    args = TINY + ["--updates", "300", "--sampler", "random"]  # about 15 s of updates on 2 cores
    first = cli(args + ["--max-minutes", "0.05"], out)
    assert first.returncode == 0, first.stderr
    stopped = json.load(open(out / "summary.json"))
    assert not stopped["complete"] and 0 < stopped["updates"] < 300 and stopped["wall_s"] < 3 + 3
    assert (f"ended at update {stopped['updates']} of 300; continue it with the same flags and --resume"
            in first.stdout)
    # the budget is this invocation's: a resume under the same --max-minutes trains on, stops, and says so
    again = cli(args + ["--max-minutes", "0.05", "--resume"], out)
    assert again.returncode == 0, again.stderr
    assert stopped["updates"] < json.load(open(out / "summary.json"))["updates"] < 300
    assert "continue it with the same flags and --resume" in again.stdout
    resumed = cli(args + ["--resume"], out)
    assert resumed.returncode == 0, resumed.stderr
    assert json.load(open(out / "summary.json"))["updates"] == 300
    updates = [m["updates"] for m in read_metrics(out)]
    assert updates == sorted(set(updates)) and updates[-1] == 300


@needs_fmnist
def test_a_budget_shorter_than_the_start_up_still_trains_and_checkpoints_the_first_pass(tmp_path):
    """--max-minutes never stops the first pass: a process-mode SPL-ADVisE run whose budget (0.6 s) is shorter
    than its start-up leaves a checkpoint of one whole pass, says to resume, and --resume finishes the same
    budget."""
    out = tmp_path / "run"
    first = cli(TINY + ["--updates", "60", "--max-minutes", "0.01"], out)
    assert first.returncode == 0, first.stderr
    stopped = json.load(open(out / "summary.json"))
    # 600 / 64: 10 updates
    assert not stopped["complete"] and stopped["updates"] == 10 and stopped["checkpoint"]
    assert "continue it with the same flags and --resume" in first.stdout
    resumed = cli(TINY + ["--updates", "60", "--resume"], out)
    assert resumed.returncode == 0, resumed.stderr
    assert json.load(open(out / "summary.json"))["updates"] == 60


@needs_fmnist
def test_the_noisy_validation_split_is_held_out_and_early_stopping_reports_the_test_accuracy_at_its_best(
        tmp_path):
    """--val-size: a class-balanced split of noisy labels, the same for every seed and sampler, held out of
    training; the test set is still evaluated; summary's early_stopped_acc is the test accuracy at the best
    validation pass."""
    args = TINY + ["--updates", "40", "--label-noise", "0.4", "--val-size", "100", "--sampler", "random"]
    cfg = S.resolve_config(S.parse_args(args))
    data = S.prepare_data(cfg, torch.device("cpu"))
    other = S.prepare_data(dataclasses.replace(cfg, seed=3, sampler="spl"), torch.device("cpu"))
    assert torch.equal(data["x_val"], other["x_val"]) and torch.equal(data["y_val"], other["y_val"])
    train_images = {bytes(x.numpy()) for x in data["x_train"]}
    assert not any(bytes(x.numpy()) in train_images for x in data["x_val"]) and len(data["y_test"]) == 300
    r = cli(args, tmp_path / "run")
    assert r.returncode == 0, r.stderr
    metrics, summary = read_metrics(tmp_path / "run"), json.load(open(tmp_path / "run" / "summary.json"))
    best = max(range(len(metrics)), key=lambda i: (metrics[i]["val_acc"], -i))  # the first best
    assert (summary["early_stopped_acc"] == metrics[best]["test_acc"]
            and summary["final_acc"] == metrics[-1]["test_acc"])


@needs_fmnist
def test_f_max_auto_estimates_the_clean_share_of_a_noisy_real_run(tmp_path):
    """--f-max auto at 40 % symmetric noise: the clean share, re-estimated from the losses at every selecting
    pass, is logged every pass and caps that pass; the summary holds the last one, within 0.1 of the truth."""
    args = TINY + ["--train-size", "1000", "--updates", "45", "--label-noise", "0.4", "--sampler", "spl",
                   "--f-max", "auto"]
    r = cli(args, tmp_path / "run")
    assert r.returncode == 0, r.stderr
    data = S.prepare_data(S.resolve_config(S.parse_args(args)), torch.device("cpu"))
    truth = (data["y_train"] == data["y_clean"]).double().mean().item()
    estimate = json.load(open(tmp_path / "run" / "summary.json"))["clean_share_estimate"]
    assert abs(estimate - truth) < 0.1, (estimate, truth)
    selecting = [m for m in read_metrics(tmp_path / "run") if m["t"] is not None]
    assert len(selecting) > 1 and selecting[-1]["clean_share_estimate"] == estimate
    assert all(m["selected_frac"] <= m["clean_share_estimate"] + 1e-3 for m in selecting)


@needs_fmnist
def test_every_run_prints_the_command_that_repeats_it(tmp_path):
    """The [command] line names every value the presets filled in, so running it elsewhere repeats the run."""
    r = cli(TINY + ["--updates", "10", "--sampler", "random"], tmp_path / "a")
    command = next(line for line in r.stdout.splitlines()
                   if line.startswith("[command] "))[len("[command] "):]
    argv = command.split()[2:]
    assert (command.startswith("python spladvise.py ") and "--preset cpu" in command
            and "--embed-net lenet-16" in command)
    again = S.resolve_config(S.parse_args(argv[:argv.index("--out")] + argv[argv.index("--out") + 2:]))
    first = json.load(open(tmp_path / "a" / "config.json"))
    assert ({k: v for k, v in dataclasses.asdict(again).items() if k != "out"}
            == {k: v for k, v in first.items() if k != "out"})

def test_the_command_line_quotes_what_a_shell_would_split_and_old_checkpoints_are_refused(tmp_path):
    """[command] survives a shell: an --out with a space comes back whole. A checkpoint from before the pace
    had its own state is refused as bad input naming the fix, not with a traceback."""
    cfg = S.resolve_config(S.parse_args(["--gpu", "-1", "--out", str(tmp_path / "a b"), "--updates", "3"]))
    assert S.parse_args(shlex.split(S.command_line(cfg))[2:]).out == str(tmp_path / "a b")
    run = tmp_path / "old"
    run.mkdir()
    torch.save({"config": dataclasses.asdict(cfg), "state": {}}, run / "ckpt.pt")
    with pytest.raises(S.ConfigError, match="older version.*another --out"):
        S.prepare_run_dir(dataclasses.replace(cfg, out=str(run), resume=True))


@needs_fmnist
def test_runs_writes_mean_and_std_of_the_per_seed_summaries(tmp_path):
    """--runs 2: OUT/seed-S per seed and aggregate.json with mean and sample std computed from their files."""
    out = tmp_path / "multi"
    r = cli(TINY + ["--updates", "20", "--sampler", "random", "--runs", "2", "--seed", "5"], out)
    assert r.returncode == 0, r.stderr
    agg = json.load(open(out / "aggregate.json"))
    finals = [json.load(open(out / f"seed-{s}" / "summary.json"))["final_acc"] for s in (5, 6)]
    assert agg["final_acc"]["mean"] == pytest.approx(np.mean(finals))
    assert agg["final_acc"]["std"] == pytest.approx(np.std(finals, ddof=1)) and agg["final_acc"]["n"] == 2
    last = [read_metrics(out / f"seed-{s}")[-1]["test_acc"] for s in (5, 6)]
    assert (agg["curve"]["updates"][-1] == 20
            and agg["curve"]["test_acc_mean"][-1] == pytest.approx(np.mean(last)))


def plots_or_exit_2(argv, out, capsys, monkeypatch):
    """--plot: both figures where matplotlib imports; else exit 2 with the pip line (the missing case is also
    forced, so both branches are checked wherever the suite runs)."""
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
        code, err = run_main(argv + ["--out", str(out)], capsys)
        assert code == 2 and "pip install matplotlib" in err and len(err.strip().splitlines()) == 1, err
        assert not os.path.exists(out / "metrics.jsonl")  # refused before training started
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert run_main(argv + ["--out", str(out)], capsys)[0] == 0
    for name in ("curves.png", "embedding.png"):
        assert (out / name).stat().st_size > 10_000, name
        (out / name).unlink()
    assert run_main(["--plot", "--gpu", "-1", "--out", str(out)], capsys)[0] == 0  # redraw a finished folder
    assert all((out / name).stat().st_size > 10_000 for name in ("curves.png", "embedding.png"))


@needs_fmnist
def test_plot_draws_the_accuracy_curves_and_the_embedding_of_a_runs_folder(tmp_path, capsys, monkeypatch):
    """--plot with --runs 2: curves.png from aggregate.json, embedding.png from the first seed's snapshots
    (one per judged index, 50 test images of each class); --plot --out DIR redraws them without training."""
    out = tmp_path / "runs"
    plots_or_exit_2(TINY + ["--updates", "40", "--runs", "2", "--plot", "--embed-mode", "inline"], out,
                    capsys, monkeypatch)
    snapshots = sorted((out / "seed-0" / "embeddings").glob("v*.pt"))
    assert len(snapshots) >= 2
    first = torch.load(snapshots[0], weights_only=False)
    assert (first["emb"].shape == (300, 8)
            and torch.equal(torch.bincount(first["labels"]), torch.full((10,), 30)))


@needs_fmnist
def test_plot_after_runs_cut_short_draws_nothing_and_says_so(tmp_path):
    """--runs stopped by --max-minutes before its aggregate exists: --plot has nothing finished to draw, says
    so, and the run still ends as a clean stop (exit 0, no traceback)."""
    out = tmp_path / "runs"
    r = cli(TINY + ["--updates", "60", "--runs", "2", "--sampler", "random", "--max-minutes", "0.001",
                    "--plot"], out)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert f"[plot] nothing has finished in {out} to draw yet" in r.stdout
    assert not (out / "aggregate.json").exists() and not (out / "curves.png").exists()


def test_bench_table_and_curves_show_what_each_row_cost_and_selected(tmp_path, capsys):
    """Benchmark rendering on made-up runs: accuracy mean ± std over seeds, updates to reach random's final,
    the update where the curriculum started, the label precision of its curriculum passes, seconds per 1,000
    updates against random with the per-phase split and the embedding's CPU share; the curves stop where
    InfoBatch's runs stopped (nothing measured after); --plot draws them from bench.json."""
    def run(updates_per_pass, acc, wall_per_update, start=None, precision=1.0):
        u = np.cumsum(updates_per_pass)
        return [{"updates": int(x), "test_acc": acc * x / u[-1], "wall_s": wall_per_update * x,
                 "t_train": 0.5, "t_score": 0.25 if start is not None and i >= start else 0.0,
                 "t_select": 0.0, "t_embed": 0.0,
                 "t": None if start is None or i < start else i - start, "label_precision": precision if start
                 is not None and i >= start else 0.6, "selected_frac": 1.0, "embed_acc": None}
                for i, x in enumerate(u)]
    metrics = {"random": [run([10] * 8, 0.8, 1.0), run([10] * 8, 0.9, 1.0)],
               "spl": [run([10] * 8, 0.9, 2.0, start=2, precision=0.9), run([10] * 8, 0.9, 2.0, 3, 0.8)],
               "infobatch": [run([10, 6, 6, 6, 6, 6, 6, 10], 0.8, 1.0),
                             run([10, 7, 7, 7, 7, 7, 7, 10], 0.8, 1.0)]}
    for row, runs in metrics.items():
        for seed, m in enumerate(runs):
            folder = tmp_path / row / f"seed-{seed}"
            folder.mkdir(parents=True)
            (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in m))
            start = next((i for i, r in enumerate(m) if r["t"] == 0), None)
            (folder / "summary.json").write_text(json.dumps({
                "final_acc": m[-1]["test_acc"], "best_acc": m[-1]["test_acc"], "updates": m[-1]["updates"],
                "wall_s": m[-1]["wall_s"], "budget": 80, "curriculum_start": start, "cpu_s": 40.0,
                "embed_cpu_s": 10.0 if start else 0.0}))
    results = {row: S.aggregate_runs([str(tmp_path / row / f"seed-{s}") for s in (0, 1)]) for row in metrics}
    table = S.bench_table(results).splitlines()
    assert table[2] == ("| random | 0.8500 ± 0.0707 | 0.8500 ± 0.0707 | — | 80 (1/2) | 80 | — | 0.600 | — | "
                        "1000.0 (1.00) | 50.0 | 0.0 | 0.0 | 0.0 | 0.00 | — | — |"), table[2]
    # spl: random's 0.85 at 80 updates (0.9 · 76/80 ≥ 0.85 first at 80), curriculum from updates 20 and 30,
    # its passes' precision 0.9 and 0.8, twice random's wall time, scoring 0.25 s on 6 and 5 of 8 passes,
    # CPU share 10 / 40
    assert table[3] == ("| spl | 0.9000 ± 0.0000 | 0.9000 ± 0.0000 | — | 80 (2/2) | 160 | 25 | 0.850 | — | "
                        "2000.0 (2.00) | 50.0 | 17.2 | 0.0 | 0.0 | 0.25 | — | — |"), table[3]
    assert table[4].startswith("| infobatch |") and "| 1000.0 (1.00) |" in table[4]
    curve = results["infobatch"]["curve"]
    measured = [u for u, a in zip(curve["updates"], curve["test_acc_mean"]) if not math.isnan(a)]
    assert measured[-1] == 56 and curve["updates"][-1] == 80  # after 56 (the shorter seed's end): nothing
    (tmp_path / "bench.json").write_text(json.dumps({"results": {
        row: {k: v for k, v in r.items() if k != "metrics"} for row, r in results.items()}}))
    curves = S.accuracy_curves(str(tmp_path))
    assert curves["infobatch"][0][-1] == measured[-1] and curves["random"][0][-1] == 80
    assert (curves["random"][1][-1] == pytest.approx(0.85)
            and curves["random"][2][-1] == pytest.approx(0.0707, 1e-3))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert run_main(["--plot", "--gpu", "-1", "--out", str(tmp_path)], capsys)[0] == 0
    assert (tmp_path / "curves.png").stat().st_size > 10_000 and not (tmp_path / "embedding.png").exists()


def test_bench_regimes_are_data_and_every_spl_row_paces_as_the_authors_code():
    """The benchmark's rows are flags on Config: the clean, noisy and short regimes share the six rows
    (random, random-pace, spl, spld, spladvise, infobatch); the noisy one adds 40 % symmetric noise and the
    rows capped at f_max = 1 − 0.4; the short one a quarter of the budget; the memorising ones turn
    augmentation off, hold out a 10 % noisy validation split and cap at 1 − ε, 1 − 1.25ε and auto; no row
    changes the pacing, which stays at the authors' f0 = 0.7, β = 0.1."""
    common = {"random", "random-pace", "spl", "spld", "spladvise", "infobatch"}
    assert all(common <= set(S.BENCH_REGIMES[r][2]) for r in ("clean", "noisy", "short"))
    factor, change, rows = S.BENCH_REGIMES["noisy"]
    assert change == {"label_noise": 0.4} and {r["f_max"] for r in rows.values() if "f_max" in r} == {0.6}
    assert S.BENCH_REGIMES["short"][0] == 0.25 and S.BENCH_REGIMES["clean"][0] == 1
    factor, change, rows = S.BENCH_REGIMES["memorise"]
    assert (factor is None and change["augment"] == "none" and change["val_size"] == 500
            and change["updates"] > 400)
    assert {r.get("f_max") for r in rows.values()} == {None, 0.6, 0.5, "auto"} and "small-loss" in rows
    assert all(rows[r].get("runs", 5) == 5 for r in ("random", "spladvise-fmax0.6", "spladvise-fmax0.5"))
    change = S.BENCH_REGIMES["memorise-pairflip"][1]
    assert change["noise_kind"] == "pairflip" and change["label_noise"] == 0.45
    for _, change, rows in S.BENCH_REGIMES.values():
        for flags in [change, *rows.values()]:
            cfg = dataclasses.replace(S.Config(), **{k: v for k, v in flags.items() if k != "runs"})
            assert (cfg.f0, cfg.beta1, cfg.beta2, cfg.rho0) == (0.7, 0.1, 0.1, 0.5)
    ceiling = S.BENCH_REGIMES["memorise"][2]["random-clean-labels"]
    assert ceiling["label_noise"] == 0.0 and S.BENCH_REGIMES["memorise"][1]["label_noise"] == 0.4


@needs_fmnist
def test_bench_stopped_mid_run_resumes_that_run_and_reuses_every_finished_one(tmp_path, monkeypatch, capsys):
    """A benchmark cut short (here after the first pass of its first run) and started again resumes that run
    from its checkpoint, trains the rest seed by seed across the rows (a row's own seed count, capped by
    --runs), and a third start trains nothing: every finished run is reused."""
    monkeypatch.setattr(S, "BENCH_REGIMES", {"clean": (1, {}, {"random": dict(sampler="random", runs=3),
                                                                "spl": dict(sampler="spl", runs=1)})})
    cfg = S.resolve_config(S.parse_args(TINY + ["--updates", "20", "--bench", "--runs", "2", "--out",
                                                str(tmp_path)]))
    first = tmp_path / "clean" / "random" / "seed-0"
    S.run_bench(cfg, stop_requested=lambda: (first / "ckpt.pt").exists())
    assert (not json.load(open(first / "summary.json"))["complete"]
            and not (tmp_path / "clean" / "spl").exists())
    calls, train = [], S.train
    monkeypatch.setattr(S, "train", lambda run, stop, deadline: calls.append(
        (run.run_dir, run.resume, deadline)) or train(run, stop, deadline))
    deadline = time.time() + 600  # --max-minutes 10: one deadline for the whole invocation, not one per run
    results = S.run_bench(cfg, deadline=deadline)
    # seed by seed
    assert calls == [(str(first), True, deadline),
                     *((str(tmp_path / "clean" / row / f"seed-{s}"), False, deadline)
                       for s, row in ((0, "spl"), (1, "random")))]
    assert read_metrics(first)[-1]["updates"] == 20
    assert [results["clean"][row]["final_acc"]["n"] for row in ("random", "spl")] == [2, 1]
    table = (tmp_path / "bench.md").read_text()
    calls.clear()
    assert S.run_bench(cfg)["clean"]["random"]["final_acc"] == results["clean"]["random"]["final_acc"]
    assert calls == [] and (tmp_path / "bench.md").read_text() == table
    capsys.readouterr()


@needs_fmnist
def test_paper_preset_with_amp_runs_on_the_cpu_in_process_mode_and_resumes(tmp_path):
    """The GPU command's code path, on the CPU: --preset paper (ResNet-18 student, LeNet embedding, flips and
    rotations), the embedding child, bf16 autocast (--amp on) everywhere it applies; stopped by SIGINT after
    its first pass and resumed to the same budget from a checkpoint loaded to the CPU."""
    out = tmp_path / "paper"
    args = ["--dataset", "fashionmnist", "--preset", "paper", "--gpu", "-1", "--data-dir", FMNIST,
            "--no-download", "--train-size", "300", "--test-size", "100", "--batch-size", "32",
            "--score-batch", "128", "--k", "3",
            "--m", "4", "--d", "4", "--embed-warmup", "0.5", "--updates", "24", "--amp", "on", "--f0", "0.5"]
    first = start(args, out)
    wait_for_line(first, "[embedding] pid=", 60)
    wait_for_line(first, "pass=1", 120)
    first.send_signal(signal.SIGINT)
    assert first.wait(60) == 130, first.stderr.read()
    config = json.load(open(out / "config.json"))
    assert (config["student"], config["embed_net"], config["amp"], config["embed_mode"]) == \
        ("resnet18", "lenet", "on", "process")
    assert 0 < torch.load(out / "ckpt.pt", weights_only=False)["state"]["updates"] < 24
    resumed = cli(args + ["--resume"], out)
    assert resumed.returncode == 0, resumed.stderr
    summary, metrics = json.load(open(out / "summary.json")), read_metrics(out)
    assert summary["complete"] and summary["updates"] == 24 and [m["updates"] for m in metrics][-1] == 24
    assert all(math.isfinite(m["train_loss"]) for m in metrics)


@needs_fmnist
def test_compile_trains_a_tiny_run(tmp_path):
    r = cli(TINY + ["--updates", "10", "--sampler", "spl", "--compile"], tmp_path / "run", timeout=600)
    assert r.returncode == 0, r.stderr
    assert json.load(open(tmp_path / "run" / "summary.json"))["complete"]


def test_the_scoring_pass_for_eq2_runs_with_tf32_off_and_restores_it():
    """TF32 (cuDNN's default for convolutions on Ampere and later; matrix products where a user set
    float32_matmul_precision "high" or "medium", which also puts oneDNN's CPU matmul in bf16) is off while
    Eq. 2's losses are computed, and every setting is as it was afterwards, still readable through torch's
    legacy API."""
    seen, forward = [], S.forward_all
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    data = {"x_train": torch.zeros(6, 1, 2, 2, dtype=torch.uint8),
            "y_train": torch.zeros(6, dtype=torch.long), "mean": torch.zeros(1, 1, 1, 1),
            "std": torch.ones(1, 1, 1, 1)}
    b = torch.backends
    backends = (b, b.cuda.matmul, b.cudnn, b.cudnn.conv, b.cudnn.rnn, b.mkldnn, b.mkldnn.matmul,
                b.mkldnn.conv, b.mkldnn.rnn)  # every fp32_precision setting, restored at the end
    initial, legacy = [x.fp32_precision for x in backends], torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")  # a user's setting, by the legacy API
        torch.backends.cudnn.allow_tf32 = True
        before = [x.fp32_precision for x in backends]
        S.forward_all = lambda *args, **kw: (seen.append((b.cudnn.conv.fp32_precision,
                                                          b.cuda.matmul.fp32_precision,
                                                          b.mkldnn.matmul.fp32_precision))
                                             or forward(*args, **kw))
        assert S.training_losses(net, data, 4).shape == (6,)
        after = [x.fp32_precision for x in backends]
        assert torch.get_float32_matmul_precision() == "medium" and torch.backends.cudnn.allow_tf32
    finally:
        S.forward_all = forward
        torch.set_float32_matmul_precision(legacy)
        for x, value in zip(backends, initial):
            x.fp32_precision = value
    assert seen == [("ieee", "ieee", "ieee")] and after == before
    assert torch.get_float32_matmul_precision() == legacy  # nothing leaks into later tests


def test_a_cpu_child_for_a_cuda_student_checks_the_shared_memory_it_needs(monkeypatch):
    """--embed-gpu -1 with a CUDA student puts the training set in /dev/shm (Docker's default: 64 MB): too
    little space is refused before training, naming the space, the need and --embed-mode inline."""
    cfg = dataclasses.replace(S.Config(), gpu="cuda:0", embed_gpu="cpu", batch_size=4, k=2, m=2)
    data = {"x_train": torch.zeros(100, 1, 28, 28, dtype=torch.uint8), "y_train": torch.arange(100) % 10}
    monkeypatch.setattr(S.shutil, "disk_usage", lambda path: collections.namedtuple("u", "total used free")(
        2 ** 20, 2 ** 20 - 1000, 1000))
    with pytest.raises(S.ConfigError, match=r"/dev/shm.*--embed-mode inline"):
        S.check_against_data(cfg, data)
    S.check_against_data(dataclasses.replace(cfg, embed_mode="inline"), data)  # inline needs no shared memory


def test_a_child_dead_before_publishing_names_the_allocator_setting_that_breaks_cuda_ipc(monkeypatch):
    """With PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True CUDA IPC fails in many containers: the death
    message names that setting instead of exclusive-process mode, and always names --embed-mode inline."""
    stub = type("Stub", (), {})()  # what death_cause reads of an EmbeddingProcess: no message, exit code 1
    stub.errors = queue.Queue()
    stub.proc = type("P", (), {"exitcode": 1})()
    stub.shared = {"status": torch.zeros(len(S.STATUS), dtype=torch.float64)}
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    cause = S.EmbeddingProcess.death_cause(stub)
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in cause and "--embed-mode inline" in cause
    assert "exclusive-process" not in cause
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    assert "exclusive-process" in S.EmbeddingProcess.death_cause(stub)


@needs_fmnist
def test_a_refresh_stops_between_its_chunks_once_asked_and_publishes_nothing(tmp_path):
    """The child checks its stop flag inside a refresh (after embedding and clustering the training set, after
    the test embedding): a stopped refresh returns no index, so nothing is published or saved after a stop."""
    cfg = S.resolve_config(S.parse_args(TINY + ["--updates", "5", "--out", str(tmp_path)]))
    data = S.prepare_data(cfg, torch.device("cpu"))
    trainer = S.EmbeddingTrainer(cfg, data)
    calls = []
    assert trainer.refresh(judge=True, keep_going=lambda: calls.append(1) or False) is None and calls == [1]
    assert trainer.version == 0 and list(trainer.schedule(keep_going=lambda: False)) == []
    index = trainer.refresh(judge=True)
    assert index["version"] == 1 and index["assign"].shape == (600,) and index["embed_acc"] is not None


@needs_fmnist
@pytest.mark.parametrize("loss", ["magnet", "triplet_global"])
def test_a_restored_embedding_trainer_rebuilds_its_saved_index_and_continues_as_if_never_stopped(tmp_path,
                                                                                                 loss):
    """Resume: a trainer restored from state_dict() first rebuilds the index it saved (same version, same
    clusters, Smart Mining's margin not stepped twice), then yields the same next index and weights as the
    trainer that never stopped; until that rebuild it saves the state it was restored from."""
    cfg = S.resolve_config(S.parse_args(TINY + ["--updates", "5", "--refresh", "3", "--embed-warmup", "0",
                                                "--embed-loss", loss, "--out", str(tmp_path)]))
    data = S.prepare_data(cfg, torch.device("cpu"))
    original = S.EmbeddingTrainer(cfg, data)
    steps = original.schedule()
    saved = [next(steps) for _ in range(2)][-1]  # version 2, after 3 iterations
    state = copy.deepcopy(original.state_dict())
    restored = S.EmbeddingTrainer(cfg, data, state)
    assert restored.state_dict() is state  # saved again before its rebuild: the same state, not version − 1
    again = restored.schedule()
    rebuilt = next(again)
    assert (rebuilt["version"], rebuilt["iteration"]) == (saved["version"], saved["iteration"]) == (2, 3)
    assert torch.equal(rebuilt["assign"], saved["assign"]) and restored.margin == original.margin
    a, b = next(steps), next(again)
    assert (a["version"], a["iteration"]) == (b["version"], b["iteration"]) == (3, 6)
    assert torch.equal(a["assign"], b["assign"]) and restored.margin == original.margin
    assert all(torch.equal(p, q) for p, q in zip(original.net.parameters(), restored.net.parameters()))


@needs_fmnist
def test_embed_on_selection_fits_the_clusters_on_and_draws_batches_from_the_students_samples(tmp_path):
    """--embed-on selection: after the student tells the embedding its samples (share_selection(), the same in
    process mode), the next refresh fits each class's centroids on them and its Magnet batches draw only them;
    without it, every sample."""
    cfg = S.resolve_config(S.parse_args(TINY + ["--updates", "5", "--embed-mode", "inline", "--embed-on",
                                                "selection", "--out", str(tmp_path)]))
    data = S.prepare_data(cfg, torch.device("cpu"))
    inline = S.InlineEmbedding(cfg, data, None)
    mask = torch.arange(600) % 3 > 0  # two thirds of every class
    inline.share_selection(mask)
    mask[:] = False  # share_selection() keeps its own copy
    index = inline.trainer.refresh(judge=False)
    kept = torch.arange(600) % 3 > 0
    drawn = torch.cat([inline.trainer.sampler.sample(cfg.m, cfg.d, torch.Generator().manual_seed(s))[0]
                       for s in range(30)])
    assert kept[drawn].all() and index["assign"].shape == (600,)
    resumed = S.InlineEmbedding(cfg, data, None, selected=kept)  # --resume: before its first refresh
    first = torch.cat([resumed.trainer.sampler.sample(cfg.m, cfg.d, torch.Generator().manual_seed(s))[0]
                       for s in range(30)])
    assert kept[first].all()
    all_on = S.InlineEmbedding(dataclasses.replace(cfg, embed_on="all"), data, None)
    all_on.share_selection(kept)
    all_on.trainer.refresh(judge=False)
    drawn = torch.cat([all_on.trainer.sampler.sample(cfg.m, cfg.d, torch.Generator().manual_seed(s))[0]
                       for s in range(30)])
    assert not kept[drawn].all()


@needs_fmnist
def test_embed_on_selection_runs_in_process_mode_and_checkpoints_the_selection_it_shares(tmp_path):
    """The child reads the student's mask through the shared tensor: a refresh after the first selection fits
    on exactly a selecting pass's samples, not on all 600; the checkpoint keeps the last selecting pass's mask
    for --resume, which finishes the budget."""
    args = TINY + ["--sampler", "spladvise", "--embed-on", "selection", "--f-max", "0.6", "--updates", "600"]
    proc = start(args, tmp_path / "run")
    line = wait_for_line(proc, "samples (--embed-on selection)", 120)
    while "fitted on 600 of 600" in line:  # until the student's first selection the mask holds every sample
        line = wait_for_line(proc, "samples (--embed-on selection)", 120)
    fitted = int(line.split("fitted on ")[1].split()[0])
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130, proc.stderr.read()
    ckpt = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=False)
    selecting = [m for m in read_metrics(tmp_path / "run") if m["t"] is not None]
    assert fitted in {round(600 * m["selected_frac"]) for m in selecting} and fitted < 600
    assert ckpt["state"]["selected"].shape == (600,) and ckpt["state"]["updates"] < 600
    assert ckpt["state"]["selected"].double().mean().item() == pytest.approx(selecting[-1]["selected_frac"])
    r = cli(args + ["--resume"], tmp_path / "run")
    assert r.returncode == 0, r.stderr
    assert read_metrics(tmp_path / "run")[-1]["updates"] == 600


# ---- reliability: every failure ends cleanly, loses nothing, says what happened --------------------------
@needs_fmnist
def test_embedding_child_that_raises_stops_the_run_with_its_message(tmp_path):
    """A non-finite Magnet Loss (huge embedding lr) raises inside the child: the student notices, keeps a
    loadable checkpoint, prints the child's exception and exits non-zero within 60 s."""
    out = tmp_path / "run"
    t0 = time.time()
    r = cli(TINY + ["--updates", "2000", "--embed-lr", "1e30"], out, timeout=120)
    assert time.time() - t0 < 60 and r.returncode == 1, r.stderr
    assert "non-finite loss in the embedding network" in r.stderr and "Traceback" in r.stderr  # the child's
    assert "last good checkpoint" in r.stderr.splitlines()[-1]
    assert torch.load(out / "ckpt.pt", weights_only=False)["state"]["updates"] > 0


@needs_fmnist
def test_sigkilled_embedding_child_is_noticed_within_seconds(tmp_path):
    """The student checks the child's liveness every 0.5 s: a SIGKILLed child ends the run (exit 1) naming the
    signal, with a loadable checkpoint."""
    out = tmp_path / "run"
    proc = start(TINY + ["--updates", "5000"], out)
    pid = int(wait_for_line(proc, "[embedding] pid=", 60).split("pid=")[1].split()[0])
    wait_for_line(proc, "pass=2", 60)
    os.kill(pid, signal.SIGKILL)
    t0 = time.time()
    assert proc.wait(60) == 1
    assert time.time() - t0 < 15
    assert "SIGKILL" in proc.stderr.read()
    assert torch.load(out / "ckpt.pt", weights_only=False)["state"]["updates"] > 0


@needs_fmnist
def test_a_child_that_dies_before_publishing_names_exclusive_process_mode_and_inline(tmp_path):
    """A child that dies before its first index (as one does that cannot open its CUDA tensors on a GPU in
    exclusive-process mode) ends the run with exit 1 and a message naming that cause and --embed-mode
    inline."""
    proc = start(TINY + ["--updates", "5000"], tmp_path / "run")
    pid = int(wait_for_line(proc, "[embedding] pid=", 60).split("pid=")[1].split()[0])
    os.kill(pid, signal.SIGKILL)  # the student loads its data before it sends it: nothing is published yet
    assert proc.wait(60) == 1
    err = proc.stderr.read()
    assert "SIGKILL" in err and "exclusive-process" in err and "--embed-mode inline" in err, err


@needs_fmnist
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sigint_and_sigterm_stop_both_processes_and_resume_continues(tmp_path, sig, code):
    """Ctrl-C / SIGTERM to the main process: both processes exit within 10 s, exit code 128 + signal, the
    checkpoint holds the last pass, and --resume finishes the budget."""
    out = tmp_path / "run"
    args = TINY + ["--updates", "60"]
    proc = start(args, out)
    pid = int(wait_for_line(proc, "[embedding] pid=", 60).split("pid=")[1].split()[0])
    wait_for_line(proc, "pass=2", 60)
    proc.send_signal(sig)
    t0 = time.time()
    assert proc.wait(10) == code
    while pid_alive(pid) and time.time() - t0 < 10:
        time.sleep(0.1)
    assert not pid_alive(pid) and time.time() - t0 < 10
    state = torch.load(out / "ckpt.pt", weights_only=False)["state"]
    assert 0 < state["updates"] < 60
    resumed = cli(args + ["--resume"], out)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.load(open(out / "summary.json"))
    assert summary["updates"] == 60 and summary["embed_cpu_s"] > state["embed_cpu_s"]


@needs_fmnist
def test_sigkill_of_main_at_any_moment_then_resume_loses_and_duplicates_nothing(tmp_path):
    """Atomic checkpoints: SIGKILL during a checkpoint write (a slowed os.replace widens the window) and
    right after a metrics line; each time ckpt.pt stays a complete one, and the resumed run reaches the same
    total with no duplicate or torn metrics line."""
    out = tmp_path / "run"
    args = TINY + ["--updates", "40", "--embed-mode", "inline"]
    proc = start(args, out, slow_checkpoint=1.0)
    wait_for_line(proc, "pass=2", 60)  # printed after its metrics line, before its checkpoint is renamed
    deadline = time.time() + 5
    while not any(".tmp" in f for f in os.listdir(out)) and time.time() < deadline:
        time.sleep(0.02)
    assert any(".tmp" in f for f in os.listdir(out))  # the kill lands inside the checkpoint write
    proc.kill()
    proc.wait()
    assert torch.load(out / "ckpt.pt", weights_only=False)["state"]["passes"] == 1
    for moment in (0.0, 1.5):  # resume, then kill again: inside the next write, then after it, mid-pass
        proc = start(args + ["--resume"], out, slow_checkpoint=1.0)
        wait_for_line(proc, "pass=", 60)
        time.sleep(moment)
        proc.kill()
        proc.wait()
        torch.load(out / "ckpt.pt", weights_only=False)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"updates": 99, "torn')  # a line cut by a kill mid-write
    final = cli(args + ["--resume"], out)
    assert final.returncode == 0, final.stderr
    updates = [m["updates"] for m in read_metrics(out)]
    assert updates == sorted(set(updates)) and updates[-1] == 40


@needs_fmnist
def test_orphaned_child_exits_when_the_main_process_is_sigkilled(tmp_path):
    """The child polls its parent: after a SIGKILL of the main process it exits on its own within seconds."""
    proc = start(TINY + ["--updates", "5000"], tmp_path / "run")
    pid = int(wait_for_line(proc, "[embedding] pid=", 60).split("pid=")[1].split()[0])
    wait_for_line(proc, "pass=1", 60)
    proc.kill()
    proc.wait()
    t0 = time.time()
    while pid_alive(pid) and time.time() - t0 < 15:
        time.sleep(0.1)
    assert not pid_alive(pid), "the embedding child outlived its parent"


@needs_fmnist
def test_non_finite_student_loss_stops_at_that_update_and_keeps_the_good_checkpoint(tmp_path):
    """A learning rate made huge mid-run (a milestone with decay 1e9) makes the student diverge: exit 1, the
    message names the student network, the update and the last good checkpoint (under --runs, the failing
    seed's), which nothing overwrote."""
    out = tmp_path / "run"
    r = cli(TINY + ["--updates", "60", "--embed-mode", "inline", "--sampler", "random", "--milestones", "0.5",
                    "--lr-decay", "1e9", "--runs", "2"], out)
    assert r.returncode == 1, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert ("student network at update" in line and "last good checkpoint" in line
            and "Traceback" not in r.stderr)
    bad_update = int(line.split("at update ")[1].split(";")[0])
    good = torch.load(out / "seed-0" / "ckpt.pt", weights_only=False)["state"]["updates"]
    assert 30 <= bad_update and good < bad_update and f"{out / 'seed-0' / 'ckpt.pt'} (update {good})" in line
    assert all(m["updates"] < bad_update for m in read_metrics(out / "seed-0"))


def run_main(argv, capsys):
    code = S.main(argv)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("extra,needle", [
    (["--dataset", "imagenet"], "'imagenet'"),
    (["--student", "resnet50"], "'resnet50'"),
    (["--embed-net", "alexnet"], "'alexnet'"),
    (["--sampler", "greedy"], "'greedy'"),
    (["--prune-ratio", "1"], "--prune-ratio must be in [0, 1)"),
    (["--label-noise", "1"], "--label-noise must be in [0, 1)"),
    (["--f-max", "0"], "--f-max must be in (0, 1]"),
    (["--embed-share", "1.5"], "--embed-share must be in (0, 1]"),
    (["--noise-kind", "asym"], "'asym'"),
    (["--amp", "fp16"], "'fp16'"),
    (["--embed-net", "lenet-0"], "'lenet-0'"),
    (["--anneal", "1.5"], "--anneal must be in [0, 1]"),
    (["--batch-size", "0"], "--batch-size must be positive"),
    (["--lr", "-0.1"], "--lr must be positive"),
    (["--train-size", "-5"], "--train-size must be >= 0"),
    (["--gpu", "3"], "--gpu 3: no such CUDA device"),
    (["--k", "100"], "--k 100 is larger than the smallest class"),
    (["--m", "40"], "--m 40 exceeds"),
    (["--batch-size", "1000"], "--batch-size 1000 is larger than the training set"),
    (["--train-size", "70000"], "--train-size 70000 is larger"),
    (["--resume"], "no checkpoint"),
    (["--embed-on", "selection", "--sampler", "spl"], "needs --sampler spladvise --embed-loss magnet"),
    (["--embed-on", "clean"], "'clean'"),
])
def test_bad_input_exits_2_with_one_line_naming_the_value(tmp_path, capsys, extra, needle):
    """Bad input: exit code 2 and one 'error:' line that names the bad value and the fix; no traceback."""
    code, err = run_main(TINY + ["--updates", "5"] + extra + ["--out", str(tmp_path / "out")], capsys)
    if not os.path.exists(f"{FMNIST}/train-images-idx3-ubyte.gz") and any(
            flag in extra for flag in ("--k", "--m", "--batch-size", "--train-size")):
        pytest.skip("checking this flag against the data needs the real Fashion-MNIST files")
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


@needs_fmnist
def test_resume_or_reuse_of_another_runs_folder_is_refused_naming_what_differs(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run_main(TINY + ["--updates", "5", "--embed-mode", "inline", "--out", out], capsys)[0] == 0
    code, err = run_main(TINY + ["--updates", "5", "--embed-mode", "inline", "--student", "vgg16", "--resume",
                                 "--out", out], capsys)
    assert code == 2 and "student: 'lenet' there, 'vgg16' here" in err
    code, err = run_main(TINY + ["--updates", "5", "--dataset", "mnist", "--out", out], capsys)
    assert code == 2 and "dataset: 'fashionmnist' there, 'mnist' here" in err and "another --out" in err
    code, err = run_main(TINY + ["--updates", "5", "--embed-mode", "inline", "--out", out], capsys)
    assert code == 2 and "--resume" in err


def test_corrupt_data_file_exits_2_naming_the_file(tmp_path, capsys):
    write_tiny_idx_set(tmp_path / "d")
    (tmp_path / "d" / "t10k-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    code, err = run_main(["--gpu", "-1", "--data-dir", str(tmp_path / "d"), "--no-download", "--updates", "5",
                          "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "t10k-images-idx3-ubyte.gz" in err and "Traceback" not in err
    # spawned first, then stopped
    assert not [p for p in S.mp.active_children() if p.name == "spladvise-embedding"]


# ---- using the method in your own code -------------------------------------------------------------------
def copy_out(name):
    """Execute the source of block `name`, and of every function or class of spladvise.py it names
    (transitively), in a fresh namespace holding only torch, nn, F, math and numpy: what a reader who copies
    it out gets."""
    namespace = {"torch": torch, "nn": torch.nn, "F": torch.nn.functional, "math": math, "np": np,
                 "contextlib": __import__("contextlib")}
    blocks, todo = [], [name]
    while todo:
        block = todo.pop()
        if block in blocks:
            continue
        blocks.append(block)
        names = {n.id for n in ast.walk(ast.parse(inspect.getsource(getattr(S, block))))
                 if isinstance(n, ast.Name)}
        todo += [n for n in names if (inspect.isfunction(getattr(S, n, None))
                                      or inspect.isclass(getattr(S, n, None)))
                 and getattr(S, n).__module__ == S.__name__]
    for block in blocks:
        exec(inspect.getsource(getattr(S, block)), namespace)
    return namespace


def net_output(make_net, name):
    torch.manual_seed(0)
    return make_net(name, 1, 5, 28).eval()(torch.ones(2, 1, 28, 28)).detach()  # (2, 5)


def tiny_index():
    emb = torch.randn(60, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    return emb, torch.arange(60) % 3


COPY_CHECKS = {  # block -> a call on a tiny input; the copy must give what the module gives
    "magnet_loss": lambda f: f(*magnet_batch(3, 4, 5, 2, seed=1))[0],
    "kmeans_pp": lambda f: f(tiny_index()[0], 4, generator=torch.Generator().manual_seed(0))[1],
    "build_cluster_index": lambda f: f(*tiny_index(), 3, generator=torch.Generator().manual_seed(0))[0],
    "NeighbourhoodSampler": lambda f: f(*S.build_cluster_index(*tiny_index(), 3, generator=torch.Generator()
                                                               .manual_seed(0))).sample(
        3, 2, torch.Generator().manual_seed(1))[0],
    "spld_select": lambda f: f(tiny_index()[0][:, 0], tiny_index()[1], 0.1, 0.5),
    "spld_pace": lambda f: torch.as_tensor(f(tiny_index()[0][:, 0], 2, "rank", 0.3, 0.5, 0.1, 0.1,
                                             groups=tiny_index()[1])[0]),
    "osm_caa_loss": lambda f: f(*pairs_batch(0)).detach(),
    "triplet_global_loss": lambda f: f(*magnet_batch(3, 3, 4, 3, seed=2)[0].detach().view(3, 3, 4)),
    "mine_triplets": lambda f: torch.stack(f(*tiny_index(), torch.arange(0, 60, 7), 3, chunk=16)),
    "dml_crc_loss": lambda f: f(tiny_index()[0][:12], tiny_index()[1][:12]),
    "class_balanced_batch": lambda f: f([torch.arange(5), torch.arange(5, 7)], 2, 3,
                                        torch.Generator().manual_seed(0)),
    "recall_at_1": lambda f: torch.tensor(f(*tiny_index(), chunk=16)),
    "nmi": lambda f: torch.tensor(f(tiny_index()[1].flip(0), tiny_index()[1])),
    "fixed_pixel_clusters": lambda f: f({"x_train": (torch.arange(60 * 16) % 251).to(torch.uint8)
                                                    .view(60, 1, 4, 4),
                                         "y_train": torch.arange(60) % 3, "mean": torch.zeros(1, 1, 1, 1),
                                         "std": torch.ones(1, 1, 1, 1)}, 2, 5, 0, max_bytes=60 * 4 * 8),
    "noisy_labels": lambda f: f(torch.arange(30) % 3, 0.5, "symmetric", 3, torch.Generator().manual_seed(0)),
    "infobatch_select": lambda f: f(tiny_index()[0][:, 0], 0.5, 0.3,
                                    generator=torch.Generator().manual_seed(0))[0],
    "pace_keeps_all": lambda f: torch.tensor(f(9, "rank", 0.3, 0.2, torch.tensor([5, 9, 4]))),
    "magnet_predict": lambda f: f(tiny_index()[0], tiny_index()[0][:6], torch.arange(6) % 3, 1.0, 3),
    "SPLDSelector": lambda f: f(f0=0.3, f_max=0.6).select(tiny_index()[0][:, 0], tiny_index()[1]),
    "SPLADVisESampler": lambda f: torch.tensor(list(f(range(60), seed=1))),
    "clean_share_estimate": lambda f: torch.tensor(f(tiny_index()[0][:, 0].abs())),
    "small_loss_keep": lambda f: f(tiny_index()[0][:, 0], 0.4),
    "make_net": lambda f: torch.cat([net_output(f, name) for name in ("lenet", "lenet-8", "vgg16", "resnet18",
                                                                       "wrn-10-1")]),
}


@pytest.mark.parametrize("name", sorted(COPY_CHECKS))
def test_every_building_block_runs_when_copied_out_alone(name):
    """A block pasted into a file that imports only torch (and the blocks it calls) still runs and
    gives the module's result; a block that needs a global of spladvise.py fails here."""
    namespace = copy_out(name)
    assert set(namespace) - {"torch", "nn", "F", "math", "np", "contextlib", "__builtins__"} <= {
        n for n in vars(S) if inspect.isfunction(getattr(S, n)) or inspect.isclass(getattr(S, n))}
    assert torch.equal(COPY_CHECKS[name](namespace[name]), COPY_CHECKS[name](getattr(S, name)))


def readme_block(marker):
    text = open(os.path.join(HERE, "README.md")).read()
    return re.search(rf"<!-- {marker} -->\s*```python\n(.*?)```\s*<!-- /{marker} -->", text, re.S).group(1)


def three_blobs(n=600, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    centres = torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, -4.0]])
    return torch.utils.data.TensorDataset(centres[labels] + torch.randn(n, 2, generator=g) * 1.5, labels)


def sgd_step(model):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def step(x, y):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return step


def test_readme_recipe_trains_a_model_on_a_selection_it_makes_each_epoch(monkeypatch):
    """README "In your own training loop", run as written (its training step filled in) on a tiny synthetic
    set, so the recipe cannot rot: at most 10 lines; every sample the first epoch, Eq. 2's growing selections
    after, every sample once f_t ≥ 1, and the model learns."""
    recipe = readme_block("recipe")
    assert len(recipe.strip().splitlines()) <= 11  # its import torch, then the contract's 10 lines
    train_set = three_blobs()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    lengths = []
    namespace = {"model": model, "train_set": train_set, "epochs": 7, "groups": train_set.tensors[1],
                 "train_step": sgd_step(model)}
    namespace["lengths"] = lengths
    exec(recipe.replace("...  # your training step", "train_step(x, y)\n        lengths.append(len(y))"),
         namespace)
    sampler = namespace["sampler"]
    assert sampler.selector.t == 6 and len(sampler) == 600
    x, y = train_set.tensors
    assert (model(x).argmax(1) == y).float().mean() > 0.9


def test_readme_adaptive_recipe_refreshes_the_clusters_it_selects_on(monkeypatch):
    """README "Adaptive clusters": the embedding trained inline between epochs with the Magnet Loss,
    re-clustered before each select(), and those clusters are Eq. 2's groups; t counts from the first
    select()."""
    train_set = three_blobs(240)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    embed_net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    sampler = S.SPLADVisESampler(train_set, seed=0)
    groups_seen, select = [], sampler.select
    monkeypatch.setattr(sampler, "select", lambda losses, groups: [groups_seen.append(groups.clone()),
                                                                   select(losses, groups)][1])
    namespace = {"torch": torch, "model": model, "train_set": train_set, "epochs": 3, "sampler": sampler,
                 "loader": torch.utils.data.DataLoader(train_set, batch_size=32, sampler=sampler),
                 "embed_net": embed_net, "embed_opt": torch.optim.Adam(embed_net.parameters(), 1e-2),
                 "labels": train_set.tensors[1], "score_losses": S.score_losses}
    before = [p.clone() for p in embed_net.parameters()]
    exec(readme_block("adaptive").replace("...  # your training step", "pass"), namespace)
    assert len(groups_seen) == 2 and sampler.selector.t == 2 and not torch.equal(*groups_seen)  # refreshed
    assert all(torch.equal(g // 8, train_set.tensors[1]) for g in groups_seen)  # 8 clusters within each class
    assert any(not torch.equal(a, b) for a, b in zip(before, embed_net.parameters()))  # the embedding trained


def test_readme_torchrun_example_runs_on_two_ranks_and_both_select_the_same(tmp_path):
    """README "With torchrun", run by torchrun on 2 CPU processes (gloo) with its training step filled in: it
    ends without a hang and every rank holds the same selection and the same model."""
    preamble = (f"import sys, os, torch\nsys.path.insert(0, {HERE!r})\ntorch.set_num_threads(1)\n"
                f"torch.manual_seed(0)\n{inspect.getsource(three_blobs)}\ntrain_set = three_blobs(200)\n"
                "model = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))\n"
                "groups, epochs = train_set.tensors[1], 3\n"
                "opt = torch.optim.SGD(model.parameters(), lr=0.1)\n")
    step = ("opt.zero_grad()\n        torch.nn.functional.cross_entropy(ddp(x), y).backward()\n"
            "        opt.step()")
    ending = (f"torch.save({{'idx': sampler.idx_selected, 'w': model[0].weight.detach(), "
              f"'t': sampler.selector.t}}, "
              f"os.path.join({str(tmp_path)!r}, f'rank{{os.environ[\"RANK\"]}}.pt'))\n")
    body = readme_block("torchrun").replace("...  # your training step, through ddp", step)
    body = body.replace("dist.destroy_process_group()", ending + "dist.destroy_process_group()")
    (tmp_path / "train.py").write_text(preamble + body)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        "--master-port", str(free_port()), str(tmp_path / "train.py")],
                       capture_output=True, text=True, timeout=180,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{i}.pt") for i in (0, 1)]
    assert torch.equal(ranks[0]["idx"], ranks[1]["idx"]) and ranks[0]["t"] == ranks[1]["t"] == 2
    assert torch.equal(ranks[0]["w"], ranks[1]["w"])  # DDP kept them in step


# ---- CUDA (skipped without a GPU) ------------------------------------------------------------------------
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_cuda_kmeans_magnet_and_spld_match_the_cpu():
    """The building blocks run on the tensor's device and agree with the CPU (float64, same generator
    seed)."""
    x, _ = blobs(torch.randn(5, 3, generator=torch.Generator().manual_seed(0)) * 4, 20, 1.0, 0)
    c_cpu, a_cpu = S.kmeans_pp(x, 5, generator=torch.Generator().manual_seed(2))
    c_gpu, a_gpu = S.kmeans_pp(x.cuda(), 5, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a_gpu.cpu(), a_cpu) and torch.allclose(c_gpu.cpu(), c_cpu)
    r, classes, clusters = magnet_batch(4, 4, 3, 2, seed=0)
    for ids in (clusters.cuda(), clusters):  # cluster ids on the device, or kept on the CPU
        assert math.isclose(S.magnet_loss(r.cuda(), classes.cuda(), ids)[0].item(),
                            S.magnet_loss(r, classes, clusters)[0].item(), rel_tol=1e-9)
    losses, groups = torch.rand(1000, dtype=torch.float64), torch.randint(0, 7, (1000,))
    assert torch.equal(S.spld_select(losses.cuda(), groups.cuda(), 0.4, 0.3).cpu(),
                       S.spld_select(losses, groups, 0.4, 0.3))


@needs_cuda
@needs_fmnist
def test_cuda_run_resumes_on_the_cpu_and_a_cpu_run_on_the_gpu(tmp_path):
    """Checkpoints load to the CPU first: a run stopped on the GPU finishes on the CPU, and one stopped on the
    CPU finishes on the GPU (with --amp auto there)."""
    for first, second in (("0", "-1"), ("-1", "0")):
        out = tmp_path / f"from{first}"
        args = TINY + ["--updates", "60", "--preset", "cpu"]
        gpu = lambda g: [a if a != "-1" else g for a in args]
        assert cli(gpu(first) + ["--max-minutes", "0.05"], out).returncode == 0
        r = cli(gpu(second) + ["--resume"], out)
        assert r.returncode == 0, r.stderr
        assert json.load(open(out / "summary.json"))["updates"] == 60


@needs_cuda
@needs_fmnist
def test_cuda_process_mode_shares_the_index_through_cuda_ipc(tmp_path):
    """On a GPU the child trains on CUDA and publishes CUDA tensors the student reads: the run goes on until a
    second index version has been read (a fast student cannot outrun the check), then stops on SIGINT."""
    out = tmp_path / "run"
    proc = start([a if a != "-1" else "0" for a in TINY] + ["--updates", "1000000", "--refresh", "3",
                                                             "--preset", "cpu"], out)
    deadline = time.time() + 180
    for line in proc.stdout:
        if re.search(r"embed_version=([2-9]|\d\d+)\b", line) or time.time() > deadline:
            break
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130, proc.stderr.read()
    versions = {m["embed_version"] for m in read_metrics(out) if m["embed_version"] is not None}
    assert len(versions) >= 2 and "cpu" not in json.load(open(out / "summary.json"))["device"]
