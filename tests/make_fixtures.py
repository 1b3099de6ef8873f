"""Regenerate the committed golden fixtures: python tests/make_fixtures.py

For each geometry in hf_reference.GEOMETRIES: a tiny random checkpoint saved by transformers in
tests/fixtures/<name>/ and golden.npz holding transformers' outputs on it (fp32, eager attention).
Needs torch==2.13.0 and transformers (pip install .[test])."""
import os
import shutil
import sys
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hf_reference  # noqa: E402

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")

if __name__ == "__main__":
    for name in hf_reference.GEOMETRIES:
        seed = zlib.crc32(name.encode()) % 10_000  # stable per fixture, whatever else is added
        directory = os.path.join(FIXTURES, name)
        shutil.rmtree(directory, ignore_errors=True)
        hf_reference.build_checkpoint(directory, name, seed=seed)
        golden = hf_reference.goldens(directory, name, seed=seed)
        np.savez_compressed(os.path.join(directory, "golden.npz"), **golden)
        print(f"{name}: {len(golden)} arrays, logits std {golden['logits'].std():.2f}")
