"""dinolite: DINO, DINOv2 and DINOv3 built component by component.

Modules: models (ViT), hub (official checkpoints), data (multi-crop, datasets), masking (iBOT
masks and collate), heads, centering, losses, schedules, ema, train, eval, viz.
"""
__version__ = "0.1.0"
