"""Post-hoc detectors against pytorch-ood 0.4.0: same numbers, less time.

On one LeNet trained briefly on MNIST (CPU, a few hundred steps), with MNIST test as in-distribution and
FashionMNIST (if on disk) or CCU's noise as OOD, this compares
1. MSP, energy, entropy, max-logit and Mahalanobis: ours (ONE forward pass per batch feeding all five, then
   `utils.metrics.ood_metrics`) against pytorch-ood's five detectors (each runs the network) + `OODMetrics`;
2. ODIN at equal settings (T = 1000, eps = 0.0014);
3. an ODIN sweep over 21 eps (one shared backward pass) against 21 separate pytorch-ood ODIN runs;
4. (`--parts recent`) the ten recent detectors (docs/methods.md#recent-post-hoc-detectors): ours (each fitted with
   one pass over the fit images, then ONE forward pass per batch feeding all ten) against the nine that
   pytorch-ood 0.4.0 also ships (Mahalanobis++ against its Mahalanobis on normalised features), each fitted and
   run on its own; per detector the largest |score difference| after mapping pytorch-ood's outlier score to our
   confidence (sign, and GEN's mean over M instead of our sum), and both AUROCs.
It checks that the AUROCs agree after the sign flip (pytorch-ood scores outliers high) and prints a Markdown
table of times (best of --repeats) and metrics.

pytorch-ood is never a project dependency: run this with a separate environment that has it, e.g.
    .venv/bin/python -m venv /tmp/bench-venv
    echo "$PWD/.venv/lib/python3.11/site-packages" > /tmp/bench-venv/lib/python3.11/site-packages/main.pth
    /tmp/bench-venv/bin/pip install pytorch-ood==0.4.0 --no-deps
    /tmp/bench-venv/bin/python benchmarks/bench_detectors.py --data-root ../shared/datasets
Without pytorch-ood only our timings are printed.

Recorded (defaults: LeNet 300 steps, 10 000 MNIST-test vs 10 000 ccu_noise, Mahalanobis fit on 10 000 train
images, ODIN on 1 000 + 1 000; 2 shared CPU cores, torch 2.14.1; best of 3, ours and reference alternated):
    five one-pass scores   17.6 s vs 65.5 s   3.7x   AUROC diff 0 (MSP, energy, max-logit), 1e-16 (entropy)
    Mahalanobis fit         3.5 s vs  6.0 s   1.7x   AUROC diff 2.9e-6 = the reference's float32 inverse (0 vs
                                                     its formula in float64; ours uses ridge = 1e-6 / N there)
    ODIN T=1000, 0.0014     3.5 s vs  3.3 s   0.95x  same three passes (1.05x in an earlier run): parity
    ODIN sweep, 21 eps     20.1 s vs 65.4 s   3.3x   (4.6x in an earlier run); AUROC diff <= 2.2e-16
    recent ten (--parts recent --n-in 2000 --n-out 2000 --n-fit 5000, ccu_noise as OOD, one repeat):
                           45.3 s vs 229.7 s  5.1x  (97.0 s = 1.9x before the fits shared one training pass)
        max |score diff|: react 0, ash 6.1e-5, scale 0, knn 1.2e-6, fdbd 1.6e-7, nnguide 0 (AUROC equal);
        vim 1.1 of scores up to 26 (float32 eigenvectors near a 0.2% eigenvalue gap; AUROC 0.21815 vs 0.21871);
        gen 0.84 (pytorch-ood clamps p to [1e-7, 1 - 1e-7]; AUROC equal); mahalanobis++ and rmds differ far
        from the data (pytorch-ood inverts with + 1e-6 I, we take the pseudo-inverse; AUROC 0.99634 vs 0.99551,
        0.99152 vs 0.99159).
The sweep's speed-up is bounded by (forward + backward + forward) per separate run over one forward per extra
eps, about 3-4.5x for LeNet on CPU. Timings on this shared machine varied by up to 2x between runs.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import data  # noqa: E402
from models import MODELS  # noqa: E402
from utils.detectors import DETECTORS  # noqa: E402
from utils.detectors.base import Detector  # noqa: E402
from utils.detectors.mahalanobis import Mahalanobis  # noqa: E402
from utils.detectors.odin import ODIN, ODIN_EPS_GRID  # noqa: E402
from utils.metrics import ood_metrics  # noqa: E402
from utils.runs import benchmark_data_root  # noqa: E402

FAST = ("msp", "energy", "entropy", "maxlogit", "mahalanobis")
METRIC_KEYS = {"auroc": "AUROC", "aupr_in": "AUPR-IN", "aupr_out": "AUPR-OUT", "fpr95": "FPR95TPR"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", default=benchmark_data_root(), help="default: $DATA_ROOT, else ../shared/datasets beside the repository")
    parser.add_argument("--out-data", default=None, help="OOD set (default: FMNIST if on disk, else ccu_noise)")
    parser.add_argument("--steps", type=int, default=300, help="LeNet training steps (Adam 1e-3, batch 128)")
    parser.add_argument("--n-in", type=int, default=10000, help="MNIST test images scored")
    parser.add_argument("--n-out", type=int, default=10000, help="OOD images scored")
    parser.add_argument("--n-fit", type=int, default=10000, help="training images for the Mahalanobis fit")
    parser.add_argument("--n-odin", type=int, default=1000, help="images per set for the ODIN comparisons")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sweep-repeats", type=int, default=1, help="repeats of the (slow) 21-run reference sweep")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--parts", nargs="+", default=["fast", "odin"], choices=["fast", "odin", "recent"])
    parser.add_argument("--model-cache", default=None, help="state-dict file: load the LeNet if it exists, "
                        "else train and save it there (saves the training time on reruns)")
    return parser


def best_time(fn: Callable, repeats: int):
    """(minimum wall time over `repeats` calls, result of the last call)."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def paired_times(ours: Callable, theirs: Callable, repeats: int):
    """Best-of-`repeats` times of two computations run alternately (fair under a fluctuating machine load)."""
    best_ours, best_theirs, result_ours, result_theirs = float("inf"), float("inf"), None, None
    for _ in range(repeats):
        t_ours, result_ours = best_time(ours, 1)
        t_theirs, result_theirs = best_time(theirs, 1)
        best_ours, best_theirs = min(best_ours, t_ours), min(best_theirs, t_theirs)
    return best_ours, best_theirs, result_ours, result_theirs


def batches(x: torch.Tensor, size: int):
    return [x[i:i + size] for i in range(0, len(x), size)]


def train_lenet(train_x: torch.Tensor, train_y: torch.Tensor, args) -> torch.nn.Module:
    torch.manual_seed(args.seed)
    model = MODELS["lenet"](num_classes=10, in_channels=1, input_size=28).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    for _ in range(args.steps):
        index = torch.randint(len(train_x), (128,), generator=generator)
        loss = F.cross_entropy(model(train_x[index].to(args.device)), train_y[index].to(args.device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def load_sets(args):
    mnist_train = data.get_dataset("MNIST", "train", root=args.data_root)
    train_x, train_y = mnist_train.tensors()
    x_in = data.get_dataset("MNIST", "test", root=args.data_root).tensors()[0][:args.n_in]
    out_name = args.out_data
    if out_name is None:
        try:
            data.get_dataset("FMNIST", "test", root=args.data_root)
            out_name = "FMNIST"
        except data.DatasetNotFoundError:
            out_name = "ccu_noise"
    out_set = data.get_dataset(out_name, "test", root=args.data_root, like="MNIST", n=args.n_out, seed=args.seed)
    x_out = torch.stack([out_set[i][0] for i in range(min(args.n_out, len(out_set)))])
    return train_x, train_y, x_in, x_out, out_name


def shared_pass_scores(model, detectors: dict, x_in, x_out, batch_size: int) -> dict:
    """One forward pass per batch feeds every logit/feature detector: {name: (scores in, scores out)}."""
    scores = {name: ([], []) for name in detectors}
    with torch.no_grad():
        for side, x in enumerate((x_in, x_out)):
            for batch in batches(x, batch_size):
                features = model.features(batch)
                logits = model.head(features)
                for name, detector in detectors.items():
                    scores[name][side].append(detector.from_outputs(features, logits))
    return {name: (torch.cat(s_in), torch.cat(s_out)) for name, (s_in, s_out) in scores.items()}


def ours_fast(model, detectors: dict, x_in, x_out, batch_size: int) -> dict:
    """The shared pass, then one metrics call per detector."""
    return {name: ood_metrics(s_in, s_out, fpr_convention="ood")
            for name, (s_in, s_out) in shared_pass_scores(model, detectors, x_in, x_out, batch_size).items()}


def reference_metrics(detector, x_in, x_out, batch_size: int, grad: bool = False) -> dict:
    """pytorch-ood's usual loop: detector(x) per batch (the detector runs the network) + OODMetrics."""
    from pytorch_ood.metrics import OODMetrics

    metrics = OODMetrics()
    with torch.set_grad_enabled(grad):
        for label, x in ((0, x_in), (-1, x_out)):
            for batch in batches(x, batch_size):
                metrics.update(detector(batch), torch.full((len(batch),), label))
    result = metrics.compute()
    return {ours: float(result[theirs]) for ours, theirs in METRIC_KEYS.items()}


def fit_reference(model, train_x, train_y, args):
    from pytorch_ood.detector import EnergyBased, Entropy, Mahalanobis as RefMahalanobis, MaxLogit, MaxSoftmax
    from torch.utils.data import DataLoader, TensorDataset

    maha = RefMahalanobis(model.features).to(args.device)
    fit_loader = DataLoader(TensorDataset(train_x, train_y), batch_size=args.batch_size)
    fit_time, _ = best_time(lambda: maha.fit(fit_loader), 1)
    return {"msp": MaxSoftmax(model), "energy": EnergyBased(model), "entropy": Entropy(model),
            "maxlogit": MaxLogit(model), "mahalanobis": maha}, fit_time


def compare_fast(model, train_x, train_y, x_in, x_out, args, rows: list, have_ref: bool) -> None:
    """The five one-pass scores. Our Mahalanobis uses pytorch-ood's regulariser here (ridge = 1e-6 / N, see
    `Mahalanobis`) so that both compute the same ranking; the default (pinv, as Lee et al. / CCU) gets a row
    of its own."""
    from torch.utils.data import DataLoader, TensorDataset

    fit_loader = DataLoader(TensorDataset(train_x, train_y), batch_size=args.batch_size)
    detectors = {name: DETECTORS[name](model) for name in FAST if name != "mahalanobis"}
    ridge = 1e-6 / len(train_x)
    fit_ours, detectors["mahalanobis"] = best_time(lambda: Mahalanobis(model, ridge=ridge).fit(fit_loader), 1)
    pinv = ours_fast(model, {"maha": Mahalanobis(model).fit(fit_loader)}, x_in, x_out, args.batch_size)["maha"]
    run_ours = lambda: ours_fast(model, detectors, x_in, x_out, args.batch_size)  # noqa: E731
    if not have_ref:
        t_ours, ours = best_time(run_ours, args.repeats)
        rows.append(("five scores", t_ours, None, None, None))
        rows += [(f"  {name}", None, None, ours[name], None) for name in FAST]
        rows.append(("  mahalanobis, pinv (default)", None, None, pinv, None))
        return
    refs, fit_ref = fit_reference(model, train_x, train_y, args)
    run_ref = lambda: {name: reference_metrics(refs[name], x_in, x_out, args.batch_size)  # noqa: E731
                       for name in FAST}
    t_ours, t_ref, ours, theirs = paired_times(run_ours, run_ref, args.repeats)
    rows.append(("five scores (MSP, energy, entropy, max-logit, Maha)", t_ours, t_ref, None, None))
    rows.append(("Mahalanobis fit", fit_ours, fit_ref, None, None))
    rows += [(f"  {name}", None, None, ours[name], theirs[name]) for name in FAST]
    rows.append(("  mahalanobis, pinv (default; ref = ridge)", None, None, pinv, theirs["mahalanobis"]))
    exact = float64_reference_mahalanobis(model, train_x, train_y, x_in, x_out, args.batch_size)
    rows.append(("  mahalanobis: ours vs pytorch-ood's formula in float64", None, None, ours["mahalanobis"], exact))


def float64_reference_mahalanobis(model, train_x, train_y, x_in, x_out, batch_size: int) -> dict:
    """pytorch-ood's Mahalanobis formula (scatter matrix + 1e-6 I, inverted) recomputed in float64: separates
    our implementation's agreement from the float32 rounding of the reference."""
    with torch.no_grad():
        feats = [torch.cat([model.features(b) for b in batches(x, batch_size)]).double()
                 for x in (train_x, x_in, x_out)]
    z, y = feats[0], train_y
    means = torch.stack([z[y == c].mean(dim=0) for c in range(int(y.max()) + 1)])
    centred = z - means[y]
    precision = torch.linalg.inv(centred.T @ centred + 1e-6 * torch.eye(z.shape[1], dtype=torch.float64))

    def conf(f):
        diff = f[:, None, :] - means[None]  # (N, K, F)
        return -0.5 * torch.einsum("nkf,fg,nkg->nk", diff, precision, diff).amin(dim=1)
    return ood_metrics(conf(feats[1]), conf(feats[2]), fpr_convention="ood")


def compare_odin(model, x_in, x_out, args, rows: list, have_ref: bool) -> None:
    x_in, x_out = x_in[:args.n_odin], x_out[:args.n_odin]
    ours = ODIN(model, temperature=1000.0, eps=0.0014)

    def ours_run():
        conf = [torch.cat([ours.confidence(b) for b in batches(x, args.batch_size)]) for x in (x_in, x_out)]
        return ood_metrics(*conf, fpr_convention="ood")

    def sweep_run():
        return [torch.cat([ours.confidence_sweep(b, ODIN_EPS_GRID) for b in batches(x, args.batch_size)], dim=1)
                for x in (x_in, x_out)]

    if not have_ref:
        t_ours, m_ours = best_time(ours_run, args.repeats)
        t_sweep, _ = best_time(sweep_run, args.repeats)
        rows += [("ODIN T=1000 eps=0.0014", t_ours, None, m_ours, None),
                 ("ODIN sweep 21 eps", t_sweep, None, None, None)]
        return
    from pytorch_ood.detector import ODIN as RefODIN

    ref = RefODIN(model, eps=0.0014, temperature=1000.0)
    t_ours, t_ref, m_ours, m_ref = paired_times(
        ours_run, lambda: reference_metrics(ref, x_in, x_out, args.batch_size, grad=True), args.repeats)
    rows.append(("ODIN T=1000 eps=0.0014", t_ours, t_ref, m_ours, m_ref))
    t_sweep, (sweep_in, sweep_out) = best_time(sweep_run, args.repeats)

    def ref_sweep():
        return [reference_metrics(RefODIN(model, eps=float(e), temperature=1000.0), x_in, x_out,
                                  args.batch_size, grad=True) for e in ODIN_EPS_GRID]

    t_ref_sweep, m_ref_sweep = best_time(ref_sweep, args.sweep_repeats)
    gaps = [abs(ood_metrics(sweep_in[i], sweep_out[i])["auroc"] - m_ref_sweep[i]["auroc"])
            for i in range(len(ODIN_EPS_GRID))]
    rows.append((f"ODIN sweep 21 eps (max |dAUROC| {max(gaps):.1e})", t_sweep, t_ref_sweep, None, None))


RECENT_OPTIONS = {"knn": {"k": 50}, "nnguide": {"k": 100}}  # the defaults, spelled out for the reference


def ours_recent(model, train_x, train_y, x_in, x_out, batch_size: int) -> dict:
    """Fit each recent detector (one pass over the fit images each, as evaluation does), then score in and out
    with ONE forward pass per batch feeding all ten: {name: (scores in, scores out)}."""
    from utils.detectors.recent import RECENT_DETECTORS

    loader = list(zip(batches(train_x, batch_size), batches(train_y, batch_size)))
    detectors = {name: cls(model, **RECENT_OPTIONS.get(name, {})) for name, cls in RECENT_DETECTORS.items()}
    for detector in detectors.values():
        if type(detector).fit is not Detector.fit:
            detector.fit(loader)
    return {name: (s_in.double().cpu(), s_out.double().cpu())
            for name, (s_in, s_out) in shared_pass_scores(model, detectors, x_in, x_out, batch_size).items()}


def reference_recent(model, vim_dim: int) -> dict:
    """pytorch-ood 0.4.0's versions, each built, fitted and run on its own: {name: (detector, to_confidence)}.
    ReAct / ASH / SCALE get the pooled vector as a C x 1 x 1 map (their backbone), like ours."""
    from pytorch_ood import detector as ref

    as_map = lambda x: model.features(x)[:, :, None, None]  # noqa: E731
    head = lambda m: model.head(m.flatten(1))  # noqa: E731
    unit = lambda x: F.normalize(model.features(x), dim=1)  # noqa: E731
    num_classes = model.fc.out_features
    built = {"react": (ref.ReAct(as_map, head, percentile=0.90), -1.0),
             "ash": (ref.ASH(as_map, head, variant="ash-s", percentile=0.90), -1.0),
             "scale": (ref.SCALE(as_map, head, percentile=0.85), -1.0),
             "knn": (ref.KNN(model.features, k=50), -1.0),
             "vim": (ref.ViM(model.features, d=vim_dim, w=model.fc.weight.detach(), b=model.fc.bias.detach()), -1.0),
             "gen": (ref.GEN(model, gamma=0.1), -float(num_classes)),   # theirs: mean over M = K, ours: sum
             "fdbd": (ref.fDBD(model.features, model.fc), -1.0),
             "nnguide": (ref.NNGuide(model.features, model.head, k=100), -1.0),
             "mahalanobis++": (ref.Mahalanobis(unit), -1.0),
             "rmds": (ref.RMD(model.features), -1.0)}
    return built


def run_reference_recent(model, train_x, train_y, x_in, x_out, args, vim_dim: int) -> dict:
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(train_x, train_y), batch_size=args.batch_size)
    out, times = {}, {}
    for name, (detector, factor) in reference_recent(model, vim_dim).items():
        start = time.perf_counter()
        if hasattr(detector, "fit") and name not in ("ash", "scale", "gen"):
            detector.fit(loader)
        with torch.no_grad():
            scored = [torch.cat([detector(b).double().cpu() for b in batches(x, args.batch_size)]) * factor
                      for x in (x_in, x_out)]
        times[name] = time.perf_counter() - start
        out[name] = tuple(scored)
    return out, times


def compare_recent(model, train_x, train_y, x_in, x_out, args, have_ref: bool) -> None:
    """Part 4 of the module docstring: one table, per detector, and the whole set's time."""
    from utils.detectors.subspace import vim_default_dim

    t_ours, ours = best_time(lambda: ours_recent(model, train_x, train_y, x_in, x_out, args.batch_size),
                             args.repeats)
    print(f"\nrecent detectors, fit on {len(train_x)} training images; ours (all ten, fits included): "
          f"{t_ours:.2f}s (best of {args.repeats})")
    theirs, times = ({}, {})
    if have_ref:
        t_ref, (theirs, times) = best_time(lambda: run_reference_recent(
            model, train_x, train_y, x_in, x_out, args, vim_default_dim(model.fc.in_features)), 1)
        print(f"pytorch-ood 0.4.0 (the nine it ships + its Mahalanobis on normalised features, each fitted and "
              f"run alone): {t_ref:.2f}s; speed-up of the whole set of ten: {t_ref / t_ours:.2f}x")
    print("| detector | max abs score diff | max |ours| | AUROC ours | AUROC ref | ref time (s) |")
    print("|---|---|---|---|---|---|")
    for name, (s_in, s_out) in ours.items():
        auroc = ood_metrics(s_in, s_out, fpr_convention="ood")["auroc"]
        cells = [name, "", f"{torch.cat([s_in, s_out]).abs().max():.4g}", f"{auroc:.6f}", "", ""]
        if name in theirs:
            r_in, r_out = theirs[name]
            cells[1] = f"{(torch.cat([s_in, s_out]) - torch.cat([r_in, r_out])).abs().max():.2e}"
            cells[4] = f"{ood_metrics(r_in, r_out, fpr_convention='ood')['auroc']:.6f}"
            cells[5] = f"{times[name]:.2f}"
        print("| " + " | ".join(cells) + " |")


def print_table(rows: list, header: str) -> None:
    print(header)
    print("| computation | ours (s) | pytorch-ood (s) | speed-up | AUROC ours | AUROC ref | |dAUROC| | "
          "FPR95(ood) ours | FPR95 ref |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, t_ours, t_ref, m_ours, m_ref in rows:
        cells = [name, f"{t_ours:.3f}" if t_ours else "", f"{t_ref:.3f}" if t_ref else "",
                 f"{t_ref / t_ours:.2f}x" if t_ours and t_ref else ""]
        cells += [f"{m_ours['auroc']:.6f}" if m_ours else "", f"{m_ref['auroc']:.6f}" if m_ref else "",
                  f"{abs(m_ours['auroc'] - m_ref['auroc']):.1e}" if m_ours and m_ref else "",
                  f"{m_ours['fpr95']:.4f}" if m_ours else "", f"{m_ref['fpr95']:.4f}" if m_ref else ""]
        print("| " + " | ".join(cells) + " |")


def main(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import pytorch_ood  # noqa: F401
        have_ref = True
    except ImportError:
        have_ref = False
        print("pytorch-ood is not installed here: timing ours only (see the module docstring)")
    train_x, train_y, x_in, x_out, out_name = load_sets(args)
    start = time.perf_counter()
    if args.model_cache and Path(args.model_cache).is_file():
        model = MODELS["lenet"](num_classes=10, in_channels=1, input_size=28).to(args.device)
        model.load_state_dict(torch.load(args.model_cache, map_location=args.device, weights_only=True))
        model.eval()
    else:
        model = train_lenet(train_x, train_y, args)
        if args.model_cache:
            torch.save(model.state_dict(), args.model_cache)
    print(f"trained LeNet for {args.steps} steps in {time.perf_counter() - start:.0f}s; "
          f"in = MNIST test ({len(x_in)}), out = {out_name} ({len(x_out)}), {torch.get_num_threads()} threads")
    device = torch.device(args.device)
    x_in, x_out = x_in.to(device), x_out.to(device)
    rows: list = []
    if "fast" in args.parts:
        compare_fast(model, train_x[:args.n_fit], train_y[:args.n_fit], x_in, x_out, args, rows, have_ref)
    if "odin" in args.parts:
        compare_odin(model, x_in, x_out, args, rows, have_ref)
    print_table(rows, f"\nbest of {args.repeats}; FPR95 under the 'ood' convention (pytorch-ood's)\n")
    if "recent" in args.parts:
        compare_recent(model, train_x[:args.n_fit], train_y[:args.n_fit], x_in, x_out, args, have_ref)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
