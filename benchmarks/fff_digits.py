"""Fast feedforward vs dense layers of equal training width and of equal evaluated width (scikit-learn digits).

The FFF paper's small setting, offline: ``sklearn.datasets.load_digits`` (1797 8x8 images, 10 classes),
standardised, split 60/20/20 (train / calibration / test) by seed. For each tree depth ``D`` in
``--depths`` and each seed:

- **FFF**: one ``calibrate.fff.FFF(64, 10, D)`` from pixels to logits, trained as the FFF paper's soft tree
  with a hardening term (weight growing linearly to ``--hardening``), evaluated by hard descent;
- **dense, training width**: ``64 -> 2**(D+1) - 1 -> 10`` (GELU), the same number of neurons;
- **dense, evaluated width**: ``64 -> D+1 -> 10``, as many neurons as one FFF path evaluates.

Test accuracy, mean +- standard deviation over seeds. Then, for the deepest FFF of seed 0, the certified
evaluation depth (``calibrate.fff.fit``: label disagreement with the full depth on the calibration part,
delta, epsilon) and its held-out disagreement and accuracy on the test part.

Run: ``python benchmarks/fff_digits.py [--depths 2 3 4 5 6 7 8] [--seeds 5] [--epochs 150]``.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from timing import positive_int
from torch import nn

from calibrate import fff


def data(seed: int):
    x, y = load_digits(return_X_y=True)
    x_train, x_rest, y_train, y_rest = train_test_split(x, y, test_size=0.4, random_state=seed, stratify=y)
    x_cal, x_test, y_cal, y_test = train_test_split(x_rest, y_rest, test_size=0.5, random_state=seed, stratify=y_rest)
    scaler = StandardScaler().fit(x_train)
    as_tensor = lambda a: torch.tensor(scaler.transform(a), dtype=torch.float32)  # noqa: E731
    return (
        (as_tensor(x_train), torch.tensor(y_train)),
        (as_tensor(x_cal), torch.tensor(y_cal)),
        (as_tensor(x_test), torch.tensor(y_test)),
    )


def train(model: nn.Module, x, y, *, epochs: int, seed: int, hardening: float = 0.0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for epoch in range(epochs):
        weight = hardening * epoch / max(1, epochs - 1)
        for batch in torch.randperm(len(x), generator=generator).split(64):
            if isinstance(model, fff.FFF):
                logits, hard = model.soft_forward(x[batch])
                loss = F.cross_entropy(logits, y[batch]) + weight * hard
            else:
                loss = F.cross_entropy(model(x[batch]), y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x, y) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def dense(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, width), nn.GELU(), nn.Linear(width, 10))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", type=positive_int, nargs="+", default=[2, 3, 4, 5, 6, 7, 8])
    parser.add_argument("--seeds", type=positive_int, default=5)
    parser.add_argument("--epochs", type=positive_int, default=150)
    parser.add_argument("--hardening", type=float, default=3.0)
    parser.add_argument("--delta", type=float, default=0.05)
    parser.add_argument("--epsilon", type=float, default=0.1)
    parser.add_argument("--threads", type=positive_int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"digits, {args.seeds} seeds, {args.epochs} epochs; test accuracy mean +- std")
    print("| depth | FFF (hard descent) | dense, training width | dense, evaluated width |")
    print("| --- | --- | --- | --- |")
    deepest = None
    for depth in args.depths:
        scores = {"fff": [], "wide": [], "narrow": []}
        for seed in range(args.seeds):
            (x, y), _, (x_test, y_test) = data(seed)
            torch.manual_seed(seed)
            models = {
                "fff": fff.FFF(64, 10, depth),
                "wide": dense(2 ** (depth + 1) - 1),
                "narrow": dense(depth + 1),
            }
            for name, model in models.items():
                hardening = args.hardening if name == "fff" else 0.0
                trained = train(model, x, y, epochs=args.epochs, seed=seed, hardening=hardening)
                scores[name].append(accuracy(trained, x_test, y_test))
                if name == "fff" and seed == 0 and depth == max(args.depths):
                    deepest = trained
        cells = " | ".join(f"{np.mean(s):.3f} +- {np.std(s):.3f}" for s in scores.values())
        print(f"| {depth} ({depth + 1} of {2 ** (depth + 1) - 1} neurons) | {cells} |")

    _, (x_cal, _), (x_test, y_test) = data(0)
    cert = fff.fit(deepest, x_cal, delta=args.delta, epsilon=args.epsilon)
    print("\n" + cert.summary())
    report = fff.audit(cert, deepest, x_test)
    print(report.summary())
    depth = None if cert.lambda_hat is None else int(cert.lambda_hat)
    with fff.at_depth(deepest, depth):
        certified = accuracy(deepest, x_test, y_test)
    print(
        f"  test accuracy: {certified:.3f} at the certified depth, "
        f"{accuracy(deepest, x_test, y_test):.3f} at full depth"
    )


if __name__ == "__main__":
    main()
