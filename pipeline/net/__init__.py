"""The network: the CNN family, augmentation layers, precision and device placement, calibration."""
