"""bfn-codec: lossless compression with Bayesian Flow Networks and bits-back ANS coding."""
__version__ = "0.1.0"
