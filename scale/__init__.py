"""scale/: the dinolite code at ViT-g/14 and ViT-7B/16 size (FSDP2, DCP checkpoints, torchrun and SLURM launchers).

It imports dinolite; dinolite never imports it. See scale/README.md.
"""
