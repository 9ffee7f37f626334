"""Semantic segmentation with U-Tuning: the classifier's frozen ViT, tuners and checkpoint formats, a dense head.

image (B, 3, H, W) -> ViT blocks with their tuners (one pass, :meth:`~..backbone.vit.VisionTransformer.
forward_intermediates`) -> patch tokens of the head's layers as maps (B, C, H/p, W/p) -> :mod:`.heads` (BN + 1x1
conv) -> logits (B, K, H/p, W/p) -> bilinear upsampling to each image's own size -> argmax: class ids (H, W).

Registered with ModelScope as ``vision-efficient-tuning-segmentation`` (model type, pipeline, trainer) for the
task ``semantic-segmentation``; metric ``vision-efficient-tuning-miou`` (mIoU, per-class IoU, pixel accuracy).
"""
