"""A NumPy MLP on scikit-learn's digits, without batch norm, with the blog post's NumPy batch norm,
and with bnorm.BatchNorm: same seed, same initialisation, same batches.

    python examples/digits_mlp.py                      # all three variants, default settings
    python examples/digits_mlp.py --epochs 30 --plot curves.png

The network is 64 -> H -> H -> 10 (Linear, [BatchNorm], ReLU, ..., softmax cross-entropy), trained
with plain SGD in float32.  With batch norm the Linear layers have no bias (beta plays its part),
and the ReLU belongs to the batch-norm layer: bnorm's is fused (``BatchNorm(...,
activation="relu")``: max(0, bn(x)) in the same pass, its backward recomputing the mask from x),
the post's layer is followed by NumPy's ``np.maximum`` and mask.  The two batch-norm variants
compute the same function, so they follow the same trajectory up to float32 rounding; the script
prints how far apart their parameters are and the time each spent inside its batch-norm + ReLU
layers (forward, backward and evaluation forward).

Needs scikit-learn (for the bundled data set, no download); tqdm and matplotlib are optional.
"""
import argparse
import os
import sys
import time

import numpy as np

try:
    import bnorm
except ImportError:  # run from a checkout: examples/ sits next to the package
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import bnorm
from bnorm.reference import PostBatchNorm

try:
    from tqdm import tqdm
except ImportError:
    tqdm = None

DTYPE = np.float32


# --------------------------------------------------------------------------- batch-norm adapters
class PostBN:
    """The post's layer as a NumPy user has it: ``PostBatchNorm`` (gamma passed in, no beta) plus a
    separate bias for beta, then NumPy's ReLU (and its mask in backward)."""

    def __init__(self, n):
        self.layer = PostBatchNorm(n, dtype=DTYPE)
        self.gamma = np.ones(n, DTYPE)
        self.beta = np.zeros(n, DTYPE)

    def forward(self, x, training=True):
        self.y = np.maximum(self.layer.forward(x, self.gamma, training) + self.beta, 0)
        return self.y

    def backward(self, dy):
        dy = dy * (self.y > 0)
        dx, self.dgamma = self.layer.backward(dy)
        self.dbeta = dy.sum(0)
        # The post's backward divides by N = np.prod(shape), a NumPy int64, and NumPy 2 promotes
        # float32 / int64 to float64: its dx comes back float64 for float32 input.  Left alone it
        # would turn the rest of the backward pass (the matmuls) into float64; cast it back here,
        # inside the timed region, so both variants run a float32 network.
        return dx.astype(DTYPE, copy=False)


class BnormBN(bnorm.BatchNorm):
    """bnorm's layer with its fused ReLU (the subclass only exists to fix the constructor's
    arguments)."""

    def __init__(self, n):
        super().__init__(n, dtype=DTYPE, activation="relu")


class Timed:
    """Wraps a batch-norm + ReLU layer and accumulates the wall time spent in it."""

    def __init__(self, layer, clock):
        self.layer, self.clock = layer, clock

    def forward(self, x, training=True):
        t = time.perf_counter()
        y = self.layer.forward(x, training)
        self.clock[0] += time.perf_counter() - t
        return y

    def backward(self, dy):
        t = time.perf_counter()
        dx = self.layer.backward(dy)
        self.clock[0] += time.perf_counter() - t
        return dx


# --------------------------------------------------------------------------- the network
class MLP:
    def __init__(self, sizes, make_bn, seed):
        rng = np.random.default_rng(seed)            # same seed -> same weights in every variant
        self.W = [(rng.standard_normal((a, b)) * np.sqrt(2.0 / a)).astype(DTYPE)
                  for a, b in zip(sizes[:-1], sizes[1:])]
        self.bn_time = [0.0]
        if make_bn is None:
            self.bn = None
            self.b = [np.zeros(n, DTYPE) for n in sizes[1:]]
        else:
            self.bn = [Timed(make_bn(n), self.bn_time) for n in sizes[1:-1]]
            self.b = [np.zeros(sizes[-1], DTYPE)]     # only the output layer has a bias

    def forward(self, x, training):
        acts = [x]
        for i, W in enumerate(self.W[:-1]):
            z = acts[-1] @ W
            # the batch-norm layers apply the ReLU themselves
            acts.append(np.maximum(z + self.b[i], 0) if self.bn is None else
                        self.bn[i].forward(z, training))
        return acts, acts[-1] @ self.W[-1] + self.b[-1]

    def step(self, x, labels, lr):
        acts, logits = self.forward(x, True)
        z = logits - logits.max(1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(1, keepdims=True))
        loss = -logp[np.arange(len(labels)), labels].mean()
        g = np.exp(logp)
        g[np.arange(len(labels)), labels] -= 1
        g /= len(labels)
        n = len(self.W)
        dW, db = [None] * n, [None] * len(self.b)
        dW[-1], db[-1] = acts[-1].T @ g, g.sum(0)
        g = g @ self.W[-1].T
        for i in range(n - 2, -1, -1):
            if self.bn is None:
                g = g * (acts[i + 1] > 0)
                db[i] = g.sum(0)
            else:       # through the ReLU and the batch norm
                g = self.bn[i].backward(g)
            dW[i] = acts[i].T @ g
            if i:
                g = g @ self.W[i].T
        for p, d in zip(self.W + self.b, dW + db):
            p -= lr * d
        for t in self.bn or ():
            t.layer.gamma -= lr * t.layer.dgamma
            t.layer.beta -= lr * t.layer.dbeta
        return float(loss)

    def params(self):
        ps = self.W + self.b
        for t in self.bn or ():
            ps = ps + [t.layer.gamma, t.layer.beta]
        return ps

    def accuracy(self, x, y, batch=512):
        hits = 0
        for i in range(0, len(x), batch):
            hits += int((self.forward(x[i:i + batch], False)[1].argmax(1) == y[i:i + batch]).sum())
        return hits / len(x)


# --------------------------------------------------------------------------- progress bar
class TextBar:
    """A minimal stand-in for tqdm: ``[#####.....] 12/23 desc loss=...`` on stderr."""

    def __init__(self, total, desc):
        self.total, self.desc, self.n, self.post = total, desc, 0, ""

    def update(self, k=1):
        self.n += k
        fill = int(30 * self.n / self.total)
        sys.stderr.write(f"\r{self.desc} [{'#' * fill}{'.' * (30 - fill)}] {self.n}/{self.total}"
                         f" {self.post}")
        sys.stderr.flush()

    def set_postfix_str(self, s):
        self.post = s

    def close(self):
        sys.stderr.write("\r" + " " * (len(self.desc) + 60 + len(self.post)) + "\r")
        sys.stderr.flush()

    @staticmethod
    def write(s):
        print(s, flush=True)


def progress(total, desc):
    if tqdm is not None:
        return tqdm(total=total, desc=desc, leave=False, ncols=90, file=sys.stderr)
    return TextBar(total, desc)


def write(s):
    (tqdm.write if tqdm is not None else TextBar.write)(s)


# --------------------------------------------------------------------------- main
def load_data(seed):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.data / 16.0).astype(DTYPE)               # pixels 0..16 -> 0..1
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(x))
    n_test = len(x) // 5
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def train(name, make_bn, data, args, snap_steps):
    x_tr, y_tr, x_te, y_te = data
    net = MLP([x_tr.shape[1]] + [args.hidden] * 2 + [10], make_bn, args.seed)
    rng = np.random.default_rng(args.seed + 1)       # same batches in every variant
    hist = {"loss": [], "acc": []}
    snaps, step = {}, 0
    n_batches = len(x_tr) // args.batch_size       # drop the last partial batch
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        perm = rng.permutation(len(x_tr))
        bar = progress(n_batches, f"{name:>6} {epoch:3d}/{args.epochs}")
        losses = []
        for b in range(n_batches):
            idx = perm[b * args.batch_size:(b + 1) * args.batch_size]
            losses.append(net.step(x_tr[idx], y_tr[idx], args.lr))
            step += 1
            if step in snap_steps:
                snaps[step] = [p.copy() for p in net.params()]
            bar.set_postfix_str(f"loss={losses[-1]:.4f}")
            bar.update(1)
        bar.close()
        hist["loss"].append(float(np.mean(losses)))
        hist["acc"].append(net.accuracy(x_te, y_te))
        write(f"{name:>6} epoch {epoch:3d}/{args.epochs}  loss {hist['loss'][-1]:.4f}  "
              f"test acc {100 * hist['acc'][-1]:6.2f}%")
    hist["time"] = time.perf_counter() - t0
    hist["bn_time"] = net.bn_time[0] if make_bn is not None else None
    hist["snaps"] = snaps
    hist["final"] = [p.copy() for p in net.params()]
    return hist


def speed(ratio):
    return f"{ratio:.1f}x faster" if ratio >= 1 else f"{1 / ratio:.1f}x SLOWER"


def max_rel_diff(a, b):
    return max(float(np.abs(p - q).max() / max(np.abs(p).max(), 1e-30)) for p, q in zip(a, b))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=2048, help="width of the two hidden layers")
    ap.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, help="threads for bnorm's kernels (default: bnorm's "
                    "own default, or the environment variable BNORM_NUM_THREADS)")
    ap.add_argument("--plot", metavar="PNG", help="save the learning curves to this file")
    args = ap.parse_args(argv)
    if args.threads is not None:
        bnorm.set_num_threads(args.threads)

    data = load_data(args.seed)
    print(f"digits: {len(data[0])} train / {len(data[2])} test, MLP 64-{args.hidden}-"
          f"{args.hidden}-10, SGD lr {args.lr}, batch {args.batch_size}, {args.epochs} epochs, "
          f"float32; bnorm {bnorm.__version__} with {bnorm.get_num_threads()} thread(s), "
          f"NumPy {np.__version__}")
    n_batches = len(data[0]) // args.batch_size
    snap_steps = {1, n_batches}                     # 1 step, 1 epoch
    variants = [("no BN", None), ("post", PostBN), ("bnorm", BnormBN)]
    hists = {name: train(name, make, data, args, snap_steps) for name, make in variants}

    print()
    print(f"{'variant':<8}{'final loss':>12}{'test acc':>10}{'train time':>12}"
          f"{'in BN + ReLU':>15}")
    for name, h in hists.items():
        bn = "-" if h["bn_time"] is None else f"{h['bn_time']:.3f} s"
        print(f"{name:<8}{h['loss'][-1]:>12.4f}{100 * h['acc'][-1]:>9.2f}%{h['time']:>10.2f} s"
              f"{bn:>15}")
    post, bn = hists["post"], hists["bnorm"]
    print(f"\ntime in batch norm + ReLU (forward, backward, evaluation): post's NumPy layer + "
          f"np.maximum {post['bn_time']:.3f} s, bnorm.BatchNorm(activation='relu') "
          f"{bn['bn_time']:.3f} s -> bnorm "
          f"{speed(post['bn_time'] / bn['bn_time'])} "
          f"(of the whole training: {100 * post['bn_time'] / post['time']:.0f}% vs "
          f"{100 * bn['bn_time'] / bn['time']:.0f}%)")
    for s in sorted(snap_steps):
        if s in post["snaps"]:
            print(f"max relative parameter difference post vs bnorm after {s:3d} step(s): "
                  f"{max_rel_diff(post['snaps'][s], bn['snaps'][s]):.1e}")
    print(f"max relative parameter difference post vs bnorm at the end ({args.epochs * n_batches}"
          f" steps): {max_rel_diff(post['final'], bn['final']):.1e}")
    print("  (float32 rounding differences, a few ulps per step, stay that small until a ReLU\n"
          "   input near zero lands on different sides in the two runs; after that the runs drift\n"
          "   apart like any float32 run drifts from its float64 twin)")
    same = post["acc"] == bn["acc"]
    print("test accuracy per epoch, post vs bnorm: " + ("identical" if same else
          "differs: " + ", ".join(f"{a:.4f}/{b:.4f}" for a, b in zip(post["acc"], bn["acc"])
                                  if a != b)))

    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        epochs = np.arange(1, args.epochs + 1)
        styles = {"no BN": "-", "post": "-", "bnorm": "--"}
        for name, h in hists.items():
            ax1.plot(epochs, h["loss"], styles[name], label=name)
            ax2.plot(epochs, 100 * np.array(h["acc"]), styles[name], label=name)
        ax1.set(xlabel="epoch", ylabel="training loss", yscale="log", title="loss")
        ax2.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
        for ax in (ax1, ax2):
            ax.legend()
            ax.grid(alpha=0.3)
        fig.suptitle(f"digits, MLP 64-{args.hidden}-{args.hidden}-10, SGD; "
                     f"'post' and 'bnorm' overlap")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"learning curves written to {args.plot}")


if __name__ == "__main__":
    main()
