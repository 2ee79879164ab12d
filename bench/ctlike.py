"""CT-like DICOM files for the benchmark: 16-bit pixels with anatomy-like smooth structure
and scanner noise, so deflate behaves as it does on real CT (random bytes do not compress,
constant bytes compress absurdly well)."""

import os

import numpy as np

SIZE = 512                      # pixels per side, as most CT slices
HEADER = b"\0" * 128 + b"DICM"  # preamble and magic; the rest of a header is noise here


def ct_slice(z, rng):
    """One axial slice as stored: unsigned 16-bit, HU + 1024, little-endian."""
    y, x = np.mgrid[-1:1:SIZE * 1j, -1:1:SIZE * 1j]
    hu = np.full((SIZE, SIZE), -1000.0)                      # air around the patient
    body = (x / 0.85) ** 2 + (y / (0.62 + 0.05 * np.sin(z / 40))) ** 2 < 1
    hu[body] = 40 + 15 * np.sin(3 * x[body] + z / 25)        # soft tissue, smooth
    for side in (-0.4, 0.4):                                  # lungs
        lung = ((x - side) / 0.28) ** 2 + (y / 0.38) ** 2 < 1
        hu[lung] = -820 + 40 * np.cos(5 * y[lung])
    spine = (x / 0.09) ** 2 + ((y - 0.42) / 0.09) ** 2 < 1   # bone
    hu[spine] = 700 + 200 * np.cos(20 * x[spine])
    table = (y > 0.8) & (y < 0.84)                             # the table
    hu[table] = 300
    hu += rng.normal(0, 12, hu.shape)                         # quantum noise
    return np.clip(hu + 1024, 0, 4095).astype("<u2").tobytes()


def write_series(folder, count, seed=1):
    """`count` slices of about 0.5 MB each; returns their paths."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for z in range(count):
        path = os.path.join(folder, "IM%05d.dcm" % z)
        if not os.path.exists(path):
            with open(path, "wb") as handle:
                handle.write(HEADER + ("slice %d;" % z).encode() + ct_slice(z, rng))
        paths.append(path)
    return paths
