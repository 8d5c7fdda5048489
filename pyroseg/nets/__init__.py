"""Plain PyTorch building blocks shared by every model (no Pyro in here)."""

from pyroseg.nets.blocks import (
    POSTERIOR_INIT_SCALE,
    ConvBlock,
    Decoder,
    DiagGaussianHead,
    Encoder,
    ResBlock,
    UNet,
    check_image_size,
    compile_networks,
    init_mask_logits,
    num_params,
    pyramid,
)

__all__ = [
    "POSTERIOR_INIT_SCALE",
    "ConvBlock",
    "Decoder",
    "DiagGaussianHead",
    "Encoder",
    "ResBlock",
    "UNet",
    "check_image_size",
    "compile_networks",
    "init_mask_logits",
    "num_params",
    "pyramid",
]
