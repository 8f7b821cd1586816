"""The pre-training objectives: DINO ([CLS] self-distillation), iBOT (masked patches), KoLeo."""
from dinolite.losses.dino import DINOLoss
from dinolite.losses.ibot import IBOTPatchLoss
from dinolite.losses.koleo import KoLeoLoss, koleo_loss

__all__ = ["DINOLoss", "IBOTPatchLoss", "KoLeoLoss", "koleo_loss"]
