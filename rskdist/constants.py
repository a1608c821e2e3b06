"""Constants more than one package needs (and that must not drift apart)."""

# Per-channel RGB mean and std of ImageNet, the normalisation of most pretrained weights;
# weights that were trained otherwise carry their own (timm's pretrained_cfg, open_clip).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
