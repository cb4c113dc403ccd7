"""dmtp: train diffusion multi-token-prediction (MTP) draft heads for speculative decoding.

Stages (each runs on its own, without Prefect):
    dmtp collect   -> Zarr store of base-model hidden states and tokens   (dmtp.collect)
    dmtp validate  -> checks the store before training spends GPU time   (dmtp.validate)
    dmtp train     -> masked-diffusion head, torchrun/DDP, MLflow         (dmtp.train)
    dmtp evaluate  -> speculative decoding: tau, speedup, losslessness   (dmtp.evaluate)
    dmtp export    -> the head in DFlash's layout for SGLang / vLLM       (dmtp.export)
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dmtp")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
