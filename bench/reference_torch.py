"""PyTorch on *this* machine: the training steps of ``train_throughput.py``'s reference workloads,
written in PyTorch from the paper (eq. 8–11, Appendix C) and docs/method.md, to compare both
frameworks in one run.

Why: the reference figures of the authors' PyTorch code were measured on another processor
kind (its header: Sapphire Rapids; a float32 matmul ceiling of ~400 GFLOP/s), while this machine
may differ (``lscpu``; ``train_throughput.py`` measures the ceiling in the same run). This script
runs the same work the authors' code does per optimizer step -- the same networks, batch
semantics (b clean images × m noise copies, docs/method.md), the adversary with T separate
input-gradient passes in inference mode with the weights frozen, then the clean and the mixed pass
in training mode and one SGD (momentum 0.9, coupled weight decay 1e-4) step -- in plain eager
PyTorch (``torch.set_num_threads`` = the core count), as the authors' code runs. It is an
independent implementation, not the authors' code: its losses follow docs/method.md, its speed is
what PyTorch gives for that work. Random data: speed does not depend on it.

Needs ``torch`` (not a dependency of the project): ``pip install torch`` in any environment, then

    python bench/reference_torch.py gaussian smoothmix-s1.00 --repeats 3
    .venv/bin/python bench/train_throughput.py --torch-python /path/to/that/python   # both, interleaved
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import add_step_timing_arguments, median, timed_repeats  # noqa: E402

# name: (architecture, clean images per step, noise samples m (None: Gaussian), sigma, attack steps T,
#        step size alpha) -- the presets train_throughput.py runs (smoothmix_tf/recipes/*.toml)
WORKLOADS = {
    "gaussian": ("lenet", 256, None, 0.5, 0, 0.0),
    "smoothmix-s0.25": ("lenet", 64, 4, 0.25, 2, 1.0),
    "smoothmix-s0.50": ("lenet", 64, 4, 0.5, 4, 1.0),
    "smoothmix-s1.00": ("lenet", 64, 4, 1.0, 8, 1.0),
    "smoothmix-resnet110": ("resnet110", 128, 2, 0.5, 4, 1.0),
}
ETA = 5.0
CLASSES = 10


def build(architecture: str):
    import torch
    from torch import nn

    if architecture == "lenet":  # paper Appendix C
        return nn.Sequential(
            nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.ReLU(),
            nn.MaxPool2d(2), nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, CLASSES))

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int):
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
            self.shortcut = (nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

        def forward(self, x):
            return torch.relu(self.body(x) + self.shortcut(x))

    class Normalize(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("mean", torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor([0.2023, 0.1994, 0.2010]).view(1, 3, 1, 1))

        def forward(self, x):
            return (x - self.mean) / self.std

    layers, cin = [Normalize(), nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                   nn.ReLU()], 16
    for stage, width in enumerate((16, 32, 64)):  # CIFAR ResNet-110: 18 blocks per stage
        for block in range(18):
            layers.append(Block(cin, width, 2 if stage and not block else 1))
            cin = width
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, CLASSES)]
    return nn.Sequential(*layers)


def smoothed_nll(network, x, y, noise):
    """J of eq. 8: −log of the noise-averaged softmax of the true class, summed over the batch."""
    import torch

    m, b = noise.shape[:2]
    probs = torch.softmax(network((x.unsqueeze(0) + noise).flatten(0, 1)), 1).view(m, b, -1)
    return -torch.log(probs.mean(0).gather(1, y[:, None]).clamp_min(1e-20)).sum()


def attack(network, x, y, noise, steps: int, step_size: float):
    """Paper eq. 8: T normalized ascent steps, clipped to [0, 1], weights frozen."""
    import torch

    network.eval()
    for p in network.parameters():
        p.requires_grad_(False)
    adversarial = x.detach()
    for _ in range(steps):
        adversarial.requires_grad_(True)
        grad, = torch.autograd.grad(smoothed_nll(network, adversarial, y, noise), adversarial)
        norm = grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        adversarial = (adversarial + step_size * grad / (norm + 1e-8)).clamp(0, 1).detach()
    for p in network.parameters():
        p.requires_grad_(True)
    network.train()
    return adversarial


def smoothmix_loss(network, x, y, noise, lam, steps: int, step_size: float):
    """Paper eq. 8–11 (Algorithm 1) for the draws (noise [m, b, ...], lam [b]); no one-step adversary,
    warm-up factor 1."""
    import torch
    import torch.nn.functional as F

    m, b = noise.shape[:2]
    x_adv = attack(network, x, y, noise, steps, step_size)
    logits = network((x.unsqueeze(0) + noise).flatten(0, 1))
    loss_nat = F.cross_entropy(logits, y.repeat(m))
    smoothed = torch.softmax(logits, 1).view(m, b, -1).mean(0)  # F̂(x), not detached
    x_mix = (1 - lam.view(-1, 1, 1, 1)) * x + lam.view(-1, 1, 1, 1) * x_adv
    y_mix = (1 - lam.view(-1, 1)) * smoothed + lam.view(-1, 1) / CLASSES
    log_mix = F.log_softmax(network((x_mix.unsqueeze(0) + noise).flatten(0, 1)), 1)
    kl = F.kl_div(log_mix, y_mix.repeat(m, 1), reduction="none").sum(1)
    mask = (smoothed.argmax(1) == y).float().repeat(m)
    return loss_nat + ETA * (mask * kl).mean()


def smoothmix_step(network, optimizer, x, y, m: int, sigma: float, steps: int, step_size: float):
    """Step 1 (m noise draws and λ ~ U[0, ½) per image), the loss, one SGD step."""
    import torch

    noise = sigma * torch.randn(m, *x.shape)
    lam = torch.rand(x.shape[0]) / 2
    loss = smoothmix_loss(network, x, y, noise, lam, steps, step_size)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def gaussian_step(network, optimizer, x, y, sigma: float):
    import torch
    import torch.nn.functional as F

    loss = F.cross_entropy(network(x + sigma * torch.randn_like(x)), y)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def measure(name: str, steps: int, repeats: int, max_foreign: float, wait: float) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    architecture, batch, m, sigma, attack_steps, step_size = WORKLOADS[name]
    network = build(architecture)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    shape = (1, 28, 28) if architecture == "lenet" else (3, 32, 32)
    data = [(torch.rand(batch, *shape), torch.randint(0, CLASSES, (batch,)))
            for _ in range(steps)]

    def step(x, y):
        if m is None:
            return gaussian_step(network, optimizer, x, y, sigma)
        return smoothmix_step(network, optimizer, x, y, m, sigma, attack_steps, step_size)

    step(*data[0])  # warm-up

    def run():
        for x, y in data:
            step(x, y)

    times, foreign = timed_repeats(run, repeats, max_foreign, wait)
    return {"workload": name, "images_per_s": batch * steps / median(times),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "repeats": times,
            "max_foreign_cores": foreign}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workloads", nargs="+", choices=list(WORKLOADS))
    add_step_timing_arguments(p)
    p.add_argument("--json", action="store_true", help="print one JSON line per workload")
    args = p.parse_args(argv)
    try:
        import torch  # noqa: F401
    except ImportError:
        p.error("needs PyTorch, which is not a dependency of smoothmix-tf: `pip install torch` "
                "into a separate environment and run this script with its python")
    for name in args.workloads:
        steps = args.resnet_steps if "resnet" in name else args.steps
        row = measure(name, steps, args.repeats, args.max_foreign, args.wait)
        print(json.dumps(row) if args.json else
              f"{name}: {row['images_per_s']:.1f} clean images/s (torch {row['torch']}, "
              f"{row['threads']} threads)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
