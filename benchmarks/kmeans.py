"""k-means speed and quality: faiss, kt-edge's torch engine, scikit-learn KMeans and MiniBatchKMeans, side by side.

Every method clusters the same float32 features with random initialisation and the
same iteration budget; fit time is the median of --repeats runs. Quality is measured
identically for all: each method's centroids label every point by nearest centroid
(faiss IndexFlatL2), giving the inertia (sum of squared distances) and the ARI of the
labels against faiss's. Results go to benchmarks/results/kmeans-<machine>.json.

    python benchmarks/kmeans.py                          # CPU default: 100k x 256 -> 1000 clusters
    python benchmarks/kmeans.py --features runs/x/features --k 2000
    python benchmarks/kmeans.py --gpu-scale              # 1.28M x 2048 -> 2000 clusters, 20 iterations, on the GPU

The --gpu-scale preset is the ImageNet setting of Noroozi et al. (CVPR 2018), who
report about 4 hours on a Titan X for it: the torch engine on data made on the GPU, and faiss
on the GPU where a faiss-gpu build is installed (``gpu_scale``, which the GPU campaign calls).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import sklearn
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.metrics import adjusted_rand_score

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kt_edge_runtime.bench import machine_name  # noqa: E402

from kt_edge.atomic import write_json  # noqa: E402
from kt_edge.features import FeatureStore  # noqa: E402
from kt_edge.kmeans import assign, cores, fit_kmeans, sample_rows  # noqa: E402

try:
    import faiss
except ImportError:  # a GPU image without faiss: gpu_scale runs the torch engine alone
    faiss = None

METHODS = ("faiss", "torch", "sklearn", "minibatch")
GPU_SCALE = {"n": 1_281_167, "dim": 2048, "k": 2000, "niter": 20}


def gpu_names() -> list[str]:
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def machine(faiss_gpu_count: int) -> dict:
    return {
        "cpu": machine_name(),
        "cpu_cores": os.cpu_count(),
        "faiss_threads": cores(),
        "load_average_1min_at_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "gpus": gpu_names(),
        "faiss_gpus_used": faiss_gpu_count,
        "python": platform.python_version(),
        "faiss": faiss.__version__ if faiss else None,
        "sklearn": sklearn.__version__,
        "numpy": np.__version__,
    }


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def gaussian_mixture(n: int, dim: int, components: int, noise: float, seed: int, chunk: int = 65536) -> np.ndarray:
    """Points around `components` standard-normal centres plus Gaussian noise, made in chunks to stay float32."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((components, dim), dtype=np.float32)
    x = np.empty((n, dim), dtype=np.float32)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        x[lo:hi] = centres[rng.integers(0, components, hi - lo)]
        x[lo:hi] += noise * rng.standard_normal((hi - lo, dim), dtype=np.float32)
    return x


def fit_engine(x, k, niter, seed, engine):
    r = fit_kmeans(x, k, niter=niter, seed=seed, engine_name=engine)
    return r.centroids, len(r.objective_history)


def gpu_scale(
    n: int = GPU_SCALE["n"],
    dim: int = GPU_SCALE["dim"],
    k: int = GPU_SCALE["k"],
    niter: int = GPU_SCALE["niter"],
    seed: int = 0,
) -> dict:
    """k-means of a Gaussian mixture made on this process's device (the GPU when there is one): the torch
    engine, and faiss on the GPU when a faiss-gpu build sees one; seconds exclude making the data."""
    import torch

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    generator = torch.Generator(device=device).manual_seed(seed)
    centres = torch.randn(k, dim, device=device, generator=generator)
    x = torch.empty(n, dim, device=device)
    for lo in range(0, n, 65536):
        rows = min(n, lo + 65536) - lo
        x[lo : lo + rows] = centres[torch.randint(k, (rows,), device=device, generator=generator)]
        x[lo : lo + rows] += torch.randn(rows, dim, device=device, generator=generator)
    runs = {}
    result = fit_kmeans(x, k, niter=niter, seed=seed, engine_name="torch")
    runs["torch"] = {
        "seconds": result.seconds,
        "iterations": len(result.objective_history),
        "objective_per_point": result.objective / n,
        "device": str(device),
    }
    if faiss is not None and faiss.get_num_gpus() > 0:
        r = fit_kmeans(x.cpu().numpy(), k, niter=niter, seed=seed, engine_name="faiss-gpu")
        runs["faiss-gpu"] = {
            "seconds": r.seconds,
            "iterations": len(r.objective_history),
            "objective_per_point": r.objective / n,
        }
    else:
        runs["faiss-gpu"] = {
            "skipped": "faiss-gpu is not installed"
            if faiss is None or not hasattr(faiss, "StandardGpuResources")
            else "faiss sees no GPU"
        }
    return {
        "n": n,
        "dim": dim,
        "k": k,
        "niter": niter,
        "data": "Gaussian mixture of k centres, made on " + str(device),
        "runs": runs,
        "target_seconds": 10.0,
        "met": runs["torch"]["seconds"] < 10.0 if device.type == "cuda" else None,
    }


def fit_sklearn(x, k, niter, seed):
    km = KMeans(k, init="random", n_init=1, max_iter=niter, tol=0.0, algorithm="lloyd", random_state=seed).fit(x)
    return km.cluster_centers_.astype(np.float32), int(km.n_iter_)


def fit_minibatch(x, k, niter, seed, batch_size):
    km = MiniBatchKMeans(
        k, init="random", n_init=1, max_iter=niter, batch_size=batch_size, random_state=seed, compute_labels=False
    ).fit(x)
    return km.cluster_centers_.astype(np.float32), int(km.n_steps_)


def run(args) -> dict:
    faiss_engine = (
        "faiss-gpu" if args.use_gpu == "yes" or (args.use_gpu == "auto" and faiss.get_num_gpus()) else "faiss-cpu"
    )
    gpus = faiss.get_num_gpus() if faiss_engine == "faiss-gpu" else 0
    if args.features:
        store = FeatureStore.open(args.features)
        x = sample_rows(store, args.n or store.n, seed=args.seed)
        data = {
            "source": "feature store",
            "path": str(args.features),
            "fingerprint": store.fingerprint,
            "store_n": store.n,
            "rows_used": len(x),
            "dim": store.dim,
            "sample_seed": args.seed,
        }
    else:
        x = gaussian_mixture(args.n, args.dim, args.components or args.k, args.noise, args.seed)
        data = {
            "source": "synthetic gaussian mixture",
            "n": args.n,
            "dim": args.dim,
            "components": args.components or args.k,
            "noise_std": args.noise,
            "seed": args.seed,
        }
    n, k = len(x), args.k
    sk_n = min(n, args.sklearn_max_n or n)
    sk_x = x if sk_n == n else sample_rows(x, sk_n, seed=args.seed)

    fits = {
        "faiss": lambda: fit_engine(x, k, args.niter, args.seed, faiss_engine),
        "torch": lambda: fit_engine(x, k, args.niter, args.seed, "torch"),
        "sklearn": lambda: fit_sklearn(sk_x, k, args.niter, args.seed),
        "minibatch": lambda: fit_minibatch(x, k, args.niter, args.seed, args.minibatch_size),
    }
    fit_n = {"faiss": n, "torch": n, "sklearn": sk_n, "minibatch": n}
    results, labels = {}, {}
    for name in args.methods:
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            centroids, iterations = fits[name]()
            times.append(time.perf_counter() - t0)
        pred, dist = assign(x, centroids, use_gpu=bool(gpus))
        labels[name] = pred
        results[name] = {
            "fit_n": fit_n[name],
            "seconds_median": statistics.median(times),
            "seconds_all": times,
            "iterations": iterations,
            "seconds_per_iteration": statistics.median(times) / max(iterations, 1),
            "inertia": float(dist.astype(np.float64).sum()),
            "inertia_per_point": float(dist.astype(np.float64).mean()),
            "empty_clusters": int(k - len(np.unique(pred))),
        }
        print(
            f"{name:10s} fit_n={fit_n[name]:>9,d} median {results[name]['seconds_median']:8.2f} s  "
            f"iterations {iterations:4d}  inertia/pt {results[name]['inertia_per_point']:.4f}",
            flush=True,
        )
    if "faiss" in results:
        base = results["faiss"]
        for name, r in results.items():
            r["time_ratio_vs_faiss"] = r["seconds_median"] / base["seconds_median"]
            r["inertia_ratio_vs_faiss"] = r["inertia"] / base["inertia"]
            r["ari_vs_faiss"] = float(adjusted_rand_score(labels["faiss"], labels[name]))
    names = list(results)
    agreement = {
        f"{a}~{b}": float(adjusted_rand_score(labels[a], labels[b]))
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    }
    notes = [
        "all methods: random init, one init, same iteration budget; faiss and sklearn KMeans stop early only on "
        "exact convergence; MiniBatchKMeans max_iter counts passes over the data and 'iterations' is its number "
        "of mini-batch steps",
        "inertia and ARI are computed the same way for every method: nearest-centroid labels of all rows",
    ]
    if sk_n < n:
        notes.append(
            f"sklearn KMeans was fitted on a seeded subset of {sk_n} of the {n} rows (full Lloyd on all "
            "rows is too slow here); its inertia and ARI are still measured on all rows"
        )
    return {
        "benchmark": "kmeans",
        "machine": machine(gpus),
        "data": data,
        "params": {
            "k": k,
            "niter": args.niter,
            "repeats": args.repeats,
            "seed": args.seed,
            "minibatch_size": args.minibatch_size,
            "methods": list(args.methods),
        },
        "results": results,
        "agreement_ari": agreement,
        "notes": notes,
    }


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=None, help="rows (default 100000; with --features: all rows)")
    p.add_argument("--dim", type=int, default=256, help="feature dim of synthetic data")
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--niter", type=int, default=20)
    p.add_argument("--components", type=int, default=None, help="mixture components of synthetic data (default k)")
    p.add_argument(
        "--noise", type=float, default=1.0, help="noise std per coordinate of synthetic data (centres ~ N(0, 1))"
    )
    p.add_argument("--features", type=Path, default=None, help="a FeatureStore directory to cluster instead")
    p.add_argument(
        "--gpu-scale",
        action="store_true",
        help="1.28M x 2048 -> 2000 clusters, 20 iterations, data "
        "made on the GPU: the torch engine, and faiss-gpu where installed",
    )
    p.add_argument(
        "--methods", default=None, help=f"comma list of {','.join(METHODS)} (default all; faiss for --gpu-scale)"
    )
    p.add_argument("--sklearn-max-n", type=int, default=None, help="fit sklearn KMeans on at most this many rows")
    p.add_argument("--minibatch-size", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--use-gpu", choices=("auto", "yes", "no"), default="auto")
    p.add_argument(
        "--out", type=Path, default=None, help="JSON path (default benchmarks/results/kmeans-<machine>.json)"
    )
    args = p.parse_args(argv)
    if args.n is None and not args.features:
        args.n = 100_000
    args.methods = [m.strip() for m in (args.methods or ",".join(METHODS)).split(",")]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        p.error(f"unknown method(s) {sorted(unknown)}; choose from {', '.join(METHODS)}")
    return args


def main(argv=None) -> Path:
    args = parse(argv)
    if args.gpu_scale:
        report = {"benchmark": "kmeans-gpu-scale", "machine": machine(0), **gpu_scale(seed=args.seed)}
        report["machine"]["faiss_gpus_used"] = int("seconds" in report["runs"]["faiss-gpu"])
        out = (
            args.out
            or REPO
            / "benchmarks"
            / "results"
            / f"kmeans-gpu-scale-{slug(gpu_names()[0] if gpu_names() else machine_name())}.json"
        )
        write_json(out, report)
        print(f"wrote {out}")
        return out
    report = run(args)
    m = report["machine"]
    name = slug(m["gpus"][0]) if m["faiss_gpus_used"] else slug(m["cpu"])
    out = args.out or REPO / "benchmarks" / "results" / f"kmeans-{name}.json"
    write_json(out, report)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
