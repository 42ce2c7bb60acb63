"""The reference: ground truth and the portable backend.

* ``oracle``        -- NumPy float64 forward of every operator (the ground truth of all tests);
* ``transcription`` -- plain PyTorch transcription with autograd (benchmark baseline, gradient oracle);
* ``torch_ref``     -- the PyTorch reference backend's math, forward and explicit backward;
* ``backend``       -- registers ``torch_ref`` as the ``reference`` backend (loaded lazily by the core).
"""


def unavailable_reason(device):
    """The reference backend runs wherever PyTorch does."""
    return None


def load():
    from . import backend  # noqa: F401  (registers the kernels)
