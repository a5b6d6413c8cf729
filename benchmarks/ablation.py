"""Ablation in the spirit of the seed paper's Table 2: baseline / +augmentation / +STA / both.

Long-tailed synthetic data (SMG-like class imbalance), the same causal detector, the same seed and
the same short training budget for every variant; model selection and post-processing tuning on
validation, numbers on the test split (whole-sequence causal forward). Prints overall SMG F1,
strict F1, mAP and per-class F1, and writes JSON.

    .venv/bin/python benchmarks/ablation.py --iterations 120 --channels 64

Short budgets on 2 shared cores make single runs noisy; compare with --seeds 2+ when time allows.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VARIANTS = {
    "baseline": {"sta": False, "aug": False},
    "+aug": {"sta": False, "aug": True},
    "+STA": {"sta": True, "aug": False},
    "+aug +STA": {"sta": True, "aug": True},
    # Not in the paper's table: STA with an identity path, y = x * (1 + A).
    "+STA-residual": {"sta": True, "aug": False, "residual": True},
}
PAPER_VARIANTS = ("baseline", "+aug", "+STA", "+aug +STA")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("data/ablation"), help="long-tailed synthetic data")
    ap.add_argument("--sequences", type=int, default=40)
    ap.add_argument("--minutes", type=float, default=2.0, help="length of each synthetic sequence")
    ap.add_argument("--iterations", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--alpha", type=float, default=None, help="augmentation alpha (default: half the largest count)")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--variants", nargs="+", default=list(PAPER_VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/ablation.json"))
    args = ap.parse_args()

    import numpy as np

    from models.augment import class_counts, repeat_factors
    from models.datasets import load_smg
    from models.detector import load_checkpoint
    from models.run_eval import evaluate_outputs
    from models.synth import write_dataset
    from models.train import RunConfig, offline_outputs, train
    from service.contract.classes import NUM_CLASSES

    if not (args.data / "splits.json").is_file():
        frames = int(args.minutes * 60 * 30)
        write_dataset(args.data, args.sequences, seed=7, frames_per_sequence=frames, long_tail=True)
    train_seqs = load_smg(args.data, "train")
    val_seqs = load_smg(args.data, "val")
    test_seqs = load_smg(args.data, "test")
    counts = class_counts(s.labels for s in train_seqs)
    alpha = args.alpha or 0.5 * max(counts.values())
    factors = repeat_factors(counts, alpha)
    print(f"train class counts {dict(sorted(counts.items()))}")
    print(f"alpha {alpha:g}: repeat factors {dict(sorted(factors.items()))}")

    base = RunConfig.load(Path(__file__).resolve().parent.parent / "models" / "configs" / "default.yaml")
    results: dict[str, dict] = {}
    for name in args.variants:
        v = VARIANTS[name]
        runs = []
        for seed in range(args.seeds):
            cfg = replace(
                base,
                model=replace(base.model, channels=args.channels, sta=v["sta"], sta_residual=v.get("residual", False)),
                train=replace(
                    base.train,
                    iterations=args.iterations,
                    batch_size=args.batch_size,
                    eval_every=max(1, args.iterations // 3),
                    warmup_iterations=max(1, args.iterations // 10),
                    aug_alpha=alpha if v["aug"] else None,
                    max_minutes=None,
                    seed=seed,
                ),
            )
            t0 = time.time()
            res = train(cfg, Path("runs/ablation") / f"{name.replace(' ', '')}-s{seed}", False, train_seqs, val_seqs)
            model = load_checkpoint(res.checkpoint)
            rep = evaluate_outputs(offline_outputs(model.model, test_seqs), test_seqs, model.postprocess)
            runs.append(
                {
                    "seed": seed,
                    "seconds": round(time.time() - t0, 1),
                    "val_f1": res.val_f1,
                    "test_smg_f1": rep["smg_f1"]["f1"],
                    "test_strict_f1": rep["strict_f1"]["f1"],
                    "test_map": rep["map"]["mean"],
                    "per_class_f1": {c: r["f1"] for c, r in rep["per_class_f1"].items()},
                }
            )
            print(f"{name:10s} seed {seed}: test SMG F1 {runs[-1]['test_smg_f1']:.4f} ({runs[-1]['seconds']} s)")
        results[name] = {
            "test_smg_f1": float(np.mean([r["test_smg_f1"] for r in runs])),
            "test_strict_f1": float(np.mean([r["test_strict_f1"] for r in runs])),
            "test_map": float(np.mean([r["test_map"] for r in runs])),
            "per_class_f1": {
                str(c): float(np.mean([r["per_class_f1"][str(c)] for r in runs])) for c in range(1, NUM_CLASSES + 1)
            },
            "runs": runs,
        }

    test_counts = class_counts(s.labels for s in test_seqs)
    print("\n| variant | test SMG F1 | strict F1 | mAP@0.3:0.7 |\n|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['test_smg_f1']:.4f} | {r['test_strict_f1']:.4f} | {r['test_map']:.4f} |")
    header = " | ".join(args.variants)
    print(f"\n| class | train n | test n | {header} |\n|---|---|---|" + "---|" * len(args.variants))
    for c in range(1, NUM_CLASSES + 1):
        cells = " | ".join(f"{results[n]['per_class_f1'][str(c)]:.3f}" for n in args.variants)
        print(f"| {c} | {counts.get(c, 0)} | {test_counts.get(c, 0)} | {cells} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    setup = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    summary = {"args": setup, "alpha": alpha, "train_counts": counts, "results": results}
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
