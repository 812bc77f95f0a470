"""nn.Modules: the GSSM mixer, the GMamba residual block, release-checkpoint loading, and helpers that plug
GMamba blocks into CNN backbones (torchvision ResNet / ConvNeXt) and a small segmentation UNet."""
from .block import GMambaBlock
from .checkpoint import load_release_state_dict
from .gssm_module import GSSM, weight_decay_groups
from .surgery import CONVNEXT_STAGES, RESNET_STAGES, insert_gmamba_blocks
from .unet import UNET_POSITIONS, GMambaUNet

__all__ = ["GSSM", "GMambaBlock", "load_release_state_dict", "insert_gmamba_blocks", "RESNET_STAGES",
           "CONVNEXT_STAGES", "GMambaUNet", "UNET_POSITIONS", "weight_decay_groups"]
