"""fuxi-mme: scalable generative sequential recommendation (Fuxi-MME, FuXi-alpha, HSTU, SASRec)."""

__version__ = "0.1.0"
