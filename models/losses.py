"""Detection losses: sigmoid focal loss (classification) and 1-D DIoU (regression)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Element-wise focal loss (RetinaNet); same shape as ``logits``."""
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


def diou_loss_1d(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """1 - IoU + (centre distance / enclosing length)^2 for (start, end) distances from one point.

    pred, target: (N, 2) non-negative distances to start and end (same units). Returns (N,).
    """
    pl, pr = pred[:, 0], pred[:, 1]
    tl, tr = target[:, 0], target[:, 1]
    inter = torch.minimum(pl, tl) + torch.minimum(pr, tr)
    union = pl + pr + tl + tr - inter
    iou = inter / union.clamp(min=eps)
    enclosing = torch.maximum(pl, tl) + torch.maximum(pr, tr)
    rho = 0.5 * ((pr - pl) - (tr - tl))
    return 1.0 - iou + (rho / enclosing.clamp(min=eps)) ** 2


class DetectionLoss:
    """Focal + DIoU, both normalised by an EMA of the positive count (as in ActionFormer)."""

    def __init__(
        self,
        reg_weight: float = 1.0,
        label_smoothing: float = 0.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        init_norm: float = 100.0,
        norm_momentum: float = 0.9,
    ) -> None:
        self.reg_weight = reg_weight
        self.label_smoothing = label_smoothing
        self.alpha, self.gamma = focal_alpha, focal_gamma
        self.norm = init_norm
        self.momentum = norm_momentum

    def __call__(
        self,
        cls_logits: torch.Tensor,  # (B, N, C)
        offsets: torch.Tensor,  # (B, N, 2) level-stride units
        cls_targets: torch.Tensor,  # (B, N, C)
        reg_targets: torch.Tensor,  # (B, N, 2)
        pos: torch.Tensor,  # (B, N) bool
        weight: torch.Tensor,  # (B, N)
    ) -> dict[str, torch.Tensor]:
        num_pos = int(pos.sum().item())
        self.norm = self.momentum * self.norm + (1 - self.momentum) * max(num_pos, 1)
        targets = cls_targets
        if self.label_smoothing > 0:
            num_classes = targets.shape[-1]
            targets = targets * (1 - self.label_smoothing) + self.label_smoothing / (num_classes + 1)
        focal = sigmoid_focal_loss(cls_logits, targets, self.alpha, self.gamma).sum(-1)
        cls_loss = (focal * weight).sum() / self.norm
        # With no positives the regression term is a zero that still touches the graph.
        reg_loss = diou_loss_1d(offsets[pos], reg_targets[pos]).sum() / self.norm if num_pos else offsets.sum() * 0.0
        total = cls_loss + self.reg_weight * reg_loss
        return {"loss": total, "cls": cls_loss.detach(), "reg": reg_loss.detach()}
