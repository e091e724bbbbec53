"""slidestream models: timm backbones with safe weight loading, SSL heads and losses (DINO,
SimCLR), tensor augmentations, MIL heads, segmentation networks and losses.

``models`` depends on torch and timm only: it never imports ``wsi`` or ``pipelines``."""
