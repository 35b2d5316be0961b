"""advalign: the reproducible pipeline for "Adversarial Alignment" (Linsley, Feng et al.)."""

__version__ = "0.1.0"
