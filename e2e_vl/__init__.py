"""VL-BERT trained end to end with the detector in the loop."""
__version__ = "0.1.0"
