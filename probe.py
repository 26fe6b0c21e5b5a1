"""The probe: do the frozen encoder's features already tell a labelled set's classes apart?

The pretraining loss says how well the model paints hidden cubes, a poor judge of what it learned. The probe is
the usual second opinion (MAE's linear probe, DINO's k-NN, V-JEPA's attentive probe), cheap enough to run every
few epochs of pretraining (train_pretrain.py --probe_every) and in every study run (study.py).

The frozen encoder runs on every token of each clip of a small labelled set (centre window and crop; the clips
kept in memory when they are few, the tokens (V, N, D) on the device). Three classifiers score them by k-fold
cross-validation: every clip is scored once by a classifier fitted on the other folds, and the set needs no split.

- linear (`probe_acc1`): ridge least squares onto one-hot labels, on standardised features; one solve per fold.
- k-NN (`probe_knn_acc1`): the k = 20 nearest clips of the other folds by cosine similarity vote, each with
  weight exp(similarity / 0.07) (DINO's rule).
- attentive (`probe_attentive_acc1`): one learned query reads the tokens themselves through one cross-attention
  block, then an MLP and a linear head, trained by AdamW (300 steps per fold from a fixed seed: the same tokens
  give the same score on the same machine and thread count). It can weight the cubes where the moving shape is.

The first two read one vector per clip. The default pooling, "slots", concatenates each temporal slot's mean
token in time order (T'·D values): mean pooling over all tokens as the classifier does ("mean", D values) throws
the order of time away, and the built-in labels are directions of motion.
"""
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import engine

POOLINGS = ("slots", "mean")
NUM_FOLDS = 4
CACHE_BYTES = 2 ** 30  # keep the decoded clips in memory when they take at most this


def pool(tokens: torch.Tensor, num_slots: int, pooling: str = "slots") -> torch.Tensor:
    """(B, N, D) encoder tokens, slot-major (the grid's order) -> (B, num_slots·D) with "slots", (B, D) with "mean"."""
    if pooling == "mean":
        return tokens.mean(dim=1)
    if pooling == "slots":
        return tokens.unflatten(1, (num_slots, -1)).mean(dim=2).flatten(1)  # (B, T', N/T', D) -> (B, T'·D)
    raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")


# -----------------------------------------------------------------------------------------------------
# Classifiers, scored by cross-validation


def folds(n: int, num_folds: int = NUM_FOLDS, seed: int = 0) -> list[torch.Tensor]:
    """A fixed random partition of range(n) into num_folds index sets (the same every time it is asked)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [order[i::num_folds] for i in range(num_folds)]


def cross_validate(predict, x: torch.Tensor, y: torch.Tensor, num_folds: int = NUM_FOLDS) -> float:
    """Top-1 % of predict(train_x, train_y, test_x) -> test labels, each fold scored by the others."""
    hits = 0
    for test in folds(len(x), num_folds):
        train = torch.ones(len(x), dtype=torch.bool)
        train[test] = False
        hits += int((predict(x[train], y[train], x[test]) == y[test]).sum())
    return 100 * hits / len(x)


def linear_predict(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                   ridge: float = 1e-2) -> torch.Tensor:
    """Ridge regression onto one-hot labels (standardised features, a bias), argmax of its outputs.
    `ridge` is relative to the features' own scale: λ = ridge · (mean squared feature) · clips."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    a = F.pad((train_x - mean) / std, (0, 1), value=1.0).double()  # (n, F + 1), the last column the bias
    targets = F.one_hot(train_y, int(train_y.max()) + 1).double()  # (n, K)
    gram = a.T @ a  # (F + 1, F + 1)
    gram.diagonal()[:-1] += ridge * len(a)  # features standardised: mean square 1 (the bias is not shrunk)
    weights = torch.linalg.solve(gram, a.T @ targets)  # (F + 1, K)
    test = F.pad((test_x - mean) / std, (0, 1), value=1.0).double()
    return (test @ weights).argmax(1)


def knn_predict(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, k: int = 20,
                temperature: float = 0.07) -> torch.Tensor:
    """Weighted k-nearest-neighbour vote by cosine similarity (DINO's rule)."""
    similarity = F.normalize(test_x, dim=1) @ F.normalize(train_x, dim=1).T  # (m, n)
    top, index = similarity.topk(min(k, len(train_x)), dim=1)  # (m, k)
    votes = torch.zeros(len(test_x), int(train_y.max()) + 1, dtype=top.dtype)
    votes.scatter_add_(1, train_y[index], (top / temperature).exp())
    return votes.argmax(1)


class AttentiveProbe(nn.Module):
    """One cross-attention block with a single learned query over a clip's tokens, then an MLP and a linear head.
    With one query, head h's attention logits are linear in the tokens, x·u_h (u_h: the query through the key
    projection, scaled), and the block's output is one linear map of the heads' softmax-weighted token means
    (value and output projections folded, the query in its bias): each head learns where to look, at N·D per clip."""

    def __init__(self, dim: int, num_classes: int, num_heads: int = 4):
        super().__init__()
        self.logits = nn.Linear(dim, num_heads, bias=False)  # u_h; zero at start: every head a plain mean
        nn.init.zeros_(self.logits.weight)
        self.values = nn.Linear(num_heads * dim, dim)  # the heads' weighted means -> the updated query
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) standardised tokens -> (B, num_classes)
        weights = self.logits(x).softmax(dim=1)  # (B, N, H): each head's attention over the tokens
        read = self.values((weights.transpose(1, 2) @ x).flatten(1))  # (B, H, D) -> (B, D)
        return self.head(read + self.mlp(read))


def attentive_predict(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, steps: int = 300,
                      batch_size: int = 128, lr: float = 2e-3, weight_decay: float = 0.05,
                      seed: int = 0) -> torch.Tensor:
    """An AttentiveProbe fitted to train tokens (n, N, D) by AdamW in float32 on their device, from `seed` alone
    (the global random state untouched); argmax on test tokens (m, N, D). Tokens are standardised per channel by the
    train tokens' statistics: under their large common part a per-token layer norm leaves too little to train on."""
    flat = train_x.flatten(0, 1).float()  # (n·N, D)
    mean, std = flat.mean(0), flat.std(0) + 1e-6

    def standardised(x):
        return (x.float() - mean) / std
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        torch.manual_seed(seed)
        model = AttentiveProbe(train_x.shape[-1], int(train_y.max()) + 1).to(train_x.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        for batch in torch.randint(len(train_x), (steps, batch_size)).to(train_x.device):
            loss = F.cross_entropy(model(standardised(train_x[batch])), train_y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        return torch.cat([model(standardised(x)).argmax(1) for x in test_x.split(batch_size)])


NAMES = {"probe_acc1": "linear", "probe_knn_acc1": "k-NN", "probe_attentive_acc1": "attentive"}  # scores' keys


def at_start(key: str) -> str:
    """The log.txt key of a score of the random encoder a run starts from: probe_acc1 -> probe_init_acc1."""
    return key.replace("probe_", "probe_init_", 1)


def scores(tokens: torch.Tensor, y: torch.Tensor, num_slots: int, pooling: str = "slots") -> dict:
    """Cross-validated top-1 %: probe_acc1 (linear) and probe_knn_acc1 of pooled tokens, probe_attentive_acc1 of all."""
    x = torch.cat([pool(t.float(), num_slots, pooling).cpu() for t in tokens.split(256)])  # (V, F)
    return dict(probe_acc1=cross_validate(linear_predict, x, y), probe_knn_acc1=cross_validate(knn_predict, x, y),
                probe_attentive_acc1=cross_validate(attentive_predict, tokens, y.to(tokens.device)))


def reading(now: dict, start: dict, margin: float = 2.0) -> str:
    """One line: the probes on which the encoder now beats the random encoder it started from (`start`: the
    probe_init_* scores) by more than `margin` points of top-1, or that it beats it on none."""
    above = [name for key, name in NAMES.items() if now[key] > start[at_start(key)] + margin]
    return (f"probe: above the random encoder it started from on {', '.join(above)}" if above else "probe: not above "
            "the random encoder it started from on any probe: these frozen features do not show what pretraining "
            "learned (early in pretraining they seldom do; fine-tuning does: docs/study.md)")


# -----------------------------------------------------------------------------------------------------
# The frozen encoder on a labelled set


def encoder_of(model: torch.nn.Module):
    """clips (B, 3, T, H, W) -> tokens (B, N, D) of every cube, from a pretraining model as the trainer holds it
    (plain, compiled, DDP; under FSDP, `encode` registered as a forward method: every process must take part)."""
    raw = model.module if isinstance(model, DDP) else model
    if not hasattr(raw.encode, "__wrapped__"):  # registered once; a no-op for a model that is not FSDP's
        from torch.distributed.fsdp import register_fsdp_forward_method
        register_fsdp_forward_method(raw, "encode")
    return raw.encode


class Probe:
    """A labelled set and how to score an encoder on it. Call it with a pretraining model (any wrapping)."""

    def __init__(self, dataset: data.FinetuneDataset, batch_size: int = 64, pooling: str = "slots",
                 num_workers: int = 0, tubelet_size: int = 2):
        pool(torch.zeros(1, 2, 1), 1, pooling)  # a bad pooling name fails here, not after an epoch
        self.dataset, self.batch_size, self.pooling, self.num_workers = dataset, batch_size, pooling, num_workers
        self.num_slots = dataset.num_frames // tubelet_size
        self._cache = None  # [(clips, labels)] once read, if small enough

    def batches(self):
        """(clips, labels) batches: decoded once and kept if all fit in CACHE_BYTES, else streamed at every probe."""
        if self._cache is not None:
            yield from self._cache
            return
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                                             worker_init_fn=data.ignore_stop_signals)
        kept, size = [], 0
        for clips, labels in loader:
            batch = (clips, torch.as_tensor(labels))
            size += clips.nbytes
            if size <= CACHE_BYTES:
                kept.append(batch)
            else:
                kept.clear()  # too large to keep: this probe streams, and so will the next
            yield batch
        if size <= CACHE_BYTES:
            self._cache = kept

    @torch.no_grad()
    def features(self, model: torch.nn.Module, device: torch.device, precision: str = "fp32"):
        """(tokens (V, N, D) on the device, as the encoder gives them under `precision`; labels (V,)) of the set."""
        xs, ys = [], []
        encode, was_training = encoder_of(model), model.training
        model.eval()
        for clips, labels in self.batches():
            with engine.autocast(device, precision):
                xs.append(encode(clips.to(device, non_blocking=True)))  # (B, N, D)
            ys.append(labels)
        model.train(was_training)
        return torch.cat(xs), torch.cat(ys)

    def __call__(self, model: torch.nn.Module, device: torch.device, precision: str = "fp32") -> dict:
        """probe_acc1, probe_knn_acc1, probe_attentive_acc1 and probe_time_s (features and fits, wall clock)."""
        start = time.time()
        result = scores(*self.features(model, device, precision), self.num_slots, self.pooling)
        return dict(**result, probe_time_s=round(time.time() - start, 2))


def build_probe(list_file: str | None, data_root: str = "", *, num_frames: int, sampling_rate: int,
                input_size: int, tubelet_size: int = 2, fname_tmpl: str = "img_{:05}.jpg", synthetic_videos: int = 512,
                first_index: int = 0, batch_size: int = 64, pooling: str = "slots", num_workers: int = 0,
                share: data.Share = data.Share()) -> Probe:
    """The probe on list_file's labelled clips (`path label` or `frame_dir total_frames label` lines), or on
    synthetic_videos built-in videos from first_index on (share: the processes that split checking the
    files). Raises ListError for a set it cannot score."""
    dataset = data.labelled_clips(list_file, data_root, num_frames=num_frames, sampling_rate=sampling_rate,
                                  input_size=input_size, fname_tmpl=fname_tmpl, synthetic_videos=synthetic_videos,
                                  first_index=first_index, share=share)
    labels = [dataset.source.label(i) for i in range(len(dataset.source))]
    where = list_file or "the built-in probe set"
    if min(labels) < 0:
        raise data.ListError(f"{where}: the probe needs a label (0 or more) on every line")
    if len(set(labels)) < 2 or len(labels) < 2 * NUM_FOLDS:
        raise data.ListError(f"{where}: the probe needs at least two classes and {2 * NUM_FOLDS} clips, got "
                             f"{len(set(labels))} classes in {len(labels)} clips")
    return Probe(dataset, batch_size, pooling, num_workers, tubelet_size)
