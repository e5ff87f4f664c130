"""Data for tracing: the AudioLens tracks and prompts, and the SAKURA and manifest loaders.

Synthetic SAKURA-like clips (for the demo and tests) live in `audiolens_ct.demo.synthetic`.
"""

from audiolens_ct.data.manifest import load_manifest
from audiolens_ct.data.prompts import ATTRIBUTES, TRACKS, Track, get_track, make_track
from audiolens_ct.data.sakura import load_sakura, load_sakura_hf
from audiolens_ct.data.sample import Sample, make_sample
from audiolens_ct.errors import DataError

__all__ = [
    "ATTRIBUTES",
    "TRACKS",
    "DataError",
    "Sample",
    "Track",
    "get_track",
    "load_manifest",
    "load_sakura",
    "load_sakura_hf",
    "make_sample",
    "make_track",
]
