"""DeepRubin-Explorer: real-time classification of astronomical alerts (QSO, CEP, SNIa, SNII)."""

__version__ = "0.1.0"
