"""Self-supervised pretraining of a torchvision ResNet on unlabelled images: SimSiam and MoCo v2.

* **SimSiam** (Chen & He, CVPR 2021): two augmented views, a projector MLP and a predictor MLP; the loss is
  the symmetrised negative cosine similarity between one view's prediction and the other view's projection,
  with a stop-gradient on the projection. No negatives, no momentum encoder, small batches work.
* **MoCo v2** (Chen et al., 2020): a query encoder trained with InfoNCE against keys from a momentum (EMA)
  copy of itself and a queue of past keys as negatives; MLP projection head, temperature 0.2. Multi-GPU
  "shuffle BN" is emulated on one device by encoding the keys in shuffled sub-batches, so BatchNorm
  statistics cannot leak which key belongs to which query.

The encoder is a torchvision ResNet (built by :func:`wsss.models.backbone.load_torchvision_resnet`) with
``fc`` replaced by an identity, so ``model.encoder.state_dict()`` is a torchvision ResNet state_dict without
``fc`` keys: exactly what ``Classifier``/``CCAM`` (``weights=<path>``) and smp's ResNet encoders load.
"""

from __future__ import annotations

import abc
import copy
import math
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.utils.data import Dataset
from torchvision.transforms import v2

from wsss.config import PretrainConfig
from wsss.data.datasets import IMAGENET_MEAN, IMAGENET_STD, load_rgb
from wsss.errors import ConfigError
from wsss.models.backbone import load_torchvision_resnet, make_output_stride_16
from wsss.training.distributed import all_gather_cat

SSL_METHODS = ("simsiam", "mocov2")


# --------------------------------------------------------------------------------------------------
# augmentation


def view_transform(
    size: int,
    crop_scale_min: float = 0.2,
    jitter: float = 0.4,
    jitter_prob: float = 0.8,
    grayscale_prob: float = 0.2,
    blur_prob: float = 0.5,
) -> v2.Compose:
    """One random view: resized crop, flip, colour jitter, grayscale, Gaussian blur, then ImageNet normalisation.

    The blur kernel is ~10% of the view's side and its sigma range (0.1-2.0 at 224 px, as in SimCLR/MoCo v2)
    scales with ``size``, so small inputs are not blurred out of recognition.

    Args:
        size: side of the square view.
        crop_scale_min: smallest crop area as a fraction of the image.
        jitter: brightness / contrast / saturation strength (hue gets a quarter of it).
        jitter_prob, grayscale_prob, blur_prob: probabilities of those augmentations.
    """
    kernel = 2 * max(1, round(0.05 * size)) + 1
    sigma_max = max(0.2, 2.0 * size / 224)
    return v2.Compose([
        v2.PILToTensor(),
        v2.RandomResizedCrop(size, scale=(crop_scale_min, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(jitter, jitter, jitter, min(0.5, jitter / 4))], p=jitter_prob),
        v2.RandomGrayscale(p=grayscale_prob),
        v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, sigma_max))], p=blur_prob),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


class TwoViews:
    """Apply the same random transform twice: a positive pair of views of one image."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, img: object) -> tuple[Tensor, Tensor]:
        return self.transform(img), self.transform(img)


class UnlabelledImages(Dataset):
    """Manifest rows as pairs of augmented views (labels are never read)."""

    def __init__(self, df: pd.DataFrame, prepared_dir: Path, transform: Callable) -> None:
        self.paths = [str(p) for p in df["image_path"]]
        self.prepared_dir = Path(prepared_dir)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.transform(load_rgb(self.prepared_dir, self.paths[i]))


# --------------------------------------------------------------------------------------------------
# encoders and heads


def build_encoder(arch: str, init: str = "none", output_stride: int = 32) -> tuple[torchvision.models.ResNet, int]:
    """A torchvision ResNet whose ``forward`` returns globally pooled features (``fc`` is an identity).

    Args:
        arch: ResNet name (``resnet18`` ... ``resnet101``).
        init: ``none`` (random) or ``imagenet`` (continue from torchvision's ImageNet weights).
        output_stride: 32 (torchvision) or 16 (layer4 stride 1, as the CAM/CCAM backbones use it).

    Returns:
        ``(encoder, feature_dim)``.
    """
    if output_stride not in (16, 32):
        raise ConfigError(f"pretrain.output_stride must be 16 or 32, got {output_stride}")
    net = load_torchvision_resnet(arch, init)
    dim = net.fc.in_features
    net.fc = nn.Identity()
    if output_stride == 16:
        make_output_stride_16(net)
    return net, dim


def _mlp(dims: list[int], last_bn: bool, last_bn_affine: bool = True) -> nn.Sequential:
    """Linear layers with BN + ReLU between them (bias only where no BN follows)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        last = i == len(dims) - 2
        bn = not last or last_bn
        layers.append(nn.Linear(a, b, bias=not bn))
        if bn:
            layers.append(nn.BatchNorm1d(b, affine=last_bn_affine if last else True))
        if not last:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class SSLModel(nn.Module, abc.ABC):
    """Common interface of the methods: ``loss(x1, x2)``, ``after_step()``, ``features(x)``, ``param_groups``.

    ``forward(x1, x2)`` is ``loss(x1, x2)``, so a ``DistributedDataParallel`` wrapper (which synchronises
    gradients of what its ``forward`` computed) trains any method unchanged.
    """

    encoder: nn.Module
    #: Convert BatchNorm to SyncBatchNorm when training data-parallel on GPUs (SimSiam's recipe).
    sync_batchnorm: bool = False

    def forward(self, x1: Tensor, x2: Tensor) -> Tensor:
        return self.loss(x1, x2)

    @abc.abstractmethod
    def loss(self, x1: Tensor, x2: Tensor) -> Tensor:
        """The training loss of a batch of view pairs (float32 scalar)."""

    def after_step(self) -> None:
        """Called after each optimizer step (momentum encoders update here)."""

    def features(self, x: Tensor) -> Tensor:
        """Pooled backbone features (B, C) used by the k-NN probe and by downstream stages."""
        return self.encoder(x)

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        """Optimizer groups; a group with ``fixed_lr: True`` is kept at ``lr`` by the schedule."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr,
                 "weight_decay": weight_decay, "fixed_lr": False}]


class SimSiam(SSLModel):
    """SimSiam: encoder -> projector (3 layers, last BN without affine) -> predictor (bottleneck MLP).

    Args:
        encoder: pooled-feature encoder (:func:`build_encoder`).
        feat_dim: its output width.
        proj_dim: projector width and output dimension.
        pred_dim: predictor bottleneck width.
        fix_pred_lr: keep the predictor at the base learning rate (the paper's recommendation).
    """

    sync_batchnorm = True

    def __init__(self, encoder: nn.Module, feat_dim: int, proj_dim: int = 2048, pred_dim: int = 512,
                 fix_pred_lr: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = _mlp([feat_dim, proj_dim, proj_dim, proj_dim], last_bn=True, last_bn_affine=False)
        self.predictor = _mlp([proj_dim, pred_dim, proj_dim], last_bn=False)
        self.fix_pred_lr = fix_pred_lr

    def loss(self, x1: Tensor, x2: Tensor) -> Tensor:
        """Symmetrised negative cosine similarity, in [-1, 1] (-1: perfectly aligned views)."""
        z = self.projector(self.encoder(torch.cat([x1, x2])))
        p = self.predictor(z)
        z, p = z.float(), p.float()
        z1, z2 = z.detach().chunk(2)
        p1, p2 = p.chunk(2)
        # The stop-gradient on z is what prevents the collapse to a constant (the paper's key finding).
        return -0.5 * (F.cosine_similarity(p1, z2, dim=1).mean() + F.cosine_similarity(p2, z1, dim=1).mean())

    def param_groups(self, lr: float, weight_decay: float) -> list[dict]:
        pred = list(self.predictor.parameters())
        pred_ids = {id(p) for p in pred}
        rest = [p for p in self.parameters() if id(p) not in pred_ids]
        return [{"params": rest, "lr": lr, "weight_decay": weight_decay, "fixed_lr": False},
                {"params": pred, "lr": lr, "weight_decay": weight_decay, "fixed_lr": self.fix_pred_lr}]


class MoCoV2(SSLModel):
    """MoCo v2: query encoder + MLP head, momentum key encoder, a queue of negative keys, InfoNCE.

    The queue and its pointer are buffers, so they are part of ``state_dict`` and a resumed run continues
    with the same negatives. The loss is symmetrised (each view is once the query, once the key). Trained
    data-parallel, every rank enqueues the keys of all ranks (rank order), so the queues stay identical;
    shuffle BN stays per process, over shuffled sub-batches of that rank's keys.

    Args:
        encoder: pooled-feature encoder (:func:`build_encoder`).
        feat_dim: its output width.
        dim: embedding dimension of the head's output.
        queue_size: number of negative keys kept.
        temperature: InfoNCE temperature.
        ema: momentum of the key encoder (``k <- ema * k + (1 - ema) * q``).
        bn_splits: keys are encoded in this many shuffled sub-batches (single-device shuffle BN).
    """

    def __init__(self, encoder: nn.Module, feat_dim: int, dim: int = 128, queue_size: int = 4096,
                 temperature: float = 0.2, ema: float = 0.99, bn_splits: int = 2) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = _mlp([feat_dim, feat_dim, dim], last_bn=False)
        self.key_encoder = copy.deepcopy(encoder)
        self.key_projector = copy.deepcopy(self.projector)
        for p in (*self.key_encoder.parameters(), *self.key_projector.parameters()):
            p.requires_grad_(False)
        self.temperature = temperature
        self.ema = ema
        self.bn_splits = bn_splits
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def _query(self, x: Tensor) -> Tensor:
        return F.normalize(self.projector(self.encoder(x)).float(), dim=1)

    @torch.no_grad()
    def _keys(self, x: Tensor) -> Tensor:
        """Keys of ``x`` (both views stacked), BN statistics taken over shuffled sub-batches."""
        n = x.shape[0]
        perm = torch.randperm(n, device=x.device)
        chunks = max(1, min(self.bn_splits, n // 2))
        out = torch.cat([self.key_projector(self.key_encoder(c)) for c in x[perm].chunk(chunks)])
        keys = torch.empty_like(out)
        keys[perm] = out  # undo the shuffle
        return F.normalize(keys.float(), dim=1)

    @torch.no_grad()
    def momentum_update(self) -> None:
        """Move the key encoder and head towards the query ones (EMA); buffers (BN statistics) are copied."""
        online = [*self.encoder.parameters(), *self.projector.parameters()]
        target = [*self.key_encoder.parameters(), *self.key_projector.parameters()]
        # k <- k + (1 - ema) (q - k), one fused kernel over all tensors instead of two ops per tensor.
        torch._foreach_lerp_(target, online, 1.0 - self.ema)
        for src, dst in ((self.encoder, self.key_encoder), (self.projector, self.key_projector)):
            for q, k in zip(src.buffers(), dst.buffers(), strict=True):
                k.copy_(q)

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Replace the oldest entries of the queue by ``keys`` (a ring buffer)."""
        size, n, ptr = self.queue.shape[0], keys.shape[0], int(self.queue_ptr)
        # As if written one by one: with more keys than slots only the last `size` survive.
        skip = max(0, n - size)
        idx = (ptr + skip + torch.arange(n - skip, device=keys.device)) % size
        self.queue[idx] = keys[skip:].to(self.queue.dtype)
        self.queue_ptr.fill_((ptr + n) % size)

    def _info_nce(self, q: Tensor, k: Tensor) -> Tensor:
        pos = (q * k).sum(dim=1, keepdim=True)
        neg = q @ self.queue.detach().clone().T
        logits = torch.cat([pos, neg], dim=1) / self.temperature
        return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long, device=q.device))

    def loss(self, x1: Tensor, x2: Tensor, update_queue: bool = True) -> Tensor:
        """Symmetrised InfoNCE; with ``update_queue`` the batch's keys then enter the queue.

        ``update_queue=False`` keeps the objective fixed (used to check that optimisation lowers it).
        """
        both = torch.cat([x1, x2])
        q1, q2 = self._query(both).chunk(2)
        k1, k2 = self._keys(both).chunk(2)
        loss = 0.5 * (self._info_nce(q1, k2) + self._info_nce(q2, k1))
        if update_queue and self.training:
            self.enqueue(all_gather_cat(torch.cat([k1, k2])))
        return loss

    def after_step(self) -> None:
        self.momentum_update()


def build_ssl_model(cfg: PretrainConfig) -> SSLModel:
    """The model described by the ``pretrain`` params section."""
    encoder, dim = build_encoder(cfg.arch, cfg.init, cfg.output_stride)
    if cfg.method == "simsiam":
        s = cfg.simsiam
        return SimSiam(encoder, dim, s.proj_dim, s.pred_dim, s.fix_pred_lr)
    if cfg.method == "mocov2":
        m = cfg.mocov2
        return MoCoV2(encoder, dim, m.dim, m.queue_size, m.temperature, m.ema, m.bn_splits)
    raise ConfigError(f"pretrain.method {cfg.method!r}; valid: {', '.join(SSL_METHODS)}")


def lr_lambdas(groups: list[dict], epochs: int, warmup_epochs: int) -> list[Callable[[int], float]]:
    """Per-group LambdaLR factors: linear warmup then cosine to 0, or a constant 1 for ``fixed_lr`` groups."""

    def cosine(epoch: int) -> float:
        if epoch < warmup_epochs:
            return (epoch + 1) / (warmup_epochs + 1)
        span = max(1, epochs - warmup_epochs)
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / span))

    return [(lambda _e: 1.0) if g.get("fixed_lr") else cosine for g in groups]


# --------------------------------------------------------------------------------------------------
# k-NN probe


def knn_predict(bank: Tensor, bank_labels: Tensor, queries: Tensor | None, k: int, num_classes: int,
                temperature: float = 0.07) -> Tensor:
    """Weighted k-NN classification on L2-normalised features (Wu et al., 2018).

    Each of the ``k`` most cosine-similar bank features votes for its label with weight
    ``exp(similarity / temperature)``.

    Args:
        bank: (N, C) features of labelled images; bank_labels: (N,) class indices in ``[0, num_classes)``.
        queries: (M, C) features to classify; ``None`` classifies the bank itself leave-one-out (each image
            by its neighbours other than itself).

    Returns:
        (M,) predicted class indices.
    """
    if bank.shape[0] == 0:
        raise ValueError("k-NN probe needs at least one labelled bank image")
    bank = F.normalize(bank.float(), dim=1)
    if queries is None:
        if bank.shape[0] < 2:
            raise ValueError("a leave-one-out k-NN probe needs at least two labelled images")
        sims = bank @ bank.T
        sims.fill_diagonal_(-math.inf)
        queries, k = bank, min(k, bank.shape[0] - 1)
    else:
        queries = F.normalize(queries.float(), dim=1)
        sims, k = queries @ bank.T, min(k, bank.shape[0])
    sim, idx = sims.topk(k, dim=1)
    votes = torch.zeros(queries.shape[0], num_classes, device=queries.device)
    votes.scatter_add_(1, bank_labels.to(queries.device)[idx], (sim / temperature).exp())
    return votes.argmax(dim=1)
