"""Flax modules for sparse tensors: conv layers, masked batch norm, blocks, backbones."""

from jaxcluster.nn.blocks import ConvBlock, NormActivation, ResidualBlock
from jaxcluster.nn.layers import (DownConv, Linear, SubmanifoldConv, UpConv, concatenate,
                                  leaky_relu)
from jaxcluster.nn.norm import BatchNorm
from jaxcluster.nn.uresnet import UResNet, UResNetDecoder, UResNetEncoder, level_planes

__all__ = ["BatchNorm", "ConvBlock", "DownConv", "Linear", "NormActivation", "ResidualBlock",
           "SubmanifoldConv", "UResNet", "UResNetDecoder", "UResNetEncoder", "UpConv",
           "concatenate", "leaky_relu", "level_planes"]
