"""Backends turn a float model plus calibration data into a calibrated quantized model.

A backend only sees data (a loader, a tensor or a SyntheticDataset); it never knows which
synthesizer made it.
"""
