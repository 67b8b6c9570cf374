"""placeholder during development"""
__version__ = "0.1.0"
