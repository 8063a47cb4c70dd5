"""transfer-study: train a CNN from scratch or transfer an ImageNet-pretrained one?"""

__version__ = "0.1.0"
