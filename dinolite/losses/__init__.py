"""The pre-training objectives: DINO ([CLS] self-distillation), iBOT (masked patches), KoLeo, Gram anchoring."""
from dinolite.losses.dino import DINOLoss
from dinolite.losses.gram import gram_loss
from dinolite.losses.ibot import IBOTPatchLoss
from dinolite.losses.koleo import KoLeoLoss, koleo_loss

__all__ = ["DINOLoss", "IBOTPatchLoss", "KoLeoLoss", "gram_loss", "koleo_loss"]
