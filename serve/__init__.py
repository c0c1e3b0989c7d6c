"""Serving side of whatcar: score posted car photos with a TorchScript artifact.

Imports torch, Pillow, Falcon and Waitress only; fastai, torchvision and timm never load here.
"""
